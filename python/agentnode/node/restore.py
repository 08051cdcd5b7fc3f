"""Live restore: the node's tasks outlive its agent, and the agent's next start re-adopts them.

A task the node starts with `outlive` has no parent-death signal: a crash, an OOM kill or an
upgrade of the agent leaves it running, writing to its log file. Its init's pid and start time
are in its record, and the kernel records its exit status (`ExitRecorder`, pinned under bpffs),
whoever reaps it. The next start settles each task its store says was running (`Restorer.resolve`):

- its process runs (the same pid *and* start time: never a recycled pid), in a task cgroup of
  ours: re-adopted (`Adopted`), its timeout re-armed from the recorded deadline;
- its process has ended and the kernel recorded how: that outcome, with its exit code;
- otherwise (a host reboot: no process, no record): lost, which retries once by default.

Whatever is not re-adopted is killed by the cgroup sweep, which spares only the adopted tasks'
cgroups. Design and alternatives: docs/design/live-restore.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import select
import signal
import time
from dataclasses import replace
from pathlib import Path

from agentnode import _native
from agentnode.egress.policy import EgressPolicy
from agentnode.errors import AgentnodeError, UsageError
from agentnode.isolation.spec import Limits
from agentnode.isolation.task import Result, Stats, exit_reason, launcher
from agentnode.tasks.model import State, Task

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from agentnode.egress.service import TaskEgress

__all__ = [
    "Adopted",
    "Restorer",
    "egress_pins",
    "node_id",
    "pin_dir",
    "release_pins",
    "start_ticks",
]

log = logging.getLogger("agentnode.node")

_SYS_BPF = Path("/sys/fs/bpf")
# USER_HZ: /proc/PID/stat counts the start time in these.
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def start_ticks(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (None: no such process): with
    the pid, what tells one process from a later one given the same pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: the fields resume after the last ')'.
    return int(stat.rsplit(b")", 1)[1].split()[19])


def node_id(data_dir: Path) -> str:
    """The name of the node on `data_dir` among the nodes of one host."""
    return hashlib.sha256(os.fsencode(data_dir.resolve())).hexdigest()[:16]


def _is_bpffs(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == str(path) and fields[sep + 1] == "bpf":
                return True
    return False


def pin_dir(data_dir: Path) -> Path:
    """Where the node on `data_dir` pins the BPF objects that outlive it: under the host's
    bpffs at /sys/fs/bpf when one is mounted there (named for the data dir, so two nodes on
    one host keep apart), else in a bpffs the node mounts at DATA_DIR/bpf. A reboot empties
    either."""
    if _is_bpffs(_SYS_BPF):
        return _SYS_BPF / "agentnode" / node_id(data_dir)
    own = data_dir / "bpf"
    if not _is_bpffs(own):
        own.mkdir(mode=0o700, exist_ok=True)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mount(b"bpf", os.fsencode(own), b"bpf", 0, None) != 0:
            err = ctypes.get_errno()
            raise UsageError(f"cannot mount a bpffs at {own}: {os.strerror(err)} (run as root)")
    return own / "node"


def egress_pins(where: Path) -> Path:
    """Where, under the node's pin directory `where`, each task's egress enforcement is pinned
    (`agentnode.egress.service.EgressService.pins`)."""
    return where / "egress"


def release_pins(data_dir: Path) -> None:
    """Removes what `pin_dir` made (nothing may need it: no task outlives the node)."""
    where = pin_dir(data_dir)
    egress = egress_pins(where)
    for pin in egress.iterdir() if egress.is_dir() else []:
        _native.EgressHandle.remove_pins(pin)
    with contextlib.suppress(FileNotFoundError):
        egress.rmdir()
    _native.ExitRecorder.remove(where)
    own = data_dir / "bpf"
    if where.parent == own:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(os.fsencode(own), 0)
        with contextlib.suppress(OSError):
            own.rmdir()
    else:
        with contextlib.suppress(OSError):
            where.parent.rmdir()  # the last node's on this host


def _exit_of(status: int) -> tuple[int | None, int | None]:
    """(code, signal) of a wait status."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    return os.WEXITSTATUS(status), None


