"""Python agents started from a pre-imported interpreter instead of a fresh one.

A fresh interpreter that imports the reference runtime and its SDKs spends 0.7 s of CPU on
`openai` and 0.9 s more on the `mcp` client before the agent's first step; the node's own start
of a task is a few milliseconds. So the node keeps one interpreter that has imported them all,
the fork server (`python -m agentnode.agents.forkserver`, a child of the daemon, as root on the
host, single-threaded, holding no task's data), and starts such agents as forks of it.

The task itself is started exactly as any other (`isolation.spawn`: its cgroup and limits, its
namespaces, root, workspace, egress policy and environment), but its command is a small stub
that waits. The fork server then forks once per task; that child joins the stub's cgroups
(v1 and v2), enters all its namespaces through its pidfd (mount, network, uts, ipc, cgroup, pid),
takes its root and working directory, and confines itself as a task's command is confined at
exec (`_native.confine_self`: rlimits, no capabilities but the task's, its ids, no_new_privs,
Landlock, the seccomp filter). Only then it forks the agent (the first process it makes lands
in the task's pid namespace) and stays its parent, to wait for it: the stub, the task's init,
is told the agent's pid (it forwards SIGTERM and SIGINT to it), then its exit status, and
exits with it (128+N when a signal N killed it). The agent closes every descriptor but its stdio, takes the
task's environment and arguments, and runs the command in the interpreter it was forked from.

Served (`serves`): tasks of kind `python` whose command is this node's interpreter
(`sys.executable`, the same path) with `-m agentnode.runtime ARGS` or `-c CODE ARGS`, whose
root is the host's, without a user namespace, and whose environment sets no `PYTHON*` variable
but `PYTHONPATH` (whose entries are put on `sys.path`, as at an interpreter's start). Anything
else starts the usual way, as do the tasks queued before the fork server is ready: it is
started at the first task it could serve.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from agentnode.isolation.spec import Sandbox
from agentnode.isolation.task import task_environment

__all__ = ["STUB", "ForkServer", "main"]

#: The task's init while its agent runs, a POSIX shell script (0.6 ms of CPU to start, against
#: 16 ms for an interpreter). Its stdin says `P PID` when the agent runs (then SIGTERM and
#: SIGINT sent to the task are forwarded to it), `X CODE` when it ended
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
#: Descriptors a request carries: the stub's pidfd, stdout, stderr, and its stdin's write end.
_FDS = 4
_MAX_REQUEST = 1 << 20


def _python_env_ok(env: dict[str, str]) -> bool:
    return all(k == "PYTHONPATH" or not k.startswith("PYTHON") for k in env)


class ForkServer:
    """The daemon's side: starts the fork server on first use and hands it tasks to join."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._closed = False

    @property
    def stub(self) -> list[str]:
        """The command a served task is started with (the original one follows it)."""
        return ["/bin/sh", "-c", STUB, "agentnode-agent"]

    def serves(self, argv: Sequence[str], sandbox: Sandbox) -> bool:
        """Whether a task of kind `python` running `argv` in `sandbox` can be a fork (see the
        module docstring). The first call that could starts the fork server; until it has
        imported everything, this says no."""
        if not (
            len(argv) >= 3
            and argv[0] == sys.executable
            and (argv[1:3] == ["-m", "agentnode.runtime"] or argv[1] == "-c")
            and sandbox.rootfs == "/"
            and not sandbox.userns
            and _python_env_ok(dict(sandbox.env))
        ):
            return False
        return self._started()

    def _started(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            if self._proc is None:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                with theirs:
                    self._proc = subprocess.Popen(
                        [sys.executable, "-m", "agentnode.agents.forkserver", str(theirs.fileno())],
                        pass_fds=[theirs.fileno()],
                        stdin=subprocess.DEVNULL,
                        env={"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8"},
                        cwd="/",
                    )  # fmt: skip
                self._sock = ours
                return False
            if not self._ready and self._sock is not None:
                with contextlib.suppress(BlockingIOError):
                    self._ready = self._sock.recv(1, socket.MSG_DONTWAIT) == b"R"
            return self._ready and self._proc.poll() is None

    def join(
        self,
        *,
        pid: int,
        pidfd: int,
        argv: Sequence[str],
        sandbox: Sandbox,
        stdout: int,
        stderr: int,
        go: int,
    ) -> None:
        """Asks the fork server to start `argv` inside the running stub `pid` (its `pidfd`)
        with `sandbox`'s identity, environment and working directory; `go` is the write end
        of the stub's stdin. Returns once the request is sent: the stub reports the outcome."""
        request = {
            "pid": pid,
            "argv": list(argv),
            "env": task_environment(sandbox),
            "cwd": sandbox.cwd,
            "uid": sandbox.uid,
            "gid": sandbox.gid,
            "keep_caps": sandbox.cap_numbers(),
            "nofile": sandbox.limits.nofile,
        }
        fds = array.array("i", [pidfd, stdout, stderr, go])
        sock = self._sock
        if sock is None:
            raise OSError("the fork server is not running")
        sock.sendmsg([json.dumps(request).encode()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])

    def close(self) -> None:
        """Stops the fork server (the agents it started are their tasks' and run on)."""
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


def _preload() -> None:
    """Imports what the reference runtime uses on its way to a first step, and does once what
    a first call would do lazily: one chat completion with a tool call through the `openai`
    SDK, answered in-process (no socket), imports `openai.resources.chat`, builds the SDK's
    request and response models and reads the platform (`uname -p`, a subprocess); 55 ms of
    CPU an agent spared (docs/agents.md). Then the heap is frozen (`gc.freeze`): an agent's
    collections skip what it inherited, so they neither scan it nor copy its pages."""
    # Not agentnode.runtime.__main__ itself: runpy runs it afresh (its imports are loaded).
    import argparse  # noqa: F401
    import gc

    import httpx2
    import openai

    import agentnode.runtime.loop
    import agentnode.sdk.tools
    import agentnode.tools.endpoint  # noqa: F401  (the MCP door's idempotency key)

    def answer(request: httpx2.Request) -> httpx2.Response:
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        message = {"role": "assistant", "content": None, "tool_calls": [call]}
        return httpx2.Response(200, json={
            "id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "message": message}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })  # fmt: skip

    with openai.OpenAI(api_key="-", base_url="http://agentnode.invalid/v1", max_retries=0):
        pass  # its transport's imports (httpcore2, h11, h2)
    with openai.OpenAI(api_key="-", base_url="http://agentnode.invalid/v1", max_retries=0,
                       http_client=httpx2.Client(transport=httpx2.MockTransport(answer))) as llm:  # fmt: skip
        tool: Any = {"type": "function", "function": {"name": "f", "parameters": {}}}
        m = llm.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "warm"}], tools=[tool]
        )
        for c in m.choices[0].message.tool_calls or ():
            c.model_dump(include={"id", "type", "function"})
    # What the MCP client's first task group and streams load.
    import anyio._backends._asyncio
    import anyio.streams.stapled  # noqa: F401
    from mcp import Client  # noqa: F401
    from mcp.client.streamable_http import streamable_http_client  # noqa: F401

    "agentnode.invalid".encode("idna")  # a URL's host: `encodings.idna`, `stringprep`

    gc.collect()
    gc.freeze()


