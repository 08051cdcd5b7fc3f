"""`run_code`'s python sandboxes as forks of a pre-started `python3 -I` instead of fresh ones.

Back to back, fresh python calls use up their sandboxes made ahead faster than they are made:
each is an interpreter start (~12 ms of CPU). So the runner keeps one `python3 -I`, the same
interpreter a sandbox runs, started once by the node as root on the host, single-threaded, that
has imported nothing of a call's (`PythonForks`), and makes each sandbox's interpreter a fork
of it. The task is started as usual (`isolation.spawn`: its cgroup and limits, namespaces,
workspace, network and egress policy) with a waiting shell stub as its command
(`forkjoin.STUB`); the server then forks once, with the stub's pid namespace as the one its
children are made in (`setns`), so its child is the task's second process. The child receives
its request (who it runs as, where, its stdio) over a socket of its own, joins the stub's
cgroups and namespaces, takes its root and working directory, confines itself as the task's
command is confined at exec (`forkjoin.enter`: rlimits, capabilities, ids, no_new_privs,
Landlock, seccomp), and waits for the code on stdin. The server is its parent: it reaps it and
tells the stub its status, which the stub exits with. A sandbox then costs a task start and a
fork, not an interpreter start.

The server sees descriptors only (the stub's pidfd, its stdin's write end, the child's socket),
never a request nor anything a program reads or writes: a fork carries nothing of another
call. What the call's code finds is what a fresh `python3 -I -` finds: `__main__` as the
interpreter made it, `sys.argv == ["-"]`, `sys.path` as at start, none of the modules the
server imported for itself (`agentnode`, `json`, `ctypes`, ...), the task's environment, stdin,
stdout and stderr, its /proc files its own (dumpable, as after an exec). At its end non-daemon
threads are joined and `atexit` functions run, as at an interpreter's exit. What it shares with
the other forks: the interpreter's start (its `str` hash seed among it), nothing of any call.

Not served (started the usual way): callers with a user namespace, and calls until the server
is ready (it starts with the runner's first python call); a fork that fails to get ready is
replaced by an interpreter start.
"""

from __future__ import annotations

import array
import contextlib
import gc
import json
import os
import signal
import socket

from agentnode.isolation.forkjoin import (
    ForkServerProcess,
    cgroup_mounts,
    enter,
    exit_status,
    fail,
    identity,
    stub_argv,
)

TYPE_CHECKING = False  # not typing's: the server imports this module in its own python3
if TYPE_CHECKING:
    from pathlib import Path
    from typing import NoReturn

    from agentnode.egress.policy import EgressPolicy
    from agentnode.egress.service import EgressService
    from agentnode.tools.registry import ToolLimits
    from agentnode.tools.sandboxed import Started

__all__ = ["STDIN_MAIN", "PythonForks"]

#: What a python sandbox runs: the interpreter starts (most of a call's time) before the code
#: exists, says so on stderr (`READY`, which the node takes off), then runs what arrives on
#: stdin as `python3 -I -` would: in `__main__`, named `<stdin>`, with `sys.argv == ["-"]`,
#: its tracebacks and exit status as the interpreter's own.
STDIN_MAIN = """\
def _agentnode_main():
    import os, sys
    os.write(2, b"\\0agentnode-ready\\n")
    del os
    scope = sys.modules["__main__"].__dict__
    del scope["_agentnode_main"]
    scope.update(__file__="<stdin>", __cached__=None)
    source = sys.stdin.buffer.read()
    sys.argv[0] = "-"
    try:
        code = compile(source, "<stdin>", "exec")
    except (SyntaxError, ValueError) as e:
        sys.excepthook(type(e), e, e.with_traceback(None).__traceback__)
        raise SystemExit(1) from None
    del sys, source
    try:
        exec(code, scope)
    except SystemExit:
        raise
    except BaseException as e:
        import sys
        e = e.with_traceback(e.__traceback__.tb_next)  # from the code's own first frame
        sys.excepthook(type(e), e, e.__traceback__)
        raise SystemExit(1) from None
_agentnode_main()
"""
READY = b"\0agentnode-ready\n"
_CLONE_NEWPID = 0x20000000
_PR_SET_DUMPABLE = 4

#: The server's `-c` program: it notes what a fresh interpreter has (its `__main__`, modules
#: and path, for the forks to return to), then serves. Its arguments: the directory agentnode
#: is imported from, the socket's descriptor.
_BOOT = """\
def _agentnode_boot(main=dict(globals())):
    import sys
    modules, path = set(sys.modules), list(sys.path)
    sys.path.insert(0, sys.argv[1])
    from agentnode.tools.pyfork import serve_python
    raise SystemExit(serve_python(int(sys.argv[2]), main=main, modules=modules, path=path))
_agentnode_boot()
"""


