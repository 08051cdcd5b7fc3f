"""Forks of a pre-started interpreter that join a running task: the shared core of the agents'
fork server (`agentnode.agents.forkserver`) and of `run_code`'s python sandboxes
(`agentnode.tools.pyfork`).

The task itself is started as any other (`isolation.spawn`: its cgroup and limits, its
namespaces, root, workspace, egress policy and environment), but its command is `STUB`, a
small shell script that waits. A fork server (an interpreter started once, as root on the
host, single-threaded, holding no task's data; `serve`) then takes the stub's pid namespace
as the one its children are made in (`setns`) and forks once: its child is the task's second
process. The child receives its request over a socket of its own, joins the stub's cgroups
(v1 and v2), enters all its namespaces through its pidfd (mount, network, uts, ipc, cgroup),
takes its root and working directory, and confines itself as a task's command is confined at
exec (`enter`; `_native.confine_self`: rlimits, no capabilities but the task's, its ids,
no_new_privs, Landlock, the seccomp filter); then it runs the program. The server is its
parent: it reaps it and tells the stub, the task's init, its exit status, which the stub exits
with (128+N when a signal N killed it); the stub was told the program's pid first (it forwards
SIGTERM and SIGINT to it).

The server sees descriptors only (the stub's pidfd, its stdin's write end, the child's
socket), never a request: what one task sends (its token among its environment) is in that
fork's memory only, never in the memory the next fork is copied from.

Only the standard library is imported here at the top (and `agentnode._native` by the
server): run_code's server runs this module in the sandbox's own `python3 -I`.
"""

from __future__ import annotations

import array
import contextlib
import os
import signal
import socket
import time

TYPE_CHECKING = False  # not typing's: run_code's server imports as little as it can
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Mapping, Sequence
    from typing import NoReturn

    from agentnode.isolation.spec import Sandbox

    #: What the server's forks run once joined and confined: the program (the request, the
    #: write end of the stub's stdin). It never returns.
    Program = Callable[[dict[str, object], int], NoReturn]

__all__ = [
    "STUB",
    "ForkServerProcess",
    "cgroup_mounts",
    "enter",
    "exit_status",
    "fail",
    "huge_pages",
    "identity",
    "serve",
    "stub_argv",
]

#: Seconds between two starts of a fork server that died (one that dies at once is not
#: started again for every task).
RESTART_S = 5.0

#: The task's init while its program runs, a POSIX shell script (0.6 ms of CPU to start,
#: against 16 ms for an interpreter). Its stdin says `P PID` when the program runs (then
#: SIGTERM and SIGINT sent to the task are forwarded to it), `X CODE` when it ended
#: (`waitstatus_to_exitcode`'s: the stub exits with it, 128+N for a signal N), or `E WHY` when
#: it could not start; an end without `X` is a failure too. A trapped signal ends a `read`
#: early (status 1, as at the end of input): the trap's flag tells the two apart. The original
#: command follows as the script's arguments, for `ps` and the exec audit.
STUB = """\
pid= sig=
trap 'sig=1; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' TERM
trap 'sig=1; [ -n "$pid" ] && kill -INT "$pid" 2>/dev/null' INT
while :; do
    read -r word rest
    got=$?
    if [ "$got" -ne 0 ]; then
        [ -n "$sig" ] && { sig=; continue; }
        break
    fi
    case $word in
        P) pid=$rest ;;
        X) [ "$rest" -lt 0 ] && exit $((128 - rest)); exit "$rest" ;;
        E) echo "agentnode: the node's pre-imported interpreter could not start this agent:" \
               "$rest" >&2; exit 1 ;;
    esac
done
echo "agentnode: the agent's fork ended without its status (the fork server is gone, or" \
     "confining it failed)" >&2
exit 1
"""

_CLONE_NEWNS = 0x00020000
_CLONE_NEWCGROUP = 0x02000000
_CLONE_NEWUTS = 0x04000000
_CLONE_NEWIPC = 0x08000000
_CLONE_NEWPID = 0x20000000
_CLONE_NEWNET = 0x40000000
#: Every namespace a task has (without a user namespace), entered at once through a pidfd.
_TASK_NAMESPACES = (
    _CLONE_NEWNS | _CLONE_NEWCGROUP | _CLONE_NEWUTS | _CLONE_NEWIPC | _CLONE_NEWPID | _CLONE_NEWNET
)
#: The most a request (its JSON: the program's environment among it) may be.
_MAX_REQUEST = 1 << 20


