"""The task record and its state machine.

queued → starting → running → succeeded | failed | timed_out | cancelled | lost. A retry moves a
failed, timed-out or lost task back to queued with the next attempt number.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, replace

from agentnode.errors import TaskError
from agentnode.isolation.spec import Sandbox, check_duration

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from typing import Any


__all__ = [
    "AGENT_CPU_REQUEST",
    "CLASSES",
    "DEFAULT_CPUS",
    "DEFAULT_MEMORY",
    "DEFAULT_TIMEOUT_S",
    "TERMINAL",
    "State",
    "Task",
    "TaskSpec",
    "check_transition",
    "cpu_request",
    "cpu_weight_for",
]

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


#: What a task reserves and may use when its sandbox leaves it open.
DEFAULT_CPUS = 1.0
DEFAULT_MEMORY = 512 << 20
DEFAULT_TIMEOUT_S = 3600.0
#: CPUs an agent task reserves when its submitter does not say (`cpu_request`), at most its
#: `cpus` limit: an agent mostly waits on its model (a step's ~10 ms of CPU against seconds of
#: the model's time), so reserving its whole limit would leave the node's CPUs idle; its limit
#: still lets a start or a tool burst run at full speed. Docs: docs/node.md (admission).
AGENT_CPU_REQUEST = 0.1
#: cgroup CPU weight per CPU reserved: a task reserving 1 CPU has the kernel's default, 100.
_WEIGHT_PER_CPU = 100


def cpu_request(*, cpus: float, given: float | None, agent: str) -> float:
    """CPUs the scheduler reserves for a task whose limit is `cpus`: `given` when the submitter
    gave one, else all of `cpus` for a plain command and `AGENT_CPU_REQUEST` (at most `cpus`)
    for an agent kind."""
    if given is not None:
        return given
    return min(cpus, AGENT_CPU_REQUEST) if agent else cpus


def cpu_weight_for(request: float) -> int:
    """The cgroup CPU weight of a task reserving `request` CPUs (100 per CPU, 1 to 10000): when
    CPUs are short, running tasks share them in proportion to what they reserved, so each gets
    at least its reservation (admission keeps the reservations within the node's CPUs)."""
    return max(1, min(10000, round(request * _WEIGHT_PER_CPU)))


@dataclass(frozen=True)
class TaskSpec:
    """What a client submits: who, how urgent, the command, and its sandbox (whose memory and
    timeout are also what the scheduler reserves, and whose CPUs are a limit: set to the node's
    defaults when the sandbox leaves them open). CPUs reserved: `cpu_request`."""

    tenant: str
    command: tuple[str, ...]
    cls: str = "normal"
    sandbox: Sandbox = field(default_factory=Sandbox)
    heartbeat_s: float | None = None
    #: Retries after a failed, timed-out or lost attempt (None: the node's retry policy).
    retries: int | None = None
    #: The agent kind it was prepared for (`agentnode.agents`), empty for a plain command.
    agent: str = ""
    #: Whether an attempt lost to the node (its agent gone with no exit recorded, a host
    #: reboot) runs once more; False for work that must not run twice.
    retry_lost: bool = True
    #: CPUs the scheduler reserves for the task (and its cgroup's CPU weight when the sandbox
    #: gives none), at most its `cpus` limit; None: see `cpu_request` (the function).
    cpu_request: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tenant, str) or not _TENANT.fullmatch(self.tenant):
            raise TaskError(
                f"invalid tenant {self.tenant!r} (use 1-128 letters, digits, '_', '.', '-', starting with a letter or digit)"
            )
        if self.cls not in CLASSES:
            raise TaskError(f"unknown priority class {self.cls!r} (use {', '.join(CLASSES)})")
        if not self.command or not all(isinstance(a, str) and a for a in self.command):
            raise TaskError("command must be a non-empty list of non-empty strings")
        if self.retries is not None and (
            isinstance(self.retries, bool)
            or not isinstance(self.retries, int)
            or not 0 <= self.retries <= 100
        ):
            raise TaskError(f"retries must be within 0..100, got {self.retries!r}")
        if not isinstance(self.retry_lost, bool):
            raise TaskError(f"retry_lost must be true or false, got {self.retry_lost!r}")
        if self.heartbeat_s is not None:
            object.__setattr__(self, "heartbeat_s", check_duration("heartbeat", self.heartbeat_s))
        limits = self.sandbox.limits
        if limits.cpus is None or limits.memory is None or limits.timeout is None:
            filled = replace(
                limits,
                cpus=DEFAULT_CPUS if limits.cpus is None else limits.cpus,
                memory=DEFAULT_MEMORY if limits.memory is None else limits.memory,
                timeout=DEFAULT_TIMEOUT_S if limits.timeout is None else limits.timeout,
            )
            object.__setattr__(self, "sandbox", replace(self.sandbox, limits=filled))
        if self.cpu_request is not None:
            request = self.cpu_request
            if isinstance(request, bool) or not isinstance(request, int | float):
                raise TaskError(f"cpu_request must be a number of CPUs, got {request!r}")
            if not 0.01 <= request <= self._limit("cpus"):
                raise TaskError(
                    f"cpu_request {request:g} is out of range (0.01 to the task's cpus limit, "
                    f"{self._limit('cpus'):g}: a task cannot use more than its limit)"
                )
            object.__setattr__(self, "cpu_request", float(request))

    @property
    def cpu_millis(self) -> int:
        """CPU millicores reserved for the task (its `cpus` is a limit; see `cpu_request`)."""
        reserved = cpu_request(cpus=self._limit("cpus"), given=self.cpu_request, agent=self.agent)
        return round(reserved * 1000)

    @property
    def memory_bytes(self) -> int:
        """Memory reserved for the task."""
        return int(self._limit("memory"))

    @property
    def timeout_s(self) -> float:
        return float(self._limit("timeout"))

    def _limit(self, name: str) -> float:
        value = getattr(self.sandbox.limits, name)
        assert value is not None  # filled in by __post_init__
        return float(value)


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
    #: The running attempt's init as the host sees it, (pid, start time in /proc ticks): what
    #: the node's next start re-adopts it by (None: not started, or not to be re-adopted).
    process: tuple[int, int] | None = None
    #: When the running attempt's timeout ends (epoch seconds).
    deadline: float | None = None

    def moved(self, new: State, at: float, **changes: Any) -> Task:
        """This task in state `new`, after checking the move is legal."""
        check_transition(self.id, self.state, new)
        return replace(self, state=new, history=(*self.history, (new.value, at)), **changes)