def _cgroup_procs(pid: int) -> list[str]:
    """The `cgroup.procs` file of each cgroup (v1 hierarchies and cgroup2) `pid` is in."""
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
    files = []
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            first = controllers.split(",")[0]
            if first in mounts:
                files.append(f"{mounts[first]}{path.rstrip('/')}/cgroup.procs")
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


def _fail(go: int, text: str) -> NoReturn:
    with contextlib.suppress(OSError):  # the task is gone already
        os.write(go, b"E " + b" ".join(text.encode().split())[:300] + b"\n")
    os._exit(1)


def _join(request: dict[str, object], fds: list[int]) -> None:
    """Joins one task, forks its agent and waits for it: never returns.

    It stays the agent's parent: a process whose parent leaves goes to the reaper of the
    parent's pid namespace (the host's), not to the task's init. It is confined as the agent
    is, in the task's cgroups and namespaces but the pid namespace, which the agent cannot
    see out of."""
    pidfd, stdout, stderr, go = fds
    pid = request["pid"]
    try:
        assert isinstance(pid, int)
        # The stub's pidfd pins the pid it names while the files are read.
        for procs in _cgroup_procs(pid):
            with open(procs, "w") as f:
                f.write("0")
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(pidfd, _TASK_NAMESPACES) != 0:
            raise OSError(ctypes.get_errno(), "cannot enter the task's namespaces")
        os.fchdir(root)
        os.chroot(".")
        os.chdir(str(request["cwd"]))
        null = os.open("/dev/null", os.O_RDONLY)
        for fd, target in ((null, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
        for fd in (null, root, pidfd, stdout, stderr):
            os.close(fd)
        uid, gid, keep_caps, nofile = _identity(request)
    except (OSError, AssertionError, KeyError, ValueError) as e:
        _fail(go, f"cannot join the task: {e}")
    from agentnode import _native

    # A failed step writes its 8-byte record to the stub and exits 127: never half confined.
    _native.confine_self(uid=uid, gid=gid, keep_caps=keep_caps, nofile=nofile, seccomp=True,
                         err=go)  # fmt: skip
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    try:
        agent = os.fork()  # in the task's pid namespace
    except OSError as e:
        _fail(go, f"cannot fork the agent: {e}")
    if agent == 0:
        _agent(request, go)
    _, status = os.waitpid(agent, 0)
    with contextlib.suppress(OSError):
        os.write(go, f"X {os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def _agent(request: dict[str, object], go: int) -> None:
    """The agent: tells the stub its pid (in the task's pid namespace), runs the command."""
    os.write(go, f"P {os.getpid()}\n".encode())
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter has it
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    env, argv = request["env"], request["argv"]
    assert isinstance(env, dict) and isinstance(argv, list)
    os.environ.clear()
    os.environ.update(env)
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    status = 0
    try:
        if argv[1] == "-c":
            sys.argv = ["-c", *argv[3:]]
            sys.path[0:1] = ["", *extra]
            scope = {"__name__": "__main__", "__builtins__": __builtins__}
            exec(compile(argv[2], "<string>", "exec"), scope)
        else:
            import runpy

            sys.argv = [argv[2], *argv[3:]]
            sys.path[0:1] = [os.getcwd(), *extra]
            runpy.run_module("agentnode.runtime", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            status = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def _take(sock: socket.socket, taken: int) -> None:
    """In a fresh fork of the server: receives the next request, says so on `taken`, and
    serves it. Never returns."""
    fds = array.array("i")
    try:
        data, ancdata, _flags, _addr = sock.recvmsg(
            _MAX_REQUEST, socket.CMSG_SPACE(_FDS * fds.itemsize)
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
    if len(fds) != _FDS:
        os._exit(1)
    try:
        request = json.loads(data)
    except ValueError:
        _fail(fds[3], "the request is not JSON")
    _join(request, list(fds))


def main(argv: list[str] | None = None) -> int:
    """Serves the daemon's requests on the socket whose descriptor is `argv[0]`.

    Each request is received by a fork made before it came, never by this process: what one
    task sends (its token among its environment) is in that fork's memory only, never in the
    memory the next fork is copied from."""
    args = sys.argv[1:] if argv is None else argv
    sock = socket.socket(fileno=int(args[0]))
    # A signal meant for the daemon's process group is not this process's to act on: its
    # socket's end is its only stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Its children, each a task's joiner, are reaped by the kernel: nothing waits on them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    _preload()
    sock.sendall(b"R")
    while True:
        taken_r, taken_w = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:
            try:
                os.close(taken_r)
                _take(sock, taken_w)
            finally:
                os._exit(1)
        os.close(taken_w)
        took = os.read(taken_r, 1)
        os.close(taken_r)
        if took != b"T":
            return 0  # it found the socket's end (or died): the daemon is gone


if __name__ == "__main__":
    sys.exit(main())