def stub_argv(name: str) -> list[str]:
    """The command a joined task is started with; the original one follows it (`name` is the
    script's `$0`, as `ps` shows it)."""
    return ["/bin/sh", "-c", STUB, name]


def exit_status(e: SystemExit) -> int:
    """The status an interpreter exits with for `e` (a code that is not an int is printed to
    stderr, and the status is 1)."""
    if e.code is None or isinstance(e.code, int):
        return e.code or 0
    import sys

    print(e.code, file=sys.stderr)
    return 1


def identity(sandbox: Sandbox) -> dict[str, object]:
    """The part of a request that says who the program runs as, where, with what environment:
    what `sandbox` gives a task's command at exec."""
    from agentnode.isolation.task import task_environment

    return {
        "env": task_environment(sandbox),
        "cwd": sandbox.cwd,
        "uid": sandbox.uid,
        "gid": sandbox.gid,
        "keep_caps": sandbox.cap_numbers(),
        "nofile": sandbox.limits.nofile,
    }


class ForkServerProcess:
    """The daemon's side of a fork server: started on first use, then handed tasks to join."""

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str]) -> None:
        import threading

        #: The server's command; the descriptor of its socket is appended.
        self._argv = list(argv)
        self._env = dict(env)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._closed = False
        #: When the server was last started (a dead one is replaced RESTART_S after it).
        self._started_at = 0.0

    @property
    def closed(self) -> bool:
        """Whether `close` was called (a request sent meanwhile fails)."""
        return self._closed

    def _started(self) -> bool:
        """Whether the server is ready; the first call starts it (and says no)."""
        import subprocess

        with self._lock:
            if self._closed:
                return False
            if self._proc is not None and self._proc.poll() is not None:
                # It died (killed from outside, a bug): starts go the usual way, and another
                # is started, at most once every RESTART_S.
                if time.monotonic() < self._started_at + RESTART_S:
                    return False
                if self._sock is not None:
                    self._sock.close()
                self._proc, self._sock, self._ready = None, None, False
            if self._proc is None:
                self._started_at = time.monotonic()
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                with theirs:
                    # Its stdout is not a terminal: a program's `sys.stdout` is made at the
                    # server's start, and is block-buffered as a fresh interpreter's on a pipe.
                    self._proc = subprocess.Popen(
                        [*self._argv, str(theirs.fileno())],
                        pass_fds=[theirs.fileno()],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        env=self._env,
                        cwd="/",
                    )
                self._sock = ours
                return False
            if not self._ready and self._sock is not None:
                with contextlib.suppress(BlockingIOError):
                    self._ready = self._sock.recv(1, socket.MSG_DONTWAIT) == b"R"
            return self._ready and self._proc.poll() is None

    def send(
        self, request: Mapping[str, object], *, pidfd: int, go: int, stdio: Sequence[int]
    ) -> None:
        """Hands the server a task to join: the stub's `pidfd` and the write end of its stdin
        (`go`) go to the server, `request` (`"pid"`, the stub's, and `identity`'s) and `stdio`
        (the program's stdin, stdout and stderr) to its fork only, over a socket of their own.
        Returns once sent: the stub reports the outcome."""
        import json

        sock = self._sock
        if sock is None:
            raise OSError("the fork server is not running")
        ask, told = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ask, told:
            rights = array.array("i", [pidfd, go, told.fileno()])
            sock.sendmsg([b"{}"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
            ask.sendmsg([json.dumps(dict(request)).encode()],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", stdio))])  # fmt: skip

    def close(self) -> None:
        """Stops the server (the programs it started are their tasks' and run on)."""
        import subprocess

        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()  # it exits at the end of its socket
            if self._proc is not None:
                try:
                    self._proc.wait(10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()


# -- the fork server process -----------------------------------------------------------------


def cgroup_mounts() -> dict[str, str]:
    """Where each cgroup hierarchy is mounted: cgroup2 under "", each v1 hierarchy under each
    of its controllers (and `name=` options)."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            fstype, options = fields[sep + 1], fields[sep + 3].split(",")
            if fstype == "cgroup2":
                mounts.setdefault("", fields[4])
            elif fstype == "cgroup":
                for option in options:
                    mounts.setdefault(option, fields[4])
    return mounts


def _cgroup_joins(pid: int, mounts: dict[str, str]) -> list[str]:
    """The files this process joins `pid`'s cgroups through (those it is not in already): the
    `tasks` file of each v1 hierarchy and `cgroup.procs` of cgroup2. A thread that moves itself
    through `tasks` skips the global lock a move of a whole process takes (its RCU grace
    period cost a join up to 20 ms); this process is single-threaded, so its thread is all of
    it."""
    with open("/proc/self/cgroup") as f:
        mine = set(f.read().splitlines())
    files = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f.read().splitlines():
            _, controllers, path = line.split(":", 2)
            first = controllers.split(",")[0]
            if first in mounts and line not in mine:
                name = "cgroup.procs" if first == "" else "tasks"
                files.append(f"{mounts[first]}{path.rstrip('/')}/{name}")
    return files


def _identity(request: dict[str, object]) -> tuple[int, int, list[int], int]:
    """The uid, gid, kept capabilities and open-file limit a request asks for."""
    uid, gid, caps, nofile = (request[k] for k in ("uid", "gid", "keep_caps", "nofile"))
    if not (
        isinstance(uid, int)
        and isinstance(gid, int)
        and isinstance(nofile, int)
        and isinstance(caps, list)
        and all(isinstance(c, int) for c in caps)
    ):
        raise ValueError(f"bad identity in the request: {uid!r} {gid!r} {caps!r} {nofile!r}")
    return uid, gid, caps, nofile


def fail(go: int, text: str) -> NoReturn:
    """Tells the stub (`go`) why its program could not start (one line), and exits."""
    with contextlib.suppress(OSError):  # the task is gone already
        os.write(go, b"E " + b" ".join(text.encode().split())[:300] + b"\n")
    os._exit(1)


def enter(
    request: dict[str, object],
    *,
    pidfd: int,
    stdio: tuple[int | None, int, int],
    go: int,
    mounts: dict[str, str],
) -> None:
    """Joins the task whose stub `request["pid"]` (its `pidfd`) is: its cgroups, all its
    namespaces (the pid namespace for the children made from now on), its root and working
    directory; takes `stdio` (stdin None: /dev/null; each descriptor closed) and confines
    itself as the task's command is (`_native.confine_self`). A step that fails tells the stub
    (`E`, or the confinement's record) and ends the process: never half joined or confined.
    For a single-threaded process; `mounts` is `cgroup_mounts()`'s."""
    import ctypes

    stdin, stdout, stderr = stdio
    pid = request["pid"]
    try:
        assert isinstance(pid, int)
        # The stub's pidfd pins the pid it names while the files are read.
        for procs in _cgroup_joins(pid, mounts):
            with open(procs, "w") as f:
                f.write("0")
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(pidfd, _TASK_NAMESPACES) != 0:
            raise OSError(ctypes.get_errno(), "cannot enter the task's namespaces")
        os.fchdir(root)
        os.chroot(".")
        os.chdir(str(request["cwd"]))
        if stdin is None:
            stdin = os.open("/dev/null", os.O_RDONLY)
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        for fd in (stdin, root, pidfd, stdout, stderr):
            os.close(fd)
        uid, gid, keep_caps, nofile = _identity(request)
    except (OSError, AssertionError, KeyError, ValueError) as e:
        fail(go, f"cannot join the task: {e}")
    from agentnode import _native

    # A failed step writes its 8-byte record to the stub and exits 127: never half confined.
    _native.confine_self(uid=uid, gid=gid, keep_caps=keep_caps, nofile=nofile, seccomp=True,
                         err=go)  # fmt: skip


def _tell(go: int, line: str) -> None:
    with contextlib.suppress(OSError):  # the stub is gone already
        os.write(go, line.encode()[:300] + b"\n")


def _reap(stubs: dict[int, int]) -> None:
    """Reaps the ended children and tells each one's stub its status."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        go = stubs.pop(pid, None)
        if go is not None:
            _tell(go, f"X {os.waitstatus_to_exitcode(status)}")
            os.close(go)


def _child(pidfd: int, go: int, told: int, mounts: dict[str, str], program: Program) -> NoReturn:
    """The server's child, in the task's pid namespace: receives its request on `told`, joins
    the task, runs the program. Never returns."""
    import json

    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        channel = socket.socket(fileno=told)
        fds = array.array("i")
        data, ancdata, _flags, _addr = channel.recvmsg(
            _MAX_REQUEST, socket.CMSG_SPACE(3 * fds.itemsize)
        )
        channel.close()
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if len(fds) != 3:
            fail(go, "the request came without its stdio")
        try:
            request = json.loads(data)
        except ValueError:
            fail(go, "the request is not JSON")
        enter(request, pidfd=pidfd, stdio=(fds[0], fds[1], fds[2]), go=go, mounts=mounts)
        os.write(go, f"P {os.getpid()}\n".encode())
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter's
        program(request, go)
    finally:
        os._exit(1)


_HUGE_PAGE = 2 << 20
_MADV_COLLAPSE = 25


def huge_pages() -> int:
    """Backs this process's private anonymous memory (its heap and its allocators' mappings)
    with 2 MiB pages where it can (`MADV_COLLAPSE`, Linux 6.1; each 2 MiB-aligned stretch of
    those mappings), and returns how many it made (0: the kernel has none to give, or THP is
    `never`). For a server whose forks inherit what it imported: a fork copies one entry per
    2 MiB instead of 512, and its exit unmaps as many, where a fork touches nothing of a
    stretch (a write to one splits it to 4 KiB pages in that fork alone)."""
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    made = 0
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    for line in maps:
        fields = line.split()
        if fields[1] != "rw-p" or fields[5:] not in ([], ["[heap]"]):
            continue
        low, high = (int(x, 16) for x in fields[0].split("-"))
        start, end = -(-low // _HUGE_PAGE) * _HUGE_PAGE, high // _HUGE_PAGE * _HUGE_PAGE
        for addr in range(start, end, _HUGE_PAGE):
            at, size = ctypes.c_void_p(addr), ctypes.c_size_t(_HUGE_PAGE)
            # Each stretch on its own: one the kernel cannot make (no free 2 MiB page, a
            # mapping it refuses) leaves the others to be made.
            if madvise(at, size, _MADV_COLLAPSE) == 0:
                made += 1
    return made


def serve(fd: int, program: Program, *, preload: Callable[[], None] | None = None) -> int:
    """Serves the node's requests on the socket whose descriptor is `fd` until its end; says it
    is ready once `preload` (what the forks should find made) has run and its heap is frozen.

    A request is a stub's pidfd, the write end of its stdin and a socket the rest comes on: the
    server's next child is made in the stub's pid namespace (the task's second process),
    receives the request there (who it runs as, where, its stdin, stdout and stderr), joins
    the task (`enter`) and runs `program`. The server is its parent: it reaps it and tells the
    stub its status. It never sees a request itself, nor anything a program reads or writes:
    what one task sends (its token among its environment) is in its own fork's memory only,
    never in the memory the next fork is copied from."""
    import ctypes
    import gc
    import json  # noqa: F401  (each child reads its request with it: 3-5 ms of CPU to import)
    import select

    from agentnode import _native  # noqa: F401  (for the children)

    sock = socket.socket(fileno=fd)
    # A signal meant for the node's process group is not this process's to act on: its
    # socket's end is its only stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the select below
    if preload is not None:
        preload()
    mounts = cgroup_mounts()  # read once: every join needs it
    own_pid_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    #: The stub (its stdin's write end) of each child still running.
    stubs: dict[int, int] = {}
    # Out of the collector's sight: a collection in a fork would touch every object the
    # server made (copying each page it is on), the interpreter's own start among them.
    gc.freeze()
    sock.sendall(b"R")
    while True:
        readable = select.select([sock.fileno(), wake_r], [], [])[0]
        if wake_r in readable:
            while True:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    break
            _reap(stubs)
        if sock.fileno() not in readable:
            continue
        fds = array.array("i")
        try:
            data, ancdata, _flags, _addr = sock.recvmsg(64, socket.CMSG_SPACE(3 * fds.itemsize))
        except OSError:  # reset by a node that stopped with a request unread: gone as well
            data, ancdata = b"", []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not data:
            for x in fds:
                os.close(x)
            # The node is gone. Running children run on, their stub's now: an agent tells its
            # stub its status itself (a run_code sandbox's stub learns the end of its input).
            return 0
        if len(fds) != 3:
            for x in fds:
                os.close(x)
            continue
        pidfd, go, told = fds
        if libc.setns(pidfd, _CLONE_NEWPID) != 0:
            _tell(go, f"E cannot enter the task's pid namespace: {os.strerror(ctypes.get_errno())}")
            for x in fds:
                os.close(x)
            continue
        try:
            child = os.fork()  # in the task's pid namespace
        except OSError as e:
            child = -1
            _tell(go, f"E cannot fork: {e}")
        if child == 0:
            for x in (wake_r, wake_w, own_pid_ns, *stubs.values()):
                os.close(x)
            stubs.clear()
            sock.close()
            _child(pidfd, go, told, mounts, program)
        if libc.setns(own_pid_ns, _CLONE_NEWPID) != 0:
            return 1  # its next child would land in that task: better none
        os.close(pidfd)
        os.close(told)
        if child > 0:
            stubs[child] = go
        else:
            os.close(go)
