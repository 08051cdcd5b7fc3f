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

import os

from agentnode.isolation.forkjoin import (
    ForkServerProcess,
    exit_status,
    identity,
    serve,
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
                self.send(request, pidfd=started.task.pidfd, go=go_w,
                          stdio=[code_r, out_w, err_w])  # fmt: skip
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
    """Serves the node's requests on socket `fd` until its end (`forkjoin.serve`): each fork
    joins its task, returns the interpreter to what `main`, `modules` and `path` say a fresh
    one has, and runs `STDIN_MAIN`."""

    def program(request: dict[str, object], go: int) -> NoReturn:
        _run(request, go, main=main, modules=modules, path=path)

    return serve(fd, program)


def _run(
    request: dict[str, object],
    go: int,
    *,
    main: dict[str, object],
    modules: set[str],
    path: list[str],
) -> NoReturn:
    """The sandbox's interpreter, in its task: as a fresh `python3 -I -c STDIN_MAIN` it runs
    the code that comes on stdin and exits as the interpreter would, telling the stub (`go`,
    its stdin) its status itself: the call ends with it when the fork server, which would
    otherwise tell it, is gone (killed, or ended with the node)."""
    import ctypes
    import sys

    # A process whose ids changed without an exec is not dumpable: its /proc files are
    # root's, its memory unreadable there. An exec'd interpreter's are its own; and what it
    # could read is its own memory, which holds nothing of a call but this one.
    ctypes.CDLL(None).prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0)
    os.closerange(3, go)
    os.closerange(go + 1, os.sysconf("SC_OPEN_MAX"))
    os.set_inheritable(go, False)  # not the commands the code runs
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
    # As the kernel reports the status: the stub exits with it (the server's own `X`, at the
    # reap, comes second and is not read). Not contextlib: a fork imports nothing a fresh
    # interpreter would not have.
    try:  # noqa: SIM105
        os.write(go, f"X {status & 0xFF}\n".encode())
    except OSError:
        pass  # the stub is gone: the task was killed
    os._exit(status)
