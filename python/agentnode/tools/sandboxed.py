"""Runs one command in a fresh Layer 1 sandbox for a tool call: stdin in, stdout and stderr
out (cut at the tool's output limit), and the end classified for the caller."""

from __future__ import annotations

import asyncio
import os
import selectors
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agentnode.egress.enforce import Denial
from agentnode.egress.policy import EgressPolicy
from agentnode.egress.service import EgressService
from agentnode.isolation import task as isolation
from agentnode.isolation.spec import Limits, Mount, Sandbox, parse_user
from agentnode.isolation.task import ExitReason, Result, prepare_workspace
from agentnode.tools.registry import ToolLimits
from agentnode.tools.result import Outcome, ToolClass
from agentnode.trees import remove_tree

TYPE_CHECKING = False
if TYPE_CHECKING:
    from agentnode.isolation.task import Stdio

__all__ = [
    "SPAWNER",
    "WAITERS",
    "Run",
    "Started",
    "finish_off_loop",
    "finish_sandboxed",
    "run_sandboxed",
    "sandbox_limits",
    "start_sandboxed",
    "sweep_scratch",
]

#: Long-lived threads tools start sandboxes on: a sandbox is killed when the thread that
#: cloned it exits. For starts only, which take milliseconds.
SPAWNER = ThreadPoolExecutor(4, thread_name_prefix="agentnode-tools")
#: Threads that feed, read and wait for sandboxed runs, one per run under way (each blocks
#: for the run's whole time; `ToolService` bounds the runs of each task): on the four
#: `SPAWNER` threads, one task's four slow calls held every other task's tools.
WAITERS = ThreadPoolExecutor(1024, thread_name_prefix="agentnode-tool-runs")


def owned_workspace(path: Path, user: str, *, userns: bool = False) -> Path:
    """`path` made and owned by `user` (`UID[:GID]`), as `prepare_workspace` makes a task's."""
    uid, gid = parse_user(user)
    return prepare_workspace(path, Sandbox(uid=uid, gid=gid, userns=userns))


def sandbox_limits(limits: ToolLimits, *, timeout: bool = True) -> Limits:
    """The sandbox limits of a tool's limits. With a memory limit, swap is off (a tool's
    memory limit is its whole budget); without one there is no swap limit to set."""
    return Limits(
        cpus=limits.cpus,
        memory=limits.memory,
        pids=limits.pids,
        swap=None if limits.memory is None else 0,
        timeout=limits.timeout if timeout else None,
    )


@dataclass(slots=True)
class Run:
    """One finished sandboxed command."""

    result: Result
    stdout: bytes
    stderr: bytes
    bytes_out: int
    truncated: bool
    denials: list[Denial] = field(default_factory=list)

    @property
    def cls(self) -> ToolClass:
        """How the run ended, as a tool class (a non-zero exit is the caller's `permanent`)."""
        reason = self.result.reason
        if reason in (ExitReason.OOM, ExitReason.PIDS):
            return "resource"
        if reason is ExitReason.TIMEOUT:
            return "timeout"
        if self.result.exit_status != 0:
            return "policy" if self.denials else "permanent"
        return "ok"

    def outcome(self, cls: ToolClass, content: list[dict[str, object]]) -> Outcome:
        """An outcome carrying this run's accounting."""
        stats = self.result.stats
        detail: dict[str, object] = {"exit_status": self.result.exit_status}
        return Outcome(
            cls=cls,
            content=content,
            cpu_s=stats.cpu_user_s + stats.cpu_system_s,
            memory_peak=stats.memory_peak,
            bytes_out=self.bytes_out,
            truncated=self.truncated,
            detail=detail,
            denials=list(self.denials),
        )


def _collect(
    task: isolation.Task, stdin: bytes, cap: int, timeout: float | None
) -> tuple[bytes, bytes, int, bool]:
    """Feeds stdin and reads both outputs until they close or `timeout` passes, keeping `cap`
    bytes in all and draining the rest (a full pipe would stall the task)."""
    assert task.stdin is not None and task.stdout is not None and task.stderr is not None
    kept = {task.stdout.fileno(): bytearray(), task.stderr.fileno(): bytearray()}
    total = 0
    truncated = False
    deadline = None if timeout is None else time.monotonic() + timeout
    rest = _write_ready(task.stdin.fileno(), stdin)
    if rest:
        threading.Thread(target=_feed, args=(task.stdin, rest), daemon=True).start()
    else:
        task.stdin.close()
    with selectors.DefaultSelector() as sel:
        for f in (task.stdout, task.stderr):
            sel.register(f, selectors.EVENT_READ)
        while sel.get_map():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                total += len(chunk)
                room = cap - sum(len(b) for b in kept.values())
                if room < len(chunk):
                    truncated = True
                kept[key.fd] += chunk[: max(room, 0)]
    return bytes(kept[task.stdout.fileno()]), bytes(kept[task.stderr.fileno()]), total, truncated


def _write_ready(fd: int, data: bytes) -> bytes:
    """Writes what the pipe takes now (all of a small input: no thread for it); returns the
    rest."""
    if not data:
        return data
    os.set_blocking(fd, False)
    try:
        done = os.write(fd, data)
    except BlockingIOError:
        done = 0
    except OSError:
        return b""  # the task ended without reading it
    finally:
        os.set_blocking(fd, True)
    return data[done:]


