"""`run_code`: python or bash in a fresh sandbox per call, or python in a stateful session per
task (a sandboxed interpreter whose variables persist between calls; it dies with its task and
is never shared, not even between two tasks of one tenant). Its network is none, or with
`network="task"` the calling task's own network mode and egress policy."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import select
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentnode.egress.enforce import Denial
from agentnode.egress.policy import EgressPolicy
from agentnode.egress.service import EgressService
from agentnode.errors import UsageError
from agentnode.isolation import task as isolation
from agentnode.isolation.task import ExitReason
from agentnode.tools.pyfork import READY, STDIN_MAIN, PythonForks
from agentnode.tools.registry import Caller, Tool, ToolLimits
from agentnode.tools.result import Outcome, ToolClass
from agentnode.tools.sandboxed import (
    SPAWNER,
    WAITERS,
    Run,
    Started,
    finish_off_loop,
    owned_workspace,
    run_sandboxed,
    sandbox_limits,
    start_sandboxed,
)

__all__ = ["NETWORKS", "CodeRunner"]

#: What `run_code`'s sandbox may reach: nothing, or what the calling task itself may.
NETWORKS = ("none", "task")

log = logging.getLogger("agentnode.tools")

_KERNEL = (Path(__file__).with_name("kernel.py")).read_text()
#: How long an interpreter may take to start (a host under heavy load) before it is given up.
_BOOT_S = 60.0
#: A spare sandbox unused this long is stopped (its task has stopped calling run_code).
_SPARE_IDLE_S = 60.0
#: Python sandboxes kept made ahead per caller identity: with two, calls back to back find
#: one ready while the next is made (a task start and a fork, or without the fork server an
#: interpreter start).
SPARES = 2

INPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "code": {"type": "string", "maxLength": 1 << 20, "description": "The program to run."},
        "language": {"enum": ["python", "bash"], "default": "python"},
        "session": {
            "type": "boolean",
            "default": False,
            "description": "Run in this task's persistent python session (variables persist).",
        },
        "timeout": {"type": "number", "exclusiveMinimum": 0, "description": "Seconds (capped)."},
    },
    "required": ["code"],
    "additionalProperties": False,
}
OUTPUT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "stdout": {"type": "string"},
        "stderr": {"type": "string"},
        "exit_status": {"type": "integer"},
    },
    "required": ["stdout", "stderr", "exit_status"],
}


def _result(cls: ToolClass, stdout: str, stderr: str, status: int, note: str = "") -> Outcome:
    text = stdout + (f"\n[stderr]\n{stderr}" if stderr else "") + (f"\n[{note}]" if note else "")
    return Outcome(
        cls=cls,
        content=[{"type": "text", "text": text}],
        structured={"stdout": stdout, "stderr": stderr, "exit_status": status},
    )


def _note(cls: ToolClass, run_reason: ExitReason | None, status: int) -> str:
    if cls == "resource":
        return "killed: out of memory" if run_reason is ExitReason.OOM else "killed: pids limit"
    if cls == "timeout":
        return "killed: timeout"
    return f"exit status {status}" if status else ""


_Reach = tuple[str, EgressPolicy | None]
#: What a session's reply may hold beyond its cut output: the keys, and the error's traceback.
_REPLY_SLACK = 1 << 20


class Session:
    """One task's python interpreter in its own sandbox, with the network it was made with
    and the connections that sandbox was denied."""

    def __init__(self, task: isolation.Task, reach: _Reach, denials: list[Denial]) -> None:
        self.task = task
        self.reach = reach
        self.denials = denials
        self.lock = asyncio.Lock()
        self._buffer = bytearray()
        #: The exchange under way on a `WAITERS` thread, which reads the session's pipes.
        self.busy: asyncio.Future[Any] | None = None

    def end(self) -> None:
        """Kills the interpreter; its pipes are closed once no exchange reads them (their
        numbers, reused meanwhile, would be read as this session's)."""
        busy = self.busy
        if busy is None or busy.done():
            self.task.close()
            return
        self.task.send_kill()
        busy.add_done_callback(lambda _: self.task.close())

    @property
    def pid(self) -> int:
        return self.task.pid

    def exchange(self, code: str, timeout: float, output: int) -> dict[str, Any] | str:
        """Sends `code`, returns the reply (its output cut at `output` bytes); "timeout" when
        it ran past `timeout` (then it is killed: its state is gone), "ended" when the
        interpreter died, "too large" when its reply passed what `output` bytes can take
        (code that wrote on the reply stream itself: it is killed too)."""
        assert self.task.stdin is not None and self.task.stdout is not None
        data = memoryview((json.dumps({"code": code, "output": output}) + "\n").encode())
        try:
            while data:
                data = data[os.write(self.task.stdin.fileno(), data) :]
        except OSError:
            return "ended"
        fd = self.task.stdout.fileno()
        # JSON escapes a byte in 6 at most (`\u001b`); the error's traceback is not cut.
        bound = 6 * output + _REPLY_SLACK
        deadline = time.monotonic() + timeout
        while (end := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > bound:
                self.task.kill()
                return "too large"
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.task.kill()
                return "timeout"
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return "ended"
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            reply: dict[str, Any] = json.loads(line)
            if not isinstance(reply, dict) or not {"stdout", "stderr", "error"} <= reply.keys():
                raise ValueError("not a reply")
        except ValueError:
            self.task.kill()  # its reply stream was written on: nothing on it can be trusted
            return "ended"
        return reply


@dataclass(frozen=True, slots=True)
class _Key:
    tenant: str
    task: str


@dataclass(frozen=True, slots=True)
class _SpareKey:
    """Everything a fresh python sandbox is made for: a spare serves only calls that match."""

    tenant: str
    task: str
    user: str
    userns: bool
    workspace: Path | None
    network: str
    egress: EgressPolicy | None


def _spare_of(caller: Caller, reach: _Reach) -> _SpareKey:
    return _SpareKey(caller.tenant, caller.task, caller.user, caller.userns, caller.workspace,
                     *reach)  # fmt: skip


def _discard(spare: Future[Started]) -> None:
    """Stops a spare sandbox (once it is made, if it is still being made)."""

    def close(f: Future[Started]) -> None:
        if not f.cancelled() and f.exception() is None:
            f.result().close()

    spare.add_done_callback(close)


_Spares = dict[_SpareKey, list[tuple[Future[Started], float]]]


def _discard_all(spares: _Spares) -> None:
    for held in spares.values():
        for spare, _made in held:
            _discard(spare)
    spares.clear()


def _await_ready(started: Started) -> tuple[bytes, bool]:
    """Reads the sandbox's stderr up to `READY`; returns what came before it (nothing, unless
    the interpreter warned at start) and whether the mark came. An interpreter that died first
    is left for the call to report."""
    assert started.task.stderr is not None
    fd = started.task.stderr.fileno()
    seen = b""
    deadline = time.monotonic() + _BOOT_S
    while not seen.endswith(READY):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"python did not start in its sandbox within {_BOOT_S:g} s")
        chunk = os.read(fd, 1 << 16)  # nothing follows the mark before the code is sent
        if not chunk:
            return seen, False  # it ended: the call collects its end
        seen += chunk
    return seen[: -len(READY)], True


class CodeRunner:
    """The `run_code` tool and the sessions it keeps, one per calling task."""

    def __init__(
        self,
        *,
        limits: ToolLimits | None = None,
        network: str = "none",
        node_network: EgressService | None = None,
        spares: int = SPARES,
        forks: bool = True,
    ) -> None:
        """`forks`: make python sandboxes as forks of a pre-started interpreter (`pyfork`),
        where the caller allows; else each starts its own."""
        if network not in NETWORKS:
            raise UsageError(f"run_code network {network!r}: use none or task")
        self.limits = limits or ToolLimits()
        self.network = network
        self._network = node_network
        self._spare_count = spares
        self._sessions: dict[_Key, Session] = {}
        self._starting: dict[_Key, asyncio.Lock] = {}
        #: Up to `spares` python sandboxes made ahead per caller identity, oldest first (a
        #: fresh call takes one, already past the interpreter's start, and has it replaced):
        #: never reused, never shared between tasks. Stopped when idle, with their task, or
        #: with the runner.
        self._spares: _Spares = {}
        #: The sandboxes of fresh calls, by calling task (added on a start thread; the ended
        #: ones go at the task's next call or its end): a task's end kills those under way,
        #: never code running on for a task that ended.
        self._running: dict[str, set[isolation.Task]] = {}
        self._running_lock = threading.Lock()
        self._forks = PythonForks() if forks else None
        weakref.finalize(self, _discard_all, self._spares)
        if self._forks is not None:
            weakref.finalize(self, self._forks.close)

    def tool(self) -> Tool:
        return Tool(
            name="run_code",
            description="Run python or bash in a fresh sandbox ("
            + ("no network" if self.network == "none" else "with this task's own network")
            + "), or python in this task's persistent session.",
            input_schema=INPUT_SCHEMA,
            output_schema=OUTPUT_SCHEMA,
            limits=self.limits,
            run=self.run,
        )

    def reach(self, caller: Caller) -> _Reach:
        """The network mode and egress policy a call of `caller` runs with: none, or (with
        `network="task"`) the caller's own; a caller without a task has none."""
        return caller.reach() if self.network == "task" else ("none", None)

    def session_pid(self, tenant: str, task: str) -> int | None:
        """The host pid of a task's session interpreter (None: it has none)."""
        s = self._sessions.get(_Key(tenant, task))
        return None if s is None or s.task.result is not None else s.pid

    def spare_pids(self, tenant: str, task: str) -> list[int]:
        """The host pids of the python sandboxes made ahead for a task (made, not yet used)."""
        return [
            f.result().task.pid
            for k, held in self._spares.items()
            for f, _made in held
            if (k.tenant, k.task) == (tenant, task) and f.done() and f.exception() is None
        ]

    async def run(self, args: dict[str, Any], caller: Caller) -> Outcome:
        timeout = min(float(args.get("timeout", self.limits.timeout)), self.limits.timeout)
        language = args.get("language", "python")
        if args.get("session"):
            if language != "python":
                return Outcome.error("invalid_input", "/language: sessions run python only")
            return await self._in_session(args["code"], timeout, caller)
        limits = dataclasses.replace(caller.within(self.limits), timeout=timeout)
        reach = self.reach(caller)
        if language == "python":
            started = await self._take_spare(caller, reach)
            self._track(caller, started.task)
            try:
                run = await finish_off_loop(started, stdin=args["code"].encode(), limits=limits)
            finally:
                # Made after the call, not during it: on a busy host the two would share the
                # CPU, and the next call has the time between calls to find it ready.
                self._make_spares(caller, reach)
            return self._fresh_outcome(run)
        run = await run_sandboxed(
            ["bash", "-c", args["code"]],
            limits=limits,
            network=reach[0],
            egress=reach[1],
            node_network=self._network,
            workspace=caller.workspace,
            user=caller.user,
            userns=caller.userns,
            on_start=lambda sandbox: self._track(caller, sandbox),
        )
        return self._fresh_outcome(run)

    def _track(self, caller: Caller, sandbox: isolation.Task) -> None:
        """Notes a fresh call's sandbox for its task's end; forgets the task's ended ones (a
        call's run goes on after a caller that went, so its end is what counts)."""
        with self._running_lock:
            if not caller.alive():
                # Started as its task ended: `end_task` has been, or never sees it.
                sandbox.send_kill()
                return
            running = self._running.setdefault(caller.task, set())
            running.difference_update([t for t in running if t.result is not None])
            running.add(sandbox)

    def _start_python(self, caller: Caller, reach: _Reach) -> Started:
        """A python sandbox for `caller`, returned once its interpreter waits for the code:
        the call's timeout then counts the code's time only, not a slow start's. A fork of
        the pre-started interpreter where it can be, else a fresh one."""
        if self._forks is not None and self._forks.serves(userns=caller.userns):
            forked = self._fork_python(caller, reach)
            if forked is not None:
                return forked
        started = start_sandboxed(
            ["python3", "-I", "-c", STDIN_MAIN], **self._placed(caller, reach), userns=caller.userns
        )
        try:
            started.stderr_head, _ready = _await_ready(started)
        except BaseException:
            started.close()
            raise
        return started

    def _placed(self, caller: Caller, reach: _Reach) -> dict[str, Any]:
        """Where and with what a sandbox for `caller` runs, forked or started alike: the
        runner's limits, the caller's reach, workspace and user."""
        return {"limits": caller.within(self.limits), "network": reach[0], "egress": reach[1],
                "node_network": self._network, "workspace": caller.workspace,
                "user": caller.user}  # fmt: skip

    def _fork_python(self, caller: Caller, reach: _Reach) -> Started | None:
        """A sandbox whose interpreter is a fork of the pre-started one, ready for the code;
        None when none could be made (the server is gone, or the fork ended before it was
        ready), with nothing left running."""
        assert self._forks is not None
        try:
            started = self._forks.start(**self._placed(caller, reach))
        except OSError as e:
            if not self._forks.closed:  # else the runner is closing: this spare goes with it
                log.warning("run_code: no python fork (%s); starting an interpreter", e)
            return None
        try:
            started.stderr_head, ready = _await_ready(started)
        except BaseException:
            started.close()
            raise
        if ready:
            return started
        result = started.task.wait(_BOOT_S)
        started.close()
        if not self._forks.closed:
            log.warning("run_code: a python fork ended before it was ready (%s); starting an "
                        "interpreter", result and result.exit_status)  # fmt: skip
        return None

    def _make_spares(self, caller: Caller, reach: _Reach) -> None:
        """Starts making python sandboxes for `caller` with network `reach` until `spares`
        are there or under way (in parallel, on the `SPAWNER` threads), each stopped after
        `_SPARE_IDLE_S` unless a call takes it first: also those made for a task that ended
        while its last call ran (after `end_task`)."""
        if not caller.alive():
            return
        key = _spare_of(caller, reach)
        # Those made for the task's previous network (its policy changed) would never be taken.
        for old in [k for k in self._spares if k != key and (k.tenant, k.task) ==
                    (key.tenant, key.task)]:  # fmt: skip
            for spare, _made in self._spares.pop(old):
                _discard(spare)
        held = self._spares.setdefault(key, [])
        loop = asyncio.get_running_loop()
        while len(held) < self._spare_count:
            spare = SPAWNER.submit(self._start_python, caller, reach)
            held.append((spare, time.monotonic()))
            loop.call_later(_SPARE_IDLE_S, self._expire, key, spare)

    def _expire(self, key: _SpareKey, spare: Future[Started]) -> None:
        held = self._spares.get(key, [])
        for i, (f, _made) in enumerate(held):
            if f is spare:
                del held[i]
                _discard(spare)
                break
        if not held:
            self._spares.pop(key, None)

    async def _take_spare(self, caller: Caller, reach: _Reach) -> Started:
        """A fresh python sandbox for `caller` with network `reach`: the one made ahead for
        exactly that when there is one still usable, else one started now."""
        now = time.monotonic()
        for key, held in list(self._spares.items()):
            for spare, _made in [h for h in held if now - h[1] > _SPARE_IDLE_S]:
                self._expire(key, spare)
        held = self._spares.get(_spare_of(caller, reach), [])
        while held:
            # The oldest one ready, else the oldest: the first to be ready, most likely.
            i = next((i for i, (f, _made) in enumerate(held) if f.done()), 0)
            spare = held.pop(i)[0]
            try:
                started = await asyncio.wrap_future(spare)
            except Exception:
                continue  # it could not be made then: the next, or one started now (or fail)
            if started.task.wait(0) is None:
                return started
            started.close()  # it ended while it waited (killed from outside)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(SPAWNER, self._start_python, caller, reach)

    def _fresh_outcome(self, run: Run) -> Outcome:
        cls = run.cls
        status = run.result.exit_status
        out = run.stdout.decode(errors="replace")
        err = run.stderr.decode(errors="replace")
        base = _result(cls, out, err, status, _note(cls, run.result.reason, status))
        outcome = run.outcome(cls, base.content)
        outcome.structured = base.structured
        return outcome

    async def _session(self, caller: Caller) -> Session | None:
        """The task's session, made if it has none; None when the task ended meanwhile."""
        key = _Key(caller.tenant, caller.task)
        reach = self.reach(caller)
        lock = self._starting.setdefault(key, asyncio.Lock())
        async with lock:
            s = self._sessions.get(key)
            if s is not None and s.task.result is None:
                if s.reach == reach:
                    return s
                if s.reach[0] == reach[0] and reach[1] is not None:
                    # The task's policy changed live: so does its session's, state kept.
                    s.task.update_egress(reach[1])
                    s.reach = reach
                    return s
            if s is not None:
                s.task.close()  # ended, or made for a network mode the task no longer has
            denials: list[Denial] = []
            loop = asyncio.get_running_loop()
            task = await loop.run_in_executor(
                SPAWNER, self._start_session, caller, reach, denials.append
            )
            if not caller.alive():
                task.close()  # made while its task ended: `end_task` has been already
                return None
            s = self._sessions[key] = Session(task, reach, denials)
            return s

    def _start_session(
        self, caller: Caller, reach: _Reach, on_denial: Callable[[Denial], None]
    ) -> isolation.Task:
        workspace = caller.workspace
        if workspace is None:
            workspace = owned_workspace(
                isolation.DATA_DIR / "tool-sessions" / f"{caller.tenant}-{caller.task}",
                caller.user,
                userns=caller.userns,
            )
        return isolation.spawn(
            ["python3", "-I", "-u", "-c", _KERNEL],
            limits=sandbox_limits(caller.within(self.limits), timeout=False),
            network=reach[0],
            egress=reach[1],
            node_network=self._network,
            on_denial=on_denial if reach[1] is not None else None,
            workspace=workspace,
            user=caller.user,
            userns=caller.userns,
            stdin="pipe",
            stdout="pipe",
            stderr="null",
        )

    async def _in_session(self, code: str, timeout: float, caller: Caller) -> Outcome:
        s = await self._session(caller)
        if s is None:
            return Outcome.error("permanent", f"task {caller.task} has ended")
        loop = asyncio.get_running_loop()
        async with s.lock:
            before = s.task.stats()
            seen = len(s.denials)
            # A `WAITERS` thread: the loop's default threads are few and serve the node.
            s.busy = loop.run_in_executor(WAITERS, s.exchange, code, timeout, self.limits.output)
            try:
                reply = await asyncio.shield(s.busy)
            except asyncio.CancelledError:
                # The code runs on, and its reply would reach the task's next call: the
                # session ends here (its state is lost, as the next call is told).
                key = _Key(caller.tenant, caller.task)
                if self._sessions.get(key) is s:
                    del self._sessions[key]
                s.end()
                raise
            if s.reach[1] is not None and s.task.result is None:
                await loop.run_in_executor(None, s.task.poll_denials)
            denials = s.denials[seen:]
            if isinstance(reply, str):
                result = await loop.run_in_executor(None, s.task.kill)
                s.task.close()
                self._sessions.pop(_Key(caller.tenant, caller.task), None)
                if result.reason in (ExitReason.OOM, ExitReason.PIDS):
                    cls: ToolClass = "resource"
                elif reply == "timeout":
                    cls = "timeout"
                else:
                    cls = "permanent"
                note = _note(cls, result.reason, result.exit_status) or "session ended"
                if reply == "too large":
                    note = f"killed: its reply passed the output limit, {self.limits.output} bytes"
                out = _result(cls, "", "", result.exit_status, note + "; session state lost")
                out.memory_peak = result.stats.memory_peak
                out.denials = s.denials[seen:]  # the last ones came as it was reaped
                return out
            after = s.task.stats()
        error = reply["error"]
        cls = ("policy" if denials else "permanent") if error else "ok"
        out = _result(cls, reply["stdout"], reply["stderr"] + (error or ""), 1 if error else 0)
        out.denials = denials
        out.cpu_s = (after.cpu_user_s + after.cpu_system_s) - (
            before.cpu_user_s + before.cpu_system_s
        )
        out.memory_peak = after.memory_peak
        out.bytes_out = int(reply.get("bytes", 0))
        out.truncated = bool(reply.get("truncated"))
        return out

    def end_task(self, task: str) -> None:
        """Kills the sessions, spare sandboxes and calls under way of `task` (the node calls
        it when the task ends; such a call answers as killed)."""
        with self._running_lock:
            running = self._running.pop(task, set())
        for sandbox in running:
            sandbox.send_kill()
        for key in [k for k in self._sessions if k.task == task]:
            self._sessions.pop(key).end()
            self._starting.pop(key, None)
        for spare_key in [k for k in self._spares if k.task == task]:
            for spare, _made in self._spares.pop(spare_key):
                _discard(spare)

    def close(self) -> None:
        for s in self._sessions.values():
            s.end()
        self._sessions.clear()
        _discard_all(self._spares)
        if self._forks is not None:
            self._forks.close()
