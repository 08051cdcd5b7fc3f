"""`spawn()` and the task handle every later layer starts its work through."""

from __future__ import annotations

import _thread
import atexit
import enum
import os
import signal
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from agentnode import _native
from agentnode.egress.mode import NET_MODES
from agentnode.errors import UsageError
from agentnode.isolation.launch import USERNS_BASE, Launch
from agentnode.isolation.spec import NOBODY, Limits, Mount, Sandbox, parse_user

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from pathlib import Path
    from typing import IO, Literal

    # Only a networked task needs these, and they bring asyncio: `agentnode exec` without
    # a network starts in a fraction of the time without them.
    from agentnode.egress.enforce import Denial
    from agentnode.egress.policy import EgressPolicy
    from agentnode.egress.service import EgressService, TaskEgress

__all__ = [
    "DATA_DIR",
    "USERNS_BASE",
    "ExitReason",
    "Result",
    "Stats",
    "Task",
    "exit_reason",
    "launcher",
    "one_shot",
    "prepare_workspace",
    "spawn",
    "task_environment",
    "use_data_dir",
]

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: Where default workspaces and the staging mount point live: AGENTNODE_DATA_DIR, or what
#: `use_data_dir` set last. Read it here, as `task.DATA_DIR` (a Path; a copy imported elsewhere
#: goes stale); this module keeps it as text, so that a start needs no pathlib (with the
#: urllib.parse and ipaddress it imports, ~3 ms of `agentnode exec`).
_data_dir = os.environ.get("AGENTNODE_DATA_DIR", "/var/lib/agentnode")
if TYPE_CHECKING:
    DATA_DIR: Path


def __getattr__(name: str) -> object:
    if name == "DATA_DIR":
        from pathlib import Path

        return Path(_data_dir)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def use_data_dir(path: str | os.PathLike[str]) -> None:
    """Puts this process's default workspaces and staging mount point under `path` from the
    next start on (the node daemon calls it with its data dir, so nothing lands elsewhere).
    Raises `UsageError` for something that is not a path, or a path that is not a directory."""
    global _data_dir
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise UsageError(f"data dir: give a directory path, got {path!r}")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"data dir {os.fspath(path)!r} exists and is not a directory")
    _data_dir = os.fspath(path)


_DATA_DIR_HINT = "point AGENTNODE_DATA_DIR (or use_data_dir()) at a writable directory"


def _make_dir(path: str | os.PathLike[str], what: str, hint: str) -> None:
    """`mkdir -p path`, or a `UsageError` that names `what` failed and how to fix it."""
    if os.path.isdir(path):  # one stat: every start checks its staging dir and workspace
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot create it ({e.strerror}); {hint}") from None


if TYPE_CHECKING:
    Stdio = Literal["inherit", "pipe", "null"] | int | str | os.PathLike[str]


class ExitReason(enum.Enum):
    """Why a task ended."""

    EXITED = "exited"
    SIGNALED = "signaled"
    OOM = "oom"
    PIDS = "pids-limit"
    TIMEOUT = "timeout"


@dataclass(frozen=True, slots=True)
class Stats:
    """Accounting of one task, live or final."""

    wall_s: float
    cpu_user_s: float
    cpu_system_s: float
    memory_current: int
    memory_peak: int
    pids_current: int
    pids_peak: int
    oom_kills: int
    pids_limit_hits: int
    #: Egress counters (bytes/packets out and in, connections, DNS); empty with `--net none`.
    network: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Result:
    """How a task ended, and its final accounting."""

    code: int | None
    signal: int | None
    reason: ExitReason
    stats: Stats = field(repr=False)

    @property
    def exit_status(self) -> int:
        """Shell-style status: the code, or 128+N when killed by signal N."""
        if self.code is not None:
            return self.code
        return 128 + (self.signal or 0)


def exit_reason(code: int | None, sig: int | None, stats: Stats, *, timed_out: bool) -> ExitReason:
    """Why a task that exited with `code` or was killed by `sig` ended."""
    if timed_out:
        return ExitReason.TIMEOUT
    if stats.oom_kills > 0:
        return ExitReason.OOM
    if stats.pids_limit_hits > 0 and code != 0:
        return ExitReason.PIDS
    if sig is not None:
        return ExitReason.SIGNALED
    return ExitReason.EXITED


# threading.Lock itself, without the threading module (~0.6 ms of `agentnode exec`).
_lock = _thread.allocate_lock()
_launcher: _native.Launcher | None = None
_network: EgressService | None = None
_live: weakref.WeakSet[Task] = weakref.WeakSet()