def _feed(pipe: object, data: bytes) -> None:
    try:
        pipe.write(data)  # type: ignore[attr-defined]
        pipe.close()  # type: ignore[attr-defined]
    except OSError:
        pass  # the task ended without reading it all


@dataclass(slots=True)
class Started:
    """A sandbox started for one run (its stdin still open), before that run is given to it."""

    task: isolation.Task
    #: The empty workspace made for it (removed when the run ends), when none was given.
    scratch: Path | None
    denials: list[Denial]
    #: What it wrote on stderr before the run was given to it (read by whoever made it).
    stderr_head: bytes = b""

    def close(self) -> None:
        """Kills it unused and removes its scratch workspace."""
        try:
            self.task.close()
        finally:
            if self.scratch is not None:
                remove_tree(self.scratch)


def start_sandboxed(
    argv: Sequence[str],
    *,
    limits: ToolLimits,
    env: Mapping[str, str] | None = None,
    network: str = "none",
    egress: EgressPolicy | None = None,
    node_network: EgressService | None = None,
    workspace: Path | None = None,
    user: str = "65534",
    userns: bool = False,
    mounts: Sequence[Mount] = (),
    stdio: tuple[Stdio, Stdio, Stdio] = ("pipe", "pipe", "pipe"),
) -> Started:
    """Starts `argv` in a fresh sandbox with `limits` but no timeout yet (`finish_sandboxed`
    starts its clock). Call on a `SPAWNER` thread. Without `workspace` it gets an empty
    scratch directory. `stdio`: its stdin, stdout and stderr (`spawn`'s), pipes by default."""
    denials: list[Denial] = []
    scratch = None
    if workspace is None:
        scratch = Path(tempfile.mkdtemp(prefix="tool-", dir=_scratch_root()))
        workspace = owned_workspace(scratch, user, userns=userns)
    try:
        task = isolation.spawn(
            list(argv),
            limits=sandbox_limits(limits, timeout=False),
            env=dict(env or {}),
            network=network,
            egress=egress,
            node_network=node_network,
            on_denial=denials.append if network in ("egress", "host") else None,
            workspace=workspace,
            user=user,
            userns=userns,
            mounts=mounts,
            stdin=stdio[0],
            stdout=stdio[1],
            stderr=stdio[2],
        )
    except BaseException:
        if scratch is not None:
            remove_tree(scratch)
        raise
    task.close_network_later()  # the call's answer does not wait for its removal
    return Started(task, scratch, denials)


def finish_sandboxed(started: Started, *, stdin: bytes, limits: ToolLimits) -> Run:
    """Gives a started sandbox its `stdin`, collects what it prints and waits for its end,
    `limits.timeout` from now at most; then removes it."""
    task = started.task
    try:
        task.start_clock(limits.timeout)
        out, err, total, truncated = _collect(task, stdin, limits.output, limits.timeout)
        err = started.stderr_head + err
        result = task.wait()
        assert result is not None
        return Run(result, out, err, total, truncated, started.denials)
    finally:
        started.close()


def _scratch_root() -> Path:
    root = isolation.DATA_DIR / "tool-scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


def sweep_scratch(data_dir: Path) -> None:
    """Removes the scratch workspaces an earlier run of the node left in `data_dir`: a crash
    skips the close that removes each, and no sandbox of that run outlives it."""
    remove_tree(data_dir / "tool-scratch")


async def run_sandboxed(
    argv: Sequence[str],
    *,
    limits: ToolLimits,
    stdin: bytes = b"",
    env: Mapping[str, str] | None = None,
    network: str = "none",
    egress: EgressPolicy | None = None,
    node_network: EgressService | None = None,
    workspace: Path | None = None,
    user: str = "65534",
    userns: bool = False,
    mounts: Sequence[Mount] = (),
    on_start: Callable[[isolation.Task], None] | None = None,
) -> Run:
    """Runs `argv` in a fresh sandbox with `limits` and waits for it off the event loop.
    Without `workspace` it gets an empty scratch directory, removed afterwards. `on_start`
    is given the sandbox once it runs (on a start thread)."""

    def start() -> Future[Run]:
        started = start_sandboxed(
            argv,
            limits=limits,
            env=env,
            network=network,
            egress=egress,
            node_network=node_network,
            workspace=workspace,
            user=user,
            userns=userns,
            mounts=mounts,
        )
        if on_start is not None:
            on_start(started.task)
        return WAITERS.submit(finish_sandboxed, started, stdin=stdin, limits=limits)

    # Shielded: a sandbox started for a caller that went meanwhile still runs to its end and
    # is removed, never left waiting for its run.
    running = await asyncio.shield(asyncio.get_running_loop().run_in_executor(SPAWNER, start))
    return await asyncio.shield(asyncio.wrap_future(running))


async def finish_off_loop(started: Started, *, stdin: bytes, limits: ToolLimits) -> Run:
    """`finish_sandboxed` on a `WAITERS` thread: it runs to its end, and removes the sandbox,
    even when the caller is cancelled meanwhile."""
    running = WAITERS.submit(finish_sandboxed, started, stdin=stdin, limits=limits)
    return await asyncio.shield(asyncio.wrap_future(running))
