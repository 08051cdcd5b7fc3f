"""Forks of a pre-started interpreter that join a running task: the shared core of the agents'
fork server (`agentnode.agents.forkserver`) and of `run_code`'s python sandboxes
(`agentnode.tools.pyfork`).

The task itself is started as any other (`isolation.spawn`: its cgroup and limits, its
namespaces, root, workspace, egress policy and environment), but its command is `STUB`, a
small shell script that waits. A fork server (an interpreter started once, as root on the
host, single-threaded, holding no task's data) then forks once per task; that fork, the
joiner, joins the stub's cgroups (v1 and v2), enters all its namespaces through its pidfd
(mount, network, uts, ipc, cgroup, pid), takes its root and working directory, and confines
itself as a task's command is confined at exec (`_native.confine_self`: rlimits, no
capabilities but the task's, its ids, no_new_privs, Landlock, the seccomp filter). Only then
it forks the program (the first process it makes lands in the task's pid namespace) and stays
its parent, to wait for it: a process whose parent leaves goes to the reaper of the parent's
pid namespace (the host's), not to the task's init. The stub, the task's init, is told the
program's pid (it forwards SIGTERM and SIGINT to it), then its exit status, and exits with it
(128+N when a signal N killed it).

Each request is received by a fork made before it came, never by the server: what one task
sends (its token among its environment) is in that fork's memory only, never in the memory
the next fork is copied from.

`serve` is that server (the agents'); run_code's (`agentnode.tools.pyfork`) uses `enter`, the
joiner's steps up to its confinement, in a fork it makes in the stub's pid namespace, which
needs no joiner: the server is its parent and tells the stub its status.

Only the standard library is imported here at the top (and `agentnode._native` by the
joiner): run_code's server runs this module in the sandbox's own `python3 -I`.
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
#: Descriptors a request carries: the stub's pidfd, stdout, stderr and its stdin's write end,
#: then optionally the program's stdin (without it, /dev/null).
_FDS = 4
_MAX_FDS = 5
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

    def send(self, request: Mapping[str, object], fds: Sequence[int]) -> None:
        """Sends one request with its descriptors. To `serve`'s server: join the task whose
        stub is `request["pid"]`; `fds` are its pidfd, the program's stdout and stderr, the
        write end of the stub's stdin, and optionally the program's stdin. Returns once sent:
        the stub reports the outcome."""
        import json

        sock = self._sock
        if sock is None:
            raise OSError("the fork server is not running")
        message = [json.dumps(dict(request)).encode()]
        sock.sendmsg(message, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])

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


def _join(
    request: dict[str, object], fds: list[int], program: Program, mounts: dict[str, str]
) -> NoReturn:
    """Joins one task, forks its program and waits for it: never returns.

    It is confined as the program is, in the task's cgroups and namespaces but the pid
    namespace, which the program cannot see out of."""
    pidfd, stdout, stderr, go = fds[:_FDS]
    stdin = fds[_FDS] if len(fds) > _FDS else None
    null = os.open("/dev/null", os.O_WRONLY)
    enter(request, pidfd=pidfd, stdio=(stdin, stdout, stderr), go=go, mounts=mounts)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        child = os.fork()  # in the task's pid namespace
    except OSError as e:
        fail(go, f"cannot fork the agent: {e}")
    if child == 0:
        os.close(null)
        try:
            os.write(go, f"P {os.getpid()}\n".encode())
            signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter's
            program(request, go)
        finally:
            os._exit(1)
    # The program's output ends with it (and its children), not with this process.
    for target in (1, 2):
        os.dup2(null, target)
    os.close(null)
    _, status = os.waitpid(child, 0)
    with contextlib.suppress(OSError):
        os.write(go, f"X {os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def _take(sock: socket.socket, taken: int, program: Program, mounts: dict[str, str]) -> NoReturn:
    """In a fresh fork of the server: receives the next request, says so on `taken`, and
    serves it. Never returns."""
    import json

    fds = array.array("i")
    try:
        data, ancdata, _flags, _addr = sock.recvmsg(
            _MAX_REQUEST, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize)
        )
    except OSError:
        os._exit(2)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        os._exit(2)  # the daemon is gone
    os.write(taken, b"T")
    os.close(taken)
    sock.close()
    if len(fds) not in (_FDS, _MAX_FDS):
        os._exit(1)
    try:
        request = json.loads(data)
    except ValueError:
        fail(fds[3], "the request is not JSON")
    _join(request, list(fds), program, mounts)


def serve(fd: int, program: Program, *, preload: Callable[[], None] | None = None) -> int:
    """Serves the daemon's requests on the socket whose descriptor is `fd`, each in a fork
    made before it came that joins the task and runs `program` in it; says it is ready once
    `preload` (what the forks should find imported) has run. Returns at the socket's end."""
    sock = socket.socket(fileno=fd)
    # A signal meant for the daemon's process group is not this process's to act on: its
    # socket's end is its only stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Its children, each a task's joiner, are reaped by the kernel: nothing waits on them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    if preload is not None:
        preload()
    mounts = cgroup_mounts()  # read once: every join needs it
    sock.sendall(b"R")
    while True:
        taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:
            try:
                os.close(taken_r)
                _take(sock, taken_w, program, mounts)
            finally:
                os._exit(1)
        os.close(taken_w)
        took = os.read(taken_r, 1)
        os.close(taken_r)
        if took != b"T":
            return 0  # it found the socket's end (or died): the daemon is gone