def _instance(node: str = "", spare: Sequence[str] = ()) -> _native.Launcher:
    """This process's launcher (its node instance), made at the first start."""
    global _launcher
    with _lock:
        if _launcher is None:
            _launcher = _native.Launcher(node=node, spare=list(spare))
            atexit.register(_shutdown)
        elif node:
            raise UsageError("the launcher exists already: name the node before any start")
        return _launcher


def one_shot() -> None:
    """Declares that this process starts one task and then exits (`agentnode exec`): nothing is
    made ahead for later starts (spare task cgroups, network namespaces with their mount
    copies, zygotes), which would only be torn down again at exit: on this hybrid host some 30
    cgroup directories made and removed, a zygote cloned and killed, and three threads more on
    a busy machine. Call it before the first `spawn`, and only in a process that will start no
    other task: it holds for the whole process."""
    _native.make_nothing_ahead()


def launcher(node: str = "", spare: Sequence[str] = ()) -> _native.Launcher:
    """This process's launcher and its cgroup subtree. The first call makes it, sweeping dead
    instances' task cgroups; with a `node` name (a node daemon's), the subtree is the node's
    (`k<node>`), which other sweeps leave alone, and the earlier process's task cgroups in it
    are swept, except those named in `spare` (`TASK`: tasks the node re-adopts,
    `Launcher.adopt`)."""
    return _instance(node, spare)


def _default_network() -> EgressService:
    global _network
    with _lock:
        if _network is None:
            from agentnode.egress.service import EgressService

            _network = EgressService()
        return _network


def _forget_after_fork() -> None:
    # A forked child makes its own instance at its first start. The parent's launcher, network
    # and tasks stay the parent's: kept referenced (never dropped or closed here, which would
    # tear down the parent's), and out of this process's exit. The lock may have been held
    # at the fork.
    global _launcher, _network, _lock
    _forked.extend(x for x in (_launcher, _network) if x is not None)
    _launcher = _network = None
    _live.clear()
    _lock = _thread.allocate_lock()


_forked: list[object] = []
os.register_at_fork(after_in_child=_forget_after_fork)


def _shutdown() -> None:
    """Kills every task still alive and removes this instance's cgroups and task networks."""
    global _launcher, _network
    for task in list(_live):
        task.close()
    with _lock:
        if _launcher is not None:
            _launcher.close()
            _launcher = None
        if _network is not None:
            _network.close()
            _network = None


def _stdio_fd(
    spec: Stdio, index: int, opened: list[int], parents: list[IO[bytes] | None]
) -> int | None:
    if spec == "inherit":
        return None
    if spec == "null":
        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        opened.append(fd)
        return fd
    if spec == "pipe":
        r, w = os.pipe2(os.O_CLOEXEC)
        child, parent = (r, w) if index == 0 else (w, r)
        opened.append(child)
        parents[index] = os.fdopen(parent, "wb" if index == 0 else "rb", buffering=0)
        return child
    if isinstance(spec, int):
        return spec
    flags = os.O_RDONLY if index == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        fd = os.open(spec, flags | os.O_CLOEXEC, 0o640)
    except OSError as e:
        raise UsageError(f"cannot open {os.fspath(spec)!r} for stdio: {e.strerror}") from None
    opened.append(fd)
    return fd


def prepare_workspace(path: Path, sandbox: Sandbox) -> Path:
    """Creates `path` (a task's /workspace on the host) owned by the user the task runs as, as
    the host sees it (shifted by the user namespace base with `sandbox.userns`). A directory
    made here is removed again when it cannot be given to that user."""
    _prepare_workspace(os.fspath(path), sandbox)
    return path


def _prepare_workspace(path: str, sandbox: Sandbox) -> None:
    base = USERNS_BASE if sandbox.userns else 0
    made = not os.path.exists(path)
    _make_dir(path, "workspace", f"give a writable directory, or {_DATA_DIR_HINT}")
    try:
        os.chown(path, base + sandbox.uid, base + sandbox.gid)
    except OSError as e:
        if made:
            os.rmdir(path)
        raise UsageError(
            f"workspace {path}: cannot give it to {sandbox.user!r} ({e.strerror})"
        ) from None


_counter = 0


def _default_workspace(instance: str) -> str:
    global _counter
    with _lock:
        _counter += 1
        n = _counter
    return os.path.join(_data_dir, "workspaces", f"{instance}-{n}")