class Adopted:
    """A running task of an earlier node agent, re-adopted: it is not this process's child, so
    it is watched through a pidfd and its exit status read from the kernel's record; its
    cgroup is this node's to kill, read and remove. What the node uses of
    `agentnode.isolation.Task`, the same way."""

    def __init__(
        self,
        *,
        pid: int,
        ticks: int,
        pidfd: int,
        cgroup: _native.AdoptedCgroup,
        recorder: _native.ExitRecorder,
        deadline: float | None,
        limits: Limits,
    ) -> None:
        self.pid = pid
        self.ticks = ticks
        self.limits = limits
        self._pidfd = pidfd
        self._cgroup = cgroup
        self._recorder = recorder
        #: When its timeout ends (epoch seconds), as recorded at its start.
        self.deadline = deadline
        self._timed_out = False
        self._result: Result | None = None
        #: Its network (`--net egress` or `host`), once `EgressService.adopt` took it over.
        self.net: TaskEgress | None = None

    @property
    def cgroup_dir(self) -> Path | None:
        return self._cgroup.placement if self._result is None else None

    @property
    def result(self) -> Result | None:
        return self._result

    @property
    def egress(self) -> EgressPolicy | None:
        return None if self.net is None else self.net.policy

    def update_egress(self, policy: EgressPolicy) -> None:
        if self.net is None:
            raise UsageError(
                "this task has no egress policy to update (start it with --net egress)"
            )
        self.net.update(policy)

    def stats(self) -> Stats:
        if self._result is not None:
            return self._result.stats
        wall = time.clock_gettime(time.CLOCK_BOOTTIME) - self.ticks / _TICKS_PER_S
        network = {} if self.net is None else self.net.stats()
        return Stats(**self._cgroup.stats(wall), network=network)

    def exited(self) -> bool:
        """Whether its init has exited (its outcome is then the exit recorder's)."""
        return self._result is not None or _has_exited(self._pidfd)

    def signal(self, sig: int) -> None:
        if self._result is None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)

    def send_kill(self) -> None:
        if self._result is None:
            self._cgroup.kill()

    async def wait_async(self) -> Result:
        """Waits for its init to exit (killing it at its deadline), then reads how."""
        if self._result is not None:
            return self._result
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self._pidfd, readable)
        try:
            left = None if self.deadline is None else max(0.0, self.deadline - time.time())
            try:
                await asyncio.wait_for(asyncio.shield(ready), left)
            except TimeoutError:
                self._timed_out = True
                self._cgroup.kill()
                await ready
        finally:
            loop.remove_reader(self._pidfd)
        return await self._finish()

    async def _finish(self) -> Result:
        # The record is written at the last thread's exit, before the pidfd polls readable; a
        # process reaped meanwhile by someone else has it all the same.
        status = self._recorder.status(self.pid, self.ticks)
        for _ in range(50):
            if status is not None:
                break
            await asyncio.sleep(0.01)
            status = self._recorder.status(self.pid, self.ticks)
        code, sig = (None, signal.SIGKILL) if status is None else _exit_of(status)
        stats = self.stats()
        if self.net is not None:
            self.net.close()  # its counters stay readable as final ones
            stats = replace(stats, network=self.net.stats())
        self._result = Result(code, sig, exit_reason(code, sig, stats, timed_out=self._timed_out),
                              stats)  # fmt: skip
        return self._result

    def close(self) -> None:
        """Kills whatever still runs in its cgroup, removes the cgroup, stops watching it."""
        if self._result is None:
            self._cgroup.kill()
        if self.net is not None:
            self.net.close()
        self._cgroup.close()
        with contextlib.suppress(OSError):
            os.close(self._pidfd)
        with contextlib.suppress(AgentnodeError):
            self._recorder.forget(self.pid)

    def leave(self) -> None:
        """Lets the task run on, for a later start to re-adopt again."""
        if self.net is not None:
            self.net.leave()
        self._cgroup.leave()
        with contextlib.suppress(OSError):
            os.close(self._pidfd)


