"""The task record and its state machine.

queued → starting → running → succeeded | failed | timed_out | cancelled | lost. A retry moves a
failed, timed-out or lost task back to queued with the next attempt number.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace
from typing import Any

from agentnode.egress.policy import EgressPolicy, network_and_policy
from agentnode.errors import PolicyError, TaskError

__all__ = ["CLASSES", "TERMINAL", "State", "Task", "TaskSpec", "check_transition"]

CLASSES = ("critical", "high", "normal", "low", "batch")
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class State(enum.StrEnum):
    """Where a task is in its lifecycle."""

    QUEUED = "queued"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    LOST = "lost"


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.TIMED_OUT, State.CANCELLED, State.LOST})

_NEXT: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.STARTING, State.CANCELLED}),
    State.STARTING: frozenset({State.RUNNING, State.FAILED, State.CANCELLED, State.LOST}),
    State.RUNNING: frozenset(
        {State.SUCCEEDED, State.FAILED, State.TIMED_OUT, State.CANCELLED, State.LOST}
    ),
    State.FAILED: frozenset({State.QUEUED}),
    State.TIMED_OUT: frozenset({State.QUEUED}),
    State.LOST: frozenset({State.QUEUED}),
    State.SUCCEEDED: frozenset(),
    State.CANCELLED: frozenset(),
}


def check_transition(task_id: str, old: State, new: State) -> None:
    """Raises `TaskError` unless `old → new` is a legal move."""
    if new not in _NEXT[old]:
        allowed = ", ".join(sorted(_NEXT[old])) or "none, it is final"
        raise TaskError(f"task {task_id} cannot go from {old} to {new} (allowed: {allowed})")


@dataclass(frozen=True)
class TaskSpec:
    """What a client submits: who, how urgent, how big, and the command."""

    tenant: str
    command: tuple[str, ...]
    cls: str = "normal"
    cpu_millis: int = 1000
    memory_bytes: int = 512 << 20
    timeout_s: float = 3600.0
    pids: int | None = None
    heartbeat_s: float | None = None
    env: tuple[tuple[str, str], ...] = ()
    #: none, egress or host; empty: egress when any allow rule or rate is given, else none.
    network: str = ""
    #: Egress rules as `agentnode exec --allow/--allow-host` takes them, and rate limits.
    allow: tuple[str, ...] = ()
    allow_hosts: tuple[str, ...] = ()
    egress_rate: str | int | None = None
    conn_rate: str | int | None = None
    #: `HOSTPORT:PORT` TCP ports reachable from outside the node (`agentnode exec --publish`).
    publish: tuple[str, ...] = ()
    user: str = "65534"
    #: Retries after a failed, timed-out or lost attempt (None: the node's retry policy).
    retries: int | None = None
    #: Host paths bound into the task: (host path, task path, writable).
    binds: tuple[tuple[str, str, bool], ...] = ()
    # The rest of `agentnode exec`'s sandbox options (checked by the API; see isolation.spawn).
    cpu_weight: int | None = None
    memory_high: int | None = None
    swap: int | None = None
    tmp_size: int | None = None
    userns: bool = False
    caps: tuple[str, ...] = ()
    rootfs: str = "/"
    cwd: str = "/workspace"
    hostname: str = "agentnode"
    #: The agent kind it was prepared for (`agentnode.agents`), empty for a plain command.
    agent: str = ""

    def __post_init__(self) -> None:
        if not _TENANT.fullmatch(self.tenant):
            raise TaskError(
                f"invalid tenant {self.tenant!r} (use 1-128 letters, digits, '_', '.', '-')"
            )
        if self.cls not in CLASSES:
            raise TaskError(f"unknown priority class {self.cls!r} (use {', '.join(CLASSES)})")
        if not self.command or not all(isinstance(a, str) and a for a in self.command):
            raise TaskError("command must be a non-empty list of non-empty strings")
        if self.cpu_millis <= 0 or self.memory_bytes <= 0:
            raise TaskError("cpu_millis and memory_bytes must be positive (request real resources)")
        if not self.timeout_s > 0:
            raise TaskError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.pids is not None and self.pids < 1:
            raise TaskError(f"pids must be at least 1, got {self.pids}")
        if self.retries is not None and not 0 <= self.retries <= 100:
            raise TaskError(f"retries must be within 0..100, got {self.retries}")
        if self.heartbeat_s is not None and not self.heartbeat_s > 0:
            raise TaskError(f"heartbeat_s must be positive, got {self.heartbeat_s}")
        for pair in self.env:
            if len(pair) != 2 or not all(isinstance(x, str) for x in pair) or not pair[0]:
                raise TaskError(f"env entry {pair!r} is not a NAME, VALUE pair of strings")
            if "=" in pair[0] or "\0" in pair[0] + pair[1]:
                raise TaskError(f"env name {pair[0]!r} may not contain '=' or NUL")
        if not re.fullmatch(r"\d+(:\d+)?", self.user):
            raise TaskError(f"user {self.user!r} is not UID[:GID] (example: 1000:1000)")
        mode, _ = self.egress()
        object.__setattr__(self, "network", mode)

    def egress(self) -> tuple[str, EgressPolicy | None]:
        """The task's network mode and egress policy; `TaskError` names the bad field."""
        try:
            return network_and_policy(
                self.network,
                allow=self.allow,
                hosts=self.allow_hosts,
                rate=self.egress_rate,
                conn_rate=self.conn_rate,
                publish=self.publish,
                names=("network", "allow", "allow_hosts", "egress_rate", "conn_rate", "publish"),
            )
        except PolicyError as e:
            raise TaskError(str(e)) from None


@dataclass(frozen=True)
class Task:
    """One task's durable record; every change is a new value written to the store."""

    id: str
    seq: int
    spec: TaskSpec
    state: State = State.QUEUED
    attempt: int = 1
    not_before: float = 0.0
    reason: str = ""
    exit_code: int | None = None
    history: tuple[tuple[str, float], ...] = field(default=())

    def moved(self, new: State, at: float, **changes: Any) -> Task:
        """This task in state `new`, after checking the move is legal."""
        check_transition(self.id, self.state, new)
        return replace(self, state=new, history=(*self.history, (new.value, at)), **changes)