def spawn(
    argv: Sequence[str],
    sandbox: Sandbox | None = None,
    *,
    limits: Limits | None = None,
    mounts: Sequence[Mount] = (),
    env: Mapping[str, str] | None = None,
    cwd: str = "/workspace",
    user: int | str = NOBODY,
    userns: bool = False,
    network: str | EgressPolicy = "none",
    egress: EgressPolicy | None = None,
    rootfs: str | os.PathLike[str] = "/",
    hostname: str = "agentnode",
    caps: Sequence[str] = (),
    node_network: EgressService | None = None,
    on_denial: Callable[[Denial], None] | None = None,
    workspace: str | os.PathLike[str] | None = None,
    stdin: Stdio = "inherit",
    stdout: Stdio = "inherit",
    stderr: Stdio = "inherit",
    seccomp: bool = True,
    outlive: bool = False,
) -> Task:
    """Starts `argv` isolated (new pid, mount, uts, ipc, net and cgroup namespaces, read-only root,
    no capabilities, seccomp) in a fresh cgroup as `sandbox` says; returns once it has exec'd.

    `sandbox` is the task's whole spec (`agentnode.isolation.spec`). Without it, the keywords
    from `limits` to `caps` make one (the same fields; `network` may also be an `EgressPolicy`,
    short for "egress" with that policy, or the path of a network namespace to join,
    `/run/netns/NAME`, which only this keyword form can ask for).

    Networks: "none" (a fresh namespace with loopback only); "egress" (a namespace on the node
    bridge, reaching what the egress policy allows); "host" (the host's namespace, with the
    policy enforced but host loopback reachable: weaker). The policy is in force before the
    task's first instruction. `node_network` is the bridge and DNS forwarder to use (default:
    one per process, on agentnode0). `on_denial` receives each connection or packet the policy
    denies, from the task's first instruction on.
    The environment holds only PATH, LANG, HOME and the sandbox's `env`.
    Every capability is dropped except the sandbox's `caps`, which the task keeps (as ambient
    capabilities when the user is not 0).
    Call from a long-lived thread: the task is SIGKILLed when the thread that cloned it exits
    (the spawning thread, or for a task started from a zygote the pool's, which ends with the
    launcher). With `outlive`, once it has exec'd it runs on after that (the node's
    tasks, which its next start re-adopts); it still never starts if the spawner died first.
    """
    netns = None
    if sandbox is None:
        if isinstance(network, str) and network not in NET_MODES:
            netns, network = network, "none"
            if not os.path.exists(netns):
                raise UsageError(
                    f"network {netns!r}: give none, egress, host or an existing network "
                    "namespace path"
                )
        sandbox = _sandbox_of(
            limits, mounts, env, cwd, user, userns, network, egress, rootfs, hostname, caps
        )
    if not argv:
        raise UsageError("a command is required (e.g. agentnode exec -- /bin/true)")
    sandbox.check_host()
    mode, policy = sandbox.egress()
    limits = sandbox.limits
    instance = _instance()
    stage = os.path.join(_data_dir, "stage")
    _make_dir(stage, "staging directory", _DATA_DIR_HINT)
    # Last of the checks that can fail: a workspace made for this start goes with a failed one.
    if workspace is None:
        ws = _default_workspace(instance.name)
        _prepare_workspace(ws, sandbox)
    else:
        ws = os.fspath(workspace)
        _make_dir(ws, "workspace", "give a writable directory")
    full_env = task_environment(sandbox)
    opened: list[int] = []
    parents: list[IO[bytes] | None] = [None, None, None]
    net: TaskEgress | None = None
    try:
        if policy is not None:
            service = node_network or _default_network()
            net = service.prepare(
                "egress" if mode == "egress" else "host", policy, on_denial=on_denial
            )
            # `host` keeps the spawner's network namespace (the host's); without a path to join,
            # the task would get a fresh, empty one.
            netns = net.netns_path or f"/proc/{os.getpid()}/ns/net"
        fds = tuple(_stdio_fd(s, i, opened, parents) for i, s in enumerate((stdin, stdout, stderr)))
        launch = Launch.of(
            sandbox,
            argv,
            env=full_env,
            stage=stage,
            workspace=ws,
            netns=netns,
            stdio=(fds[0], fds[1], fds[2]),
            seccomp=seccomp,
            outlive=outlive,
        )
        native = instance.start(launch, before_start=None if net is None else net.attach)
    except BaseException:
        if net is not None:
            net.close()
        if workspace is None:
            os.rmdir(ws)  # made for this task a moment ago: a failed spawn leaves nothing behind
        for p in parents:
            if p is not None:
                p.close()
        raise
    finally:
        for fd in opened:
            os.close(fd)
    task = Task(native, limits=limits, workspace=ws, stdio=parents, net=net)
    _live.add(task)
    return task


