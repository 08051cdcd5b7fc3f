"""run_code's python sandboxes made as forks of a pre-started python3 (`agentnode.tools.pyfork`):
each call still in a fresh sandbox, confined and limited as a fresh interpreter's, seeing what a
fresh `python3 -I -` sees, and holding nothing of another caller's."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from agentnode.egress.policy import EgressPolicy
from agentnode.egress.service import EgressService
from agentnode.isolation.task import SAFE_PATH
from agentnode.tools.code import CodeRunner
from agentnode.tools.registry import Caller, Registry, ToolLimits
from agentnode.tools.service import ToolService
from support.egress_world import HOST4, World
from support.memscan import SCAN_VISIBLE, memory_holds

#: The `world` fixture (a netns pair with a test HTTP server and a node bridge).
pytest_plugins = ["support.tools_world"]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)"),
    pytest.mark.usefixtures("data_dir"),
]

A = Caller(task="t1", tenant="a")
B = Caller(task="t2", tenant="b")
#: What tells a fork from a fresh interpreter inside the sandbox: a fresh one is its task's
#: init (pid 1), a fork is the stub's second process.
_PID = "import os as _o; print('pid', _o.getpid()); del _o\n"


def _runner(
    *, forks: bool = True, net: EgressService | None = None, **limits: Any
) -> tuple[CodeRunner, ToolService]:
    """A runner whose fork server is ready (with `net`, sandboxes get the caller's network)."""
    runner = CodeRunner(
        limits=ToolLimits(**{"timeout": 10.0, "memory": 64 << 20, **limits}),
        forks=forks,
        network="none" if net is None else "task",
        node_network=net,
    )
    svc = ToolService(Registry([runner.tool()]), on_record=lambda record: None)
    if forks:
        forks_ = runner._forks
        assert forks_ is not None
        deadline = time.monotonic() + 30
        while not forks_.serves(userns=False):  # the first ask starts the server
            assert time.monotonic() < deadline, "the fork server did not get ready"
            time.sleep(0.01)
    return runner, svc


def _calls(svc: ToolService, codes: list[str], caller: Caller = A) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        return [await svc.call("run_code", {"code": c}, caller) for c in codes]

    return asyncio.run(run())


def _meta(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = result["_meta"]["agentnode"]
    return out


def _forked(result: dict[str, Any]) -> str:
    """The output of a call made with `_PID` first, once checked that a fork ran it."""
    out: str = result["structuredContent"]["stdout"]
    first, _, rest = out.partition("\n")
    assert first == "pid 2", result
    return rest


@pytest.mark.parametrize(
    "code",
    [
        "import sys; print(sys.argv, __name__, list(globals()), __file__, __doc__)",
        "import sys; print(sorted(sys.modules))",
        "import sys; print(sys.path, sys.flags, sys.executable, sys.prefix)",
        "def f():\n    1 / 0\nf()",
        "print(",
        "try:\n    {}['k']\nexcept KeyError as e:\n    raise ValueError('v') from e",
        "raise SystemExit('bye')",
        "import sys; sys.stdout.write('partial'); sys.exit(7)",
        "import sys; print(repr(sys.stdin.read()), sys.flags.isolated, sys.stdout.line_buffering)",
        "import threading, time, atexit\natexit.register(print, 'at exit')\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread'))).start()",
        "import signal; print(signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGCHLD))",
    ],
)
def test_a_forked_run_is_python_reading_its_program_from_stdin(code: str) -> None:
    """What the code sees and prints (globals, argv, path, modules, tracebacks, exit status,
    threads joined and atexit run at its end) is a fresh `python3 -I -`'s own."""
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": "/workspace"}  # the sandbox's
    own = subprocess.run(["python3", "-I", "-"], input=code.encode(), capture_output=True, env=env)
    runner, svc = _runner()
    try:
        probe, *results = _calls(svc, [_PID, code, code])
    finally:
        runner.close()
    assert _forked(probe) == ""
    for result in results:
        assert result["structuredContent"] == {
            "stdout": own.stdout.decode(),
            "stderr": own.stderr.decode(),
            "exit_status": own.returncode,
        }


#: What a sandbox is, seen from inside: identity, confinement, namespaces, its files and the
#: host's, its environment. A fork must see exactly what a fresh interpreter sees.
_SANDBOX = """
import json, os
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
def writable(path):
    try:
        open(path, "w").close()
        return True
    except OSError as e:
        return e.strerror
print(json.dumps({
    "ids": [os.getuid(), os.geteuid(), os.getgid(), os.getgroups()],
    "confined": [status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb",
                                             "NoNewPrivs", "Seccomp")],
    "cwd": os.getcwd(),
    "env": dict(os.environ),
    "host_file": os.path.exists(HOST_FILE),
    "tmp": os.listdir("/tmp"),
    "workspace": os.listdir("/workspace"),
    "write_etc": writable("/etc/agentnode-probe"),
    "write_tmp": writable("/tmp/probe"),
    "write_ws": writable("/workspace/probe"),
    "hostname": os.uname().nodename,
    "own_proc": [os.stat("/proc/self/" + f).st_uid for f in ("mem", "environ", "fd")],
    "nofile": __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE),
    "ifaces": sorted(name for _, name in __import__("socket").if_nameindex()),
}, sort_keys=True))
"""


def test_a_forked_sandbox_is_confined_as_a_fresh_one(tmp_path: Path) -> None:
    host_file = tmp_path / "host-secret.txt"
    host_file.write_text("not yours")
    probe = _SANDBOX.replace("HOST_FILE", repr(str(host_file)))
    seen = {}
    for forks in (True, False):
        runner, svc = _runner(forks=forks)
        try:
            first, result = _calls(svc, [_PID, probe])
        finally:
            runner.close()
        assert first["structuredContent"]["stdout"] == ("pid 2\n" if forks else "pid 1\n")
        seen[forks] = json.loads(result["structuredContent"]["stdout"])
    assert seen[True] == seen[False]
    inside = seen[True]
    assert inside["ids"] == [65534, 65534, 65534, []] and not inside["host_file"]
    assert inside["confined"] == ["0000000000000000"] * 4 + ["1", "2"]
    assert inside["env"] == {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": "/workspace"}
    assert inside["write_etc"] == "Read-only file system" and inside["write_ws"] is True
    assert inside["ifaces"] == ["lo"] and inside["own_proc"] == [65534] * 3


def test_a_forked_sandbox_seen_from_the_host_is_its_tasks(tmp_path: Path) -> None:
    """A spare made ahead: the fork is in the stub's cgroups
    and namespaces, confined, with none of the fork server's."""
    runner, svc = _runner()
    try:
        _calls(svc, [_PID])  # and the spares made after it
        deadline = time.monotonic() + 10
        while len(runner.spare_pids("a", "t1")) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        forks = runner._forks
        assert forks is not None and forks._proc is not None
        server = forks._proc.pid
        for stub in runner.spare_pids("a", "t1"):
            unified = next(line.split(":", 2)[2] for line in
                           Path(f"/proc/{stub}/cgroup").read_text().splitlines()
                           if line.startswith("0::"))  # fmt: skip
            procs = [int(p) for p in _procs_of(unified)]
            assert stub in procs and len(procs) == 2, procs  # the stub and the fork
            for pid in procs:
                assert (
                    Path(f"/proc/{pid}/cgroup").read_text()
                    == Path(f"/proc/{stub}/cgroup").read_text()
                )
                for ns in ("mnt", "net", "uts", "ipc", "cgroup"):
                    mine = os.readlink(f"/proc/{pid}/ns/{ns}")
                    assert mine == os.readlink(f"/proc/{stub}/ns/{ns}")
                    assert mine != os.readlink(f"/proc/{server}/ns/{ns}")
                if pid == stub:
                    continue
                status = dict(
                    line.split(":", 1)
                    for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                )
                assert status["Uid"].split() == ["65534"] * 4
                assert status["CapEff"].strip() == "0000000000000000"
                assert status["Seccomp"].strip() == "2" and status["NoNewPrivs"].strip() == "1"
    finally:
        runner.close()


def _procs_of(unified: str) -> list[str]:
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        procs = Path(f"{root}{unified}/cgroup.procs")
        if procs.exists():
            return procs.read_text().split()
    raise AssertionError(f"no cgroup2 node {unified}")


def test_a_forked_run_is_held_by_its_limits() -> None:
    runner, svc = _runner(pids=16)
    fork_bomb = (
        "import os, time\nfor _ in range(64):\n    if os.fork() == 0:\n        time.sleep(30)\n"
    )
    try:
        oom, pids, late, cut = asyncio.run(_limited(svc, fork_bomb))
    finally:
        runner.close()
    assert _meta(oom)["class"] == "resource" and "out of memory" in oom["content"][0]["text"]
    assert _meta(pids)["class"] == "resource" and "pids limit" in pids["content"][0]["text"]
    assert _meta(late)["class"] == "timeout" and _meta(late)["duration_ms"] < 5000
    assert _meta(cut)["truncated"] and len(cut["structuredContent"]["stdout"]) == 1000


async def _limited(svc: ToolService, fork_bomb: str) -> list[dict[str, Any]]:
    out = []
    for args in (
        {"code": _PID + "b = bytearray(200 << 20)"},
        {"code": _PID + fork_bomb},
        {"code": _PID + "import time; time.sleep(30)", "timeout": 0.3},
    ):
        out.append(await svc.call("run_code", args, A))
    # The output limit is the runner's: a second runner with a small one.
    runner = CodeRunner(limits=ToolLimits(timeout=10, output=1000))
    try:
        small = ToolService(Registry([runner.tool()]), on_record=lambda record: None)
        assert runner._forks is not None
        while not runner._forks.serves(userns=False):
            await asyncio.sleep(0.01)
        out.append(await small.call("run_code", {"code": "print('x' * 100000)"}, A))
    finally:
        runner.close()
    return out


def test_a_forked_run_with_the_task_network_reaches_what_its_task_may_and_no_more(
    world: tuple[World, EgressService],
) -> None:
    """Each fork is in its own task's network namespace under that task's policy: tenant a
    may reach HOST4:8080, tenant b only HOST4:8081; each is denied the other's."""
    _, net = world
    a = Caller(task="t1", tenant="a", network="egress",
               egress=EgressPolicy(allow=[f"{HOST4}:8080"]))  # fmt: skip
    b = Caller(task="t1", tenant="b", network="egress",
               egress=EgressPolicy(allow=[f"{HOST4}:8081"]))  # fmt: skip
    fetch = (
        f"import urllib.request as u; print(u.urlopen('http://{HOST4}:8080/p', timeout=5).read())"
    )

    def connect(port: int) -> str:
        return f"import socket; socket.create_connection(({HOST4!r}, {port}), timeout=3)"

    runner, svc = _runner(net=net)
    try:
        for _round in range(2):  # the second round's take the sandboxes made ahead
            ok, denied_a = _calls(svc, [_PID + fetch, _PID + connect(8081)], a)
            denied_b, refused_b = _calls(svc, [_PID + connect(8080), _PID + connect(8081)], b)
            assert "/p from the test host" in _forked(ok), ok
            for denied, port in ((denied_a, 8081), (denied_b, 8080)):
                _forked(denied)
                assert _meta(denied)["class"] == "policy", denied
                assert (_meta(denied)["denial"]["address"], _meta(denied)["denial"]["port"]) == (
                    HOST4,
                    port,
                )
            _forked(refused_b)  # allowed, nothing listens there
            assert "ConnectionRefusedError" in refused_b["structuredContent"]["stderr"]
    finally:
        runner.close()


def test_a_forked_run_has_no_network() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        code = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        runner, svc = _runner()
        try:
            first, result = _calls(svc, [_PID, _PID + code])
        finally:
            runner.close()
    _forked(first)
    assert _meta(result)["class"] == "permanent"
    assert "ConnectionRefusedError" in result["structuredContent"]["stderr"]


#: Finds, by its hash only (the secret itself in this code would be found), what follows the
#: shared prefix anywhere this process can read: its own memory, and every process's
#: environment and command line it can see.
_SEARCH = (
    """
import hashlib, json, os
P = PREFIX
want = bytes.fromhex(DIGEST)
found = []
def scan(blob, where):
    i = blob.find(P)
    while i >= 0:
        if hashlib.sha256(blob[i:i + len(P) + 32]).digest() == want and where not in found:
            found.append(where)
        i = blob.find(P, i + 1)
"""
    + SCAN_VISIBLE
    + """
print(json.dumps(found))
"""
)
_PREFIX = b"agentnode-run-code-secret-"


def test_a_fork_holds_nothing_of_another_callers_call() -> None:
    """Tenant a's code carries a secret; tenant b's forks (made before and after a's call)
    and the fork server itself hold none of it. The scan finds a secret of b's own."""
    secret = _PREFIX + secrets.token_hex(16).encode()
    own = _PREFIX + secrets.token_hex(16).encode()

    def search(target: bytes) -> str:
        return _SEARCH.replace("PREFIX", repr(_PREFIX)).replace(
            "DIGEST", repr(hashlib.sha256(target).hexdigest())
        )

    holder = f"import time\nkept = {secret.decode()!r}\nprint('held')\ntime.sleep(1.5)\n"
    runner, svc = _runner()

    async def scenario() -> list[dict[str, Any]]:
        holding = asyncio.ensure_future(svc.call("run_code", {"code": _PID + holder}, A))
        await asyncio.sleep(0.5)  # a's code runs, its secret in its fork's memory
        theirs = await svc.call("run_code", {"code": _PID + search(secret)}, B)
        mine = await svc.call(
            "run_code", {"code": _PID + f"mine = {own.decode()!r}\n" + search(own)}, B
        )
        return [await holding, theirs, mine]

    try:
        held, theirs, mine = asyncio.run(scenario())
        assert runner._forks is not None and runner._forks._proc is not None
        server = runner._forks._proc.pid
        assert not memory_holds(server, secret)
        after = _calls(svc, [_PID + search(secret)], B)[0]
    finally:
        runner.close()
    assert _forked(held) == "held\n"
    assert json.loads(_forked(theirs)) == [], theirs
    assert json.loads(_forked(after)) == [], after
    assert "memory" in json.loads(_forked(mine)), "the scan finds the caller's own secret"


def test_forks_do_not_share_random_state() -> None:
    runner, svc = _runner()
    try:
        results = _calls(svc, [_PID + "import random; print(random.getrandbits(64))"] * 3)
    finally:
        runner.close()
    draws = [_forked(r) for r in results]
    assert len(set(draws)) == 3, draws


def test_without_the_fork_server_calls_start_an_interpreter() -> None:
    """A caller with a user namespace is never forked; a fork server that died leaves the
    runner starting interpreters, every call still answered."""
    runner, svc = _runner()
    try:
        assert runner._forks is not None and runner._forks._proc is not None
        assert not runner._forks.serves(userns=True)
        _forked(_calls(svc, [_PID])[0])
        os.kill(runner._forks._proc.pid, signal.SIGKILL)
        runner._forks._proc.wait()
        runner.end_task("t1")  # the spares made from it are forks: drop them
        results = _calls(svc, [_PID + "print(6 * 7)"] * 3)
    finally:
        runner.close()
    for result in results:
        assert result["structuredContent"]["stdout"] == "pid 1\n42\n", result


@pytest.mark.parametrize("code", ["import time; time.sleep(1); print('done')",
                                  "import time, sys; time.sleep(1); sys.exit(5)"])  # fmt: skip
def test_a_forked_call_ends_as_itself_when_its_fork_server_is_killed(code: str) -> None:
    """The fork tells its stub its status itself: a call running when its fork server is
    killed goes on and ends with its own output and status, not a failure it did not have."""
    own = subprocess.run(["python3", "-I", "-"], input=code.encode(), capture_output=True)
    runner, svc = _runner()
    try:
        assert runner._forks is not None and runner._forks._proc is not None
        server = runner._forks._proc

        async def scenario() -> dict[str, Any]:
            call = asyncio.ensure_future(svc.call("run_code", {"code": _PID + code}, A))
            await asyncio.sleep(0.4)
            os.kill(server.pid, signal.SIGKILL)
            return await call

        result = asyncio.run(scenario())
    finally:
        runner.close()
    out = result["structuredContent"]
    assert out["stdout"] == "pid 2\n" + own.stdout.decode(), result
    assert out["exit_status"] == own.returncode, result


def test_a_closed_runner_stops_its_fork_server() -> None:
    runner, svc = _runner()
    _forked(_calls(svc, [_PID])[0])
    forks = runner._forks
    assert forks is not None and forks._proc is not None
    runner.close()
    assert forks._proc.poll() is not None


def test_a_node_stopping_with_the_ready_mark_unread_ends_its_server_quietly(
    capfd: pytest.CaptureFixture[str],
) -> None:
    """The server's end of its socket is reset, not closed, when the node closes it with the
    server's ready mark still unread (a node stopped early, Ctrl-C): the server ends at once
    with status 0 and no traceback, as at a clean close."""
    import select

    for _ in range(3):
        runner = CodeRunner(limits=ToolLimits(timeout=10.0, memory=64 << 20))
        forks = runner._forks
        assert forks is not None
        assert not forks.serves(userns=False)  # starts the server
        assert forks._sock is not None and forks._proc is not None
        assert select.select([forks._sock], [], [], 30)[0], "the server never got ready"
        proc = forks._proc
        runner.close()  # the ready mark unread
        assert proc.wait(10) == 0
    assert "Traceback" not in capfd.readouterr().err