class Restorer:
    """Settles, at a node's start, the tasks its store says were running (see the module)."""

    def __init__(self, recorder: _native.ExitRecorder, *, node: str) -> None:
        self.recorder = recorder
        #: `node_id` of this node: its tasks' cgroups are under `k<node>`, which no other
        #: node's sweep removes.
        self.node = node
        #: Task id to (pid, start ticks, pidfd, task cgroup name) of what `resolve` re-adopted.
        self._found: dict[str, tuple[int, int, int, str]] = {}

    def resolve(self, task: Task) -> tuple[State, str, int | None] | None:
        """None if `task`'s process runs and is re-adopted (by `adopt`, once every task is
        resolved); else its outcome, reason and exit code."""
        if task.process is None:
            return State.LOST, "the node agent restarted while it ran (not to be re-adopted)", None
        pid, ticks = task.process
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            pidfd = None
        # Opened first, checked second: a pidfd names one process for good, so the start time
        # read after it is that process's (a recycled pid fails the check, never passes it).
        # An exited process not yet reaped (its parent, now init, may take its time) is no task
        # to adopt: its outcome is the recorder's.
        if pidfd is not None and start_ticks(pid) == ticks and not _has_exited(pidfd):
            name = _task_cgroup(pid, self.node)
            if name is not None:
                self._found[task.id] = (pid, ticks, pidfd, name)
                return None
            os.close(pidfd)
            return self._kill_lost(pid, ticks, "its process is not in a task cgroup of the node")
        if pidfd is not None:
            os.close(pidfd)
        status = self.recorder.status(pid, ticks)
        with contextlib.suppress(AgentnodeError):
            self.recorder.forget(pid)
        if status is None:
            return State.LOST, "it ended while no node agent ran and nothing recorded how "\
                "(a host reboot?)", None  # fmt: skip
        code, sig = _exit_of(status)
        if sig is not None:
            return State.FAILED, f"killed by signal {sig} while no node agent ran", 128 + sig
        if code == 0:
            return State.SUCCEEDED, "", 0
        return State.FAILED, f"exited with code {code} while no node agent ran", code

    def _kill_lost(self, pid: int, ticks: int, why: str) -> tuple[State, str, int | None]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # the same process: its start time was just checked
        return State.LOST, f"not re-adopted: {why}", None

    def adopt(self, tasks: dict[str, Task]) -> tuple[dict[str, Adopted], dict[str, str]]:
        """Makes the node's cgroup manager, sparing the re-adopted tasks' cgroups from the sweep
        of everything else an earlier agent left, and takes them over. `tasks`: the re-adopted
        ones by id. Returns them, and those that could not be taken over after all (killed)
        with why."""
        manager = launcher(self.node, [name for *_, name in self._found.values()])
        out, failed = {}, {}
        for task_id, (pid, ticks, pidfd, name) in self._found.items():
            task = tasks[task_id]
            try:
                cgroup = manager.adopt(name)
            except AgentnodeError as e:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                os.close(pidfd)
                failed[task_id] = f"not re-adopted: {e}"
                continue
            out[task_id] = Adopted(
                pid=pid,
                ticks=ticks,
                pidfd=pidfd,
                cgroup=cgroup,
                recorder=self.recorder,
                deadline=task.deadline,
                limits=task.spec.sandbox.limits,
            )
        self._found.clear()
        return out, failed


def _has_exited(pidfd: int) -> bool:
    """Whether the process of `pidfd` has exited: its pidfd polls readable from then on, reaped
    or not."""
    return bool(select.select([pidfd], [], [], 0)[0])


def _task_cgroup(pid: int, node: str) -> str | None:
    """`TASK`, the task cgroup of `node` process `pid` is in (None: not in one)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            parts = line[3:].strip("/").split("/")
            # /agentnode/k<node>/t<N>: the subtree `agentnode_core::cgroup::SUBTREE`.
            if len(parts) >= 3 and parts[-3] == "agentnode" and parts[-2] == f"k{node}":
                return parts[-1]
    return None
