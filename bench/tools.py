"""Layer 5 tool calls against peers in the same run:

- an MCP tool call through the node (a task's `Tools.mcp_client()` -> the node's MCP socket,
  MCP's stdio framing on a unix socket -> the ToolService -> the server in its sandbox ->
  back; the node in a process of its own, as the daemon is) vs the same `mcp` client calling
  the same server directly over stdio (goal: <= +1 ms p50 added), with the CPU per call of
  the client and the node; and the same call through the node's streamable-HTTP endpoint
  (the door unmodified MCP clients take), against the same peer;
- `run_code` of print(1) in a fresh sandbox vs `bwrap --unshare-all` running the same
  `python3 -c` (goal: <= 0.5x), back to back and spaced 50 ms apart (as an agent's calls are,
  a model turn between two). Its sandboxes are made ahead as forks of a pre-started python3
  (`tools.pyfork`); the same runner starting an interpreter per sandbox is measured beside it.
  Back to back, the CPU per call too (everything the call and the sandbox made for it cost:
  the node, the fork server, the task; bwrap and its python), from a cpuacct cgroup made for
  this benchmark (cgroup v1 hosts only);
- a `run_code` call in a task's stateful session (goal: p50 <= 2 ms), against the fresh-sandbox
  call.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import uvloop
from mcp import Client, StdioServerParameters

from _harness import Bench, percentile
from agentnode.audit.log import AuditLog
from agentnode.isolation import use_data_dir
from agentnode.isolation.spec import Mount
from agentnode.isolation.task import SAFE_PATH
from agentnode.sdk.tools import Tools
from agentnode.tools.code import CodeRunner
from agentnode.tools.endpoint import MCPEndpoint, mcp_app
from agentnode.tools.mcpservers import MCPServers, MCPServerSpec
from agentnode.tools.mcpsocket import MCPSocket
from agentnode.tools.registry import Caller, Registry, ToolLimits
from agentnode.tools.service import ToolService

REPO = Path(__file__).resolve().parents[1]
SERVER = [sys.executable, str(REPO / "tests" / "support" / "tools_mcp_server.py")]
ENV = {"PYTHONPATH": str(REPO / "python")}
# The interpreter run_code's sandbox finds on its PATH, so both sides run the same one.
PYTHON3 = shutil.which("python3", path=SAFE_PATH) or "python3"
BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp", PYTHON3, "-I", "-c", "print(1)"]  # fmt: skip
CALLER = Caller(task="bench", tenant="bench")
#: Seconds between spaced run_code calls.
SPACED = 0.05
CPUACCT = Path("/sys/fs/cgroup/cpuacct")


class CpuMeter:
    """The CPU time (ms) of this process and of all it starts from now on, tasks included (the
    node's tasks' cgroups are made under the starting process's own): this process moved into
    a cpuacct cgroup of its own, whose usage counts its descendants'. None where there is no
    v1 cpuacct hierarchy to make it in."""

    def __init__(self, group: Path) -> None:
        self.group = group

    @classmethod
    def start(cls) -> CpuMeter | None:
        if not (CPUACCT / "cpuacct.usage").exists():
            return None
        group = CPUACCT / f"agentnode-bench-tools-{os.getpid()}"
        group.mkdir()
        (group / "cgroup.procs").write_text(str(os.getpid()))
        # Before the node's own exit handlers are registered (at its first start), so after
        # them: its tasks' cgroups under this one are gone by then.
        atexit.register(cls._remove, group)
        return cls(group)

    def ms(self) -> float:
        return int((self.group / "cpuacct.usage").read_text()) / 1e6

    @staticmethod
    def _remove(group: Path) -> None:
        (CPUACCT / "cgroup.procs").write_text(str(os.getpid()))
        for d in sorted(group.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if d.is_dir():
                with contextlib.suppress(OSError):
                    d.rmdir()
        with contextlib.suppress(OSError):
            group.rmdir()


def authenticate(token: str) -> Caller | None:
    return CALLER if token == "t" else None


async def serve(root: Path, ready: int, stop: int) -> None:
    """The node's side (MCP servers, tool service, both MCP doors) as in the daemon, until
    `stop` is readable; `ready` gets a byte once it listens."""
    # The checkout (and its .venv) bound in: it may sit under /tmp, the sandbox's own.
    spec = MCPServerSpec(name="t", command=tuple(SERVER), env=ENV, user="0",
                         mounts=(Mount(str(REPO), str(REPO)),))  # fmt: skip
    servers = MCPServers([spec])
    # The daemon's audit log: each call's record is chained and written as in production.
    audit = AuditLog(root / "audit")
    service = ToolService(Registry(), on_record=audit.append, sources=[servers])
    endpoint = MCPEndpoint(lambda: mcp_app(service, authenticate), uds=root / "mcp.sock")
    door = MCPSocket(service, authenticate, path=root / "mcps.sock")
    await endpoint.start()
    await door.start()
    os.write(ready, b"r")
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_reader(stop, stopped.set)
    await stopped.wait()
    await door.stop()
    await endpoint.stop()
    await servers.close()
    audit.close()


class Node:
    """The node's side in a process of its own, as the daemon is: a task's client and the node
    share no interpreter (nor its lock)."""

    def __init__(self, root: Path) -> None:
        self.socket = root / "mcp.sock"
        self.stdio_socket = root / "mcps.sock"
        ready_r, ready_w = os.pipe()
        self._stop_r, self._stop_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the node: uvloop, as `agentnode run`
            code = 0
            try:
                os.close(ready_r)
                uvloop.run(serve(root, ready_w, self._stop_r))
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        os.close(ready_w)
        got = os.read(ready_r, 1)
        os.close(ready_r)
        if got != b"r":
            raise RuntimeError("the benchmark's node did not start")

    def cpu_s(self) -> float:
        """CPU seconds the node's process (all its threads) has used."""
        total = 0
        for tid in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                total += int(Path(f"/proc/{self.pid}/task/{tid}/schedstat").read_text().split()[0])
        return total / 1e9

    def close(self) -> None:
        os.write(self._stop_w, b"s")
        _, status = os.waitpid(self.pid, 0)
        os.close(self._stop_w)
        os.close(self._stop_r)
        if status != 0:
            raise RuntimeError(f"the benchmark's node exited with status {status}")


async def mcp_calls(client: Client, name: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        result = await client.call_tool(name, {"a": i, "b": 1})
        out.append((time.perf_counter() - t0) * 1000)
        assert not result.is_error, result
    return out


class Path3:
    """One way of calling: its latencies (ms) and CPU seconds (this process's and the node's,
    and the node's alone)."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self.cpu_s = 0.0
        self.node_cpu_s = 0.0


async def timed(node: Node, path: Path3, client: Client, name: str, n: int) -> None:
    mine, theirs = time.process_time(), node.cpu_s()
    path.ms += await mcp_calls(client, name, n)
    path.node_cpu_s += node.cpu_s() - theirs
    path.cpu_s += time.process_time() - mine + node.cpu_s() - theirs


async def mcp_pair(node: Node, n: int) -> tuple[Path3, Path3, Path3]:
    """The same call through the node's MCP socket (what a task's `Tools.mcp_client()` uses),
    through its streamable-HTTP endpoint, and direct, in interleaved blocks."""
    os.environ["AGENTNODE_MCP_SOCKET"] = str(node.socket)
    through = Tools.mcp_client(socket=str(node.stdio_socket), token="t")
    http = Tools.mcp_client(url="http://agentnode/mcp", token="t")
    direct = Client(StdioServerParameters(command=SERVER[0], args=SERVER[1:], env=ENV))
    ours, door, peer = Path3(), Path3(), Path3()
    async with through as c1, http as c2, direct as c3:
        await mcp_calls(c1, "t__add", 5)  # starts the sandboxed server; warms every path
        await mcp_calls(c2, "t__add", 5)
        await mcp_calls(c3, "add", 5)
        for _ in range(10):  # interleaved blocks: noise hits all alike
            await timed(node, ours, c1, "t__add", n // 10)
            await timed(node, door, c2, "t__add", n // 10)
            await timed(node, peer, c3, "add", n // 10)
    return ours, door, peer


async def code_calls(
    runner: CodeRunner, n: int, *, session: bool, pause: float = 0.0
) -> list[float]:
    svc = ToolService(Registry([runner.tool()]), on_record=lambda r: None)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        result = await svc.call("run_code", {"code": "print(1)", "session": session}, CALLER)
        out.append((time.perf_counter() - t0) * 1000)
        assert result["structuredContent"]["stdout"] == "1\n", result
        await asyncio.sleep(pause)
    return out


def bwrap_calls(n: int, pause: float = 0.0) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = subprocess.run(BWRAP, check=True, capture_output=True)
        out.append((time.perf_counter() - t0) * 1000)
        assert r.stdout == b"1\n"
        time.sleep(pause)
    return out


def main() -> None:
    bench = Bench.from_args("tools", parts=("mcp", "run_code"))
    meter = CpuMeter.start()
    root = Path(tempfile.mkdtemp(prefix="agentnode-bench-tools-"))
    use_data_dir(root / "data")
    (root / "data").mkdir()
    try:
        if bench.runs("mcp"):
            node = Node(root)
            try:
                ours, door, peer = asyncio.run(mcp_pair(node, 100 if bench.quick else 1000))
            finally:
                node.close()
            direct = "the same mcp client on the same server over stdio"
            for q in (50, 99):
                bench.record(f"mcp_call_p{q}", percentile(ours.ms, q), percentile(peer.ms, q), "ms",
                             peer_name=direct)  # fmt: skip
            added = percentile(ours.ms, 50) - percentile(peer.ms, 50)
            bench.record("mcp_call_added_p50", added, 1.0, "ms", peer_name="goal: 1 ms added")
            # CPU per call of the client's process and the node's (the server's is alike in both).
            bench.record("mcp_call_cpu", ours.cpu_s / len(ours.ms) * 1000,
                         peer.cpu_s / len(peer.ms) * 1000, "ms",
                         peer_name="the direct client's CPU")  # fmt: skip
            # The node's share (its process, all threads): what the pass-through cut.
            bench.record("mcp_call_node_cpu", ours.node_cpu_s / len(ours.ms) * 1000,
                         peer.cpu_s / len(peer.ms) * 1000, "ms",
                         peer_name="the direct client's CPU, for scale")  # fmt: skip
            # The door for unmodified MCP clients (AGENTNODE_MCP_URL), not what Tools uses.
            bench.record("mcp_call_http_door_p50", percentile(door.ms, 50), percentile(peer.ms, 50),
                         "ms", peer_name=direct)  # fmt: skip
        if bench.runs("run_code"):
            limits = ToolLimits(memory=256 << 20, timeout=30)
            runner = CodeRunner(limits=limits)
            started = CodeRunner(limits=limits, forks=False)
            n = 20 if bench.quick else 200
            asyncio.run(code_calls(runner, 3, session=False))  # warm-up; starts the fork server
            asyncio.run(code_calls(started, 3, session=False))
            fresh: list[float] = []
            interp: list[float] = []
            jail: list[float] = []
            cpu = {"fresh": 0.0, "interp": 0.0, "jail": 0.0}

            def block(name: str, samples: list[float], run: Any) -> None:
                before = meter.ms() if meter is not None else 0.0
                samples += run()
                if meter is not None:
                    time.sleep(0.1)  # the spares made after the last call, and ended tasks' reaping
                    cpu[name] += meter.ms() - before

            for _ in range(5):  # interleaved blocks: noise hits all alike
                block(
                    "fresh", fresh, lambda: asyncio.run(code_calls(runner, n // 5, session=False))
                )
                block("interp", interp,
                      lambda: asyncio.run(code_calls(started, n // 5, session=False)))  # fmt: skip
                if shutil.which("bwrap"):
                    block("jail", jail, lambda: bwrap_calls(n // 5))
            started.close()
            if jail:
                for q in (50, 99):
                    bench.record(f"run_code_fresh_p{q}", percentile(fresh, q), percentile(jail, q),
                                 "ms", peer_name="bwrap --unshare-all python3 -c")  # fmt: skip
                bench.record("run_code_fresh_interp_p50", percentile(interp, 50), percentile(jail, 50),
                             "ms", peer_name="bwrap; the runner starting an interpreter per sandbox")  # fmt: skip
                if meter is not None:
                    bench.record("run_code_fresh_cpu", cpu["fresh"] / len(fresh),
                                 cpu["jail"] / len(jail), "ms",
                                 peer_name="bwrap's CPU per run, back to back")  # fmt: skip
                    bench.record("run_code_fresh_interp_cpu", cpu["interp"] / len(interp),
                                 cpu["jail"] / len(jail), "ms",
                                 peer_name="bwrap's; the runner starting interpreters")  # fmt: skip
                # Calls spaced as an agent's are (a model turn between two), not back to back: the
                # sandbox made ahead has started its interpreter by the next call.
                spaced: list[float] = []
                jail = []
                for _ in range(5):
                    spaced += asyncio.run(code_calls(runner, n // 5, session=False, pause=SPACED))
                    jail += bwrap_calls(n // 5, pause=SPACED)
                bench.record("run_code_fresh_spaced_p50", percentile(spaced, 50), percentile(jail, 50),
                             "ms", peer_name=f"bwrap, calls {SPACED * 1000:g} ms apart")  # fmt: skip
            session = asyncio.run(code_calls(runner, 50 if bench.quick else 500, session=True))
            runner.close()
            bench.record("run_code_session_p50", percentile(session[1:], 50), percentile(fresh, 50),
                         "ms", peer_name="run_code in a fresh sandbox")  # fmt: skip
            bench.record("run_code_session_p99", percentile(session[1:], 99), 2.0, "ms",
                         peer_name="goal: p50 <= 2 ms")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bench.save()


if __name__ == "__main__":
    main()