def task_environment(sandbox: Sandbox) -> dict[str, str]:
    """A task's whole environment: PATH, LANG and HOME, then the sandbox's `env`."""
    return {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": "/workspace", **dict(sandbox.env)}


def _sandbox_of(
    limits: Limits | None,
    mounts: Sequence[Mount],
    env: Mapping[str, str] | None,
    cwd: str,
    user: int | str,
    userns: bool,
    network: str | EgressPolicy,
    egress: EgressPolicy | None,
    rootfs: str | os.PathLike[str],
    hostname: str,
    caps: Sequence[str],
) -> Sandbox:
    """The `Sandbox` of `spawn`'s keyword form."""
    from agentnode.egress.policy import EgressPolicy  # not needed by a start from a Sandbox

    if isinstance(network, EgressPolicy):
        egress, network = network, "egress"
    if egress is not None and network not in ("egress", "host"):
        raise UsageError(f"network {network!r} takes no egress policy (use 'egress' or 'host')")
    rules: dict[str, object] = {}
    if egress is not None:
        rules = {"allow": egress.allow, "allow_hosts": egress.hosts, "publish": egress.publish,
                 "egress_rate": egress.rate, "conn_rate": egress.conn_rate}  # fmt: skip
    uid, gid = parse_user(user)
    return Sandbox(
        limits=limits or Limits(),
        mounts=tuple(mounts),
        env=tuple((env or {}).items()),
        cwd=cwd,
        uid=uid,
        gid=gid,
        userns=userns,
        network=network,
        rootfs=os.fspath(rootfs),
        hostname=hostname,
        caps=tuple(caps),
        **rules,  # type: ignore[arg-type]
    )


class Task:
    """A running isolated task. Use as a context manager, or call `close()`, to be sure it is
    killed, reaped and its cgroups removed."""

    __slots__ = (
        "__weakref__",
        "_deadline",
        "_native",
        "_net",
        "_net_later",
        "_result",
        "_timed_out",
        "_workspace",
        "limits",
        "stderr",
        "stdin",
        "stdout",
    )

    def __init__(
        self,
        native: _native.NativeTask,
        *,
        limits: Limits,
        workspace: str,
        stdio: list[IO[bytes] | None],
        net: TaskEgress | None = None,
    ) -> None:
        self._native = native
        self._net = net
        self._net_later = False
        self.limits = limits
        self._workspace = workspace
        self.stdin, self.stdout, self.stderr = stdio
        self._deadline = None if limits.timeout is None else time.monotonic() + limits.timeout
        self._timed_out = False
        self._result: Result | None = None

    def close_network_later(self) -> None:
        """Has the task's end leave its network's teardown (BPF programs, veth, netns) to its
        egress service's background thread (`EgressService.retire`): its denials and counters
        are still final when `wait` returns. For a caller that answers someone at the task's
        end (a tool call): the teardown costs tens of ms."""
        self._net_later = True

    def start_clock(self, timeout: float | None) -> None:
        """Counts the task's timeout from now (None: none): for a task made ahead of the work
        it is then given, whose time starts with that work."""
        self._deadline = None if timeout is None else time.monotonic() + timeout

    @property
    def workspace(self) -> Path:
        """The host directory bound at /workspace."""
        from pathlib import Path  # not before: a start needs none (see DATA_DIR)

        return Path(self._workspace)

    @property
    def pid(self) -> int:
        """The task's init, as the host sees it."""
        return self._native.pid

    @property
    def start_ticks(self) -> int | None:
        """For a task started with `outlive`: its init's start time in clock ticks since boot,
        which tells it from a later process given the same pid (read by the launcher at the
        start; None if its init was gone by then). None for the other tasks."""
        return self._native.start_ticks

    @property
    def pidfd(self) -> int:
        """A pidfd of the task's init (this handle's: do not close it)."""
        return self._native.pidfd

    @property
    def cgroup_dir(self) -> Path | None:
        """The task's cgroup2 directory (where egress BPF programs attach); None once reaped."""
        return self._native.cgroup_dir if self._result is None else None

    @property
    def result(self) -> Result | None:
        return self._result

    def _finish(self, exit: tuple[int | None, int | None]) -> Result:
        if self._result is None:
            stats = self.stats()
            code, sig = exit
            reason = exit_reason(code, sig, stats, timed_out=self._timed_out)
            if self._net is not None:
                if self._net_later:
                    self._net.close_later()
                else:
                    self._net.close()
                stats = replace(stats, network=self._net.stats())
            self._result = Result(code, sig, reason, stats)
            _live.discard(self)
        return self._result

    def _time_out(self) -> Result:
        self._timed_out = True
        self._native.kill()
        exit = self._native.wait(None)
        assert exit is not None
        return self._finish(exit)

    def wait(self, timeout: float | None = None) -> Result | None:
        """Waits up to `timeout` seconds (None: until it ends); None if it is still running.
        Enforces `limits.timeout`, killing the whole task when it passes."""
        if self._result is not None:
            return self._result
        wait_for = timeout
        if self._deadline is not None:
            left = max(0.0, self._deadline - time.monotonic())
            wait_for = left if timeout is None else min(timeout, left)
        exit = self._native.wait(wait_for)
        if exit is not None:
            return self._finish(exit)
        if self._deadline is not None and time.monotonic() >= self._deadline:
            return self._time_out()
        return None

    async def wait_async(self) -> Result:
        """Waits without blocking the event loop: the pidfd becomes readable when init exits."""
        if self._result is not None:
            return self._result
        import asyncio  # already loaded: the caller runs on a loop

        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self._native.pidfd

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, readable)
        try:
            left = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
            try:
                await asyncio.wait_for(asyncio.shield(ready), left)
            except TimeoutError:
                # The deadline and the exit can come due in one turn of a loop that could not
                # run (a stopped or stalled daemon): a task that ended by itself did not time out.
                exit = self._native.wait(0)
                return self._time_out() if exit is None else self._finish(exit)
        finally:
            loop.remove_reader(fd)
        # Readable means exited, so this returns at once; but reaping reads the final accounting
        # from the cgroup files (~0.2 ms), which a daemon's event loop should not wait for.
        exit = await loop.run_in_executor(None, self._native.wait, None)
        assert exit is not None
        return self._finish(exit)

    def signal(self, sig: int) -> None:
        """Sends `sig` to the task's init (through its pidfd)."""
        self._native.signal(sig)

    def terminate(self, grace: float = 5.0) -> Result:
        """SIGTERM to the task's init, then kills the whole task after `grace` seconds."""
        if self._result is not None:
            return self._result
        self._native.signal(signal.SIGTERM)
        exit = self._native.wait(grace)
        if exit is None:
            self._native.kill()
            exit = self._native.wait(None)
        assert exit is not None
        return self._finish(exit)

    def kill(self) -> Result:
        """SIGKILLs every process of the task and reaps it."""
        if self._result is not None:
            return self._result
        self._native.kill()
        exit = self._native.wait(None)
        assert exit is not None
        return self._finish(exit)

    def send_kill(self) -> None:
        """SIGKILLs every process of the task (cgroup.kill) without waiting: `wait_async`
        then returns (a reaped, killed task)."""
        if self._result is None:
            self._native.kill()

    def leave(self) -> None:
        """Lets a task started with `outlive` run on without this handle: neither this process's
        exit nor the handle's close kills it, and its cgroups stay. Its egress, if any, stays
        in force (`TaskEgress.leave`): a task whose service does not pin it cannot be left."""
        if self._net is not None:
            self._net.leave()  # first: it refuses when the policy could not stay in force
        self._native.leave()
        _live.discard(self)

    def freeze(self) -> None:
        """Stops every process of the task (cgroup.freeze) until `thaw()`."""
        self._native.set_frozen(True)

    def thaw(self) -> None:
        self._native.set_frozen(False)

    def stats(self) -> Stats:
        """Accounting: live while it runs, final after it ended."""
        if self._result is not None:
            return self._result.stats
        network = self._net.stats() if self._net is not None else {}
        return Stats(**self._native.stats(), network=network)

    def usage(self) -> tuple[float, int] | None:
        """`(cpu_s, memory_peak)` while it runs, from two cgroup files (`stats` reads eight:
        ~0.3 ms, too much to take before and after every tool call); None once it ended."""
        return None if self._result is not None else self._native.usage()

    @property
    def egress(self) -> EgressPolicy | None:
        """The egress policy in force (None with `--net none` or a joined netns)."""
        return None if self._net is None else self._net.policy

    def poll_denials(self) -> None:
        """Delivers this running task's queued egress denials to its `on_denial` now."""
        if self._net is not None:
            self._net.poll_denials()

    def update_egress(self, policy: EgressPolicy) -> None:
        """Replaces the task's egress policy live: its next connection follows `policy`."""
        if self._net is None:
            raise UsageError(
                "this task has no egress policy to update (start it with --net egress)"
            )
        self._net.update(policy)

    def close(self) -> None:
        """Kills and reaps the task if it still runs, removes its cgroups, closes pipes."""
        if self._result is None:
            self.kill()
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                f.close()

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