class PythonForks(ForkServerProcess):
    """The node's side: the server (started on first use) and the sandboxes made from it."""

    def __init__(self) -> None:
        import shutil

        from agentnode.isolation.spec import Sandbox
        from agentnode.isolation.task import SAFE_PATH, task_environment

        # The python3 a sandbox would run: the forks must be what a fresh start would be.
        self.python = shutil.which("python3", path=SAFE_PATH)
        package = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        super().__init__(
            [self.python or "python3", "-I", "-c", _BOOT, package],
            env=task_environment(Sandbox()),
        )

    def serves(self, *, userns: bool) -> bool:
        """Whether a sandbox for a caller (with a user namespace or not) can be a fork: the
        first call that could starts the server; until it is ready, this says no."""
        return not userns and self.python is not None and self._started()

    def start(
        self,
        *,
        limits: ToolLimits,
        network: str,
        egress: EgressPolicy | None,
        node_network: EgressService | None,
        workspace: Path | None,
        user: str,
    ) -> Started:
        """A sandbox with `limits` (no timeout yet) whose interpreter is a fork of the server,
        as `start_sandboxed` makes one. Call on a `SPAWNER` thread. OSError: the server is
        gone (nothing is left running)."""
        from agentnode.isolation.spec import Sandbox, parse_user
        from agentnode.tools.sandboxed import sandbox_limits, start_sandboxed

        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        code_r, code_w = os.pipe2(os.O_CLOEXEC)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        ours = [code_w, out_r, err_r]
        try:
            started = start_sandboxed(
                [*stub_argv("agentnode-run-code"), "python3", "-I", "-"],
                limits=limits,
                network=network,
                egress=egress,
                node_network=node_network,
                workspace=workspace,
                user=user,
                # Not the program's stdout and stderr: its output ends when it ends, not when
                # the stub does. A fork that fails says nothing to the call: the runner sees
                # its stderr end before the ready mark and starts an interpreter instead.
                stdio=(go_r, "null", "null"),
            )
            try:
                uid, gid = parse_user(user)
                sandbox = Sandbox(uid=uid, gid=gid, limits=sandbox_limits(limits, timeout=False))
                request = {"pid": started.task.pid, **identity(sandbox)}
                # The server gets descriptors only (an empty request); the request goes to
                # its fork, over a socket of its own.
                ask, told = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                with ask, told:
                    self.send({}, [started.task.pidfd, go_w, told.fileno()])
                    ask.sendmsg([json.dumps(request).encode()],
                                [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [code_r, out_w, err_w]))])  # fmt: skip
            except BaseException:
                started.close()
                raise
            task = started.task
            task.stdin = os.fdopen(code_w, "wb", buffering=0)
            task.stdout = os.fdopen(out_r, "rb", buffering=0)
            task.stderr = os.fdopen(err_r, "rb", buffering=0)
            ours = []
            return started
        finally:
            for fd in (go_r, go_w, code_r, out_w, err_w, *ours):
                os.close(fd)


# -- the server, in the sandbox's python3 ------------------------------------------------------


def serve_python(fd: int, *, main: dict[str, object], modules: set[str], path: list[str]) -> int:
    """Serves the node's requests on socket `fd` until its end. A request is a stub's pidfd,
    the write end of its stdin and a socket the rest comes on: the server's next child is
    made in the stub's pid namespace, receives the request there, joins the task
    (`forkjoin.enter`), returns the interpreter to what `main`, `modules` and `path` say a
    fresh one has, and runs `STDIN_MAIN`. The server is its parent: it reaps it and tells the
    stub its status. It never sees a request itself, nor anything a program reads or writes."""
    import ctypes
    import select

    from agentnode import _native  # noqa: F401  (for the children)

    sock = socket.socket(fileno=fd)
    # A signal meant for the daemon's process group is not this process's to act on: its
    # socket's end is its only stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # wakes the select below
    mounts = cgroup_mounts()
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
            return 0  # the node is gone; the stubs of running children learn it at their end
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
            _child(pidfd, go, told, mounts, main=main, modules=modules, path=path)
        if libc.setns(own_pid_ns, _CLONE_NEWPID) != 0:
            return 1  # its next child would land in that task: better none
        os.close(pidfd)
        os.close(told)
        if child > 0:
            stubs[child] = go
        else:
            os.close(go)


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


def _child(
    pidfd: int,
    go: int,
    told: int,
    mounts: dict[str, str],
    *,
    main: dict[str, object],
    modules: set[str],
    path: list[str],
) -> NoReturn:
    """The server's child, in the task's pid namespace: receives its request, joins the task,
    runs the program. Never returns."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        channel = socket.socket(fileno=told)
        fds = array.array("i")
        data, ancdata, _flags, _addr = channel.recvmsg(1 << 16, socket.CMSG_SPACE(3 * fds.itemsize))
        channel.close()
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if len(fds) != 3:
            fail(go, "the request came without its stdio")
        request = json.loads(data)
        enter(request, pidfd=pidfd, stdio=(fds[0], fds[1], fds[2]), go=go, mounts=mounts)
        os.write(go, f"P {os.getpid()}\n".encode())
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter's
        _run(request, main=main, modules=modules, path=path)
    finally:
        os._exit(1)


def _run(
    request: dict[str, object], *, main: dict[str, object], modules: set[str], path: list[str]
) -> NoReturn:
    """The sandbox's interpreter, in its task: as a fresh `python3 -I -c STDIN_MAIN` it runs
    the code that comes on stdin and exits as the interpreter would."""
    import ctypes
    import sys

    # A process whose ids changed without an exec is not dumpable: its /proc files are
    # root's, its memory unreadable there. An exec'd interpreter's are its own; and what it
    # could read is its own memory, which holds nothing of a call but this one.
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    env = request["env"]
    assert isinstance(env, dict)
    os.environ.clear()
    os.environ.update(env)
    for name in [n for n in sys.modules if n not in modules]:
        del sys.modules[name]
    sys.path[:] = path
    sys.path_importer_cache.clear()
    sys.argv = ["-c"]
    sys.orig_argv = [sys.orig_argv[0], "-I", "-c", STDIN_MAIN]
    scope = sys.modules["__main__"].__dict__
    scope.clear()
    scope.update(main)
    status = 0
    try:
        exec(compile(STDIN_MAIN, "<string>", "exec"), scope)
    except SystemExit as e:
        status = exit_status(e)
    # What an interpreter does at its exit: join non-daemon threads, run atexit, flush.
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            status = status or 120  # as an interpreter whose stdout is gone at its exit
    os._exit(status)
