"""MCP servers run by the node in their sandboxes (a test-made server written with the `mcp`
SDK, and `@modelcontextprotocol/server-filesystem` from npm), and the node's MCP endpoint and
tool API as a task uses them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import psutil
import pytest

from agentnode.audit import AuditLog, verify
from agentnode.egress.policy import EgressPolicy
from agentnode.egress.service import EgressService
from agentnode.errors import UsageError
from agentnode.isolation.spec import Mount
from agentnode.tools import mcpservers
from agentnode.tools.mcpservers import MCPServers, MCPServerSpec
from agentnode.tools.registry import Caller, Registry, ToolLimits
from agentnode.tools.service import ToolService
from conftest import processes_with, run_cli
from support.counting_listener import counting_listener
from support.egress_world import HOST4, OTHER4, World
from support.node_daemon import Daemon, daemon

#: The `world` fixture (a netns pair with a test HTTP server and a node bridge).
pytest_plugins = ["support.tools_world"]
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)"),
    pytest.mark.usefixtures("data_dir"),
]

REPO = Path(__file__).resolve().parents[1]
SERVER = str(REPO / "tests" / "support" / "tools_mcp_server.py")
NPM_CACHE = Path("/var/cache/agentnode-test/npm")
FILESYSTEM = NPM_CACHE / "node_modules/@modelcontextprotocol/server-filesystem/dist/index.js"


def sdk_server(*, name: str = "t", **kw: Any) -> MCPServerSpec:
    # uid 0 without capabilities: the interpreter lives under /root (mode 700). The checkout
    # (and its .venv) is bound in: it may sit under /tmp, which is the sandbox's own.
    kw.setdefault("mounts", (Mount(str(REPO), str(REPO)),))
    kw.setdefault("command", (sys.executable, SERVER))
    return MCPServerSpec(name=name, user="0",
                         env={"PYTHONPATH": str(REPO / "python")}, **kw)  # fmt: skip


def meta(result: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = result["_meta"]["agentnode"]
    return out


A = Caller(task="t1", tenant="a")
B = Caller(task="t2", tenant="b")


def host_pid_alive(pid: int | None) -> bool:
    return pid is not None and Path(f"/proc/{pid}").exists()


@pytest.mark.parametrize("name", ["../x", "a/b", ".", "..", "", "x" * 65, "tab\tname"])
def test_a_server_name_is_refused_unless_it_is_a_plain_label(name: str) -> None:
    """A server's name makes its tools' names and its workspaces' paths."""
    with pytest.raises(UsageError, match="a server name is 1-64 letters"):
        MCPServerSpec(name=name, command=("x",))


@pytest.mark.parametrize("command", [("/bin/sleep", "1000"), ("/bin/false",)])
def test_a_server_that_cannot_list_its_tools_costs_one_wait_not_one_per_listing(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    """A server that never answers (or exits at once) while a good one is beside it: listings
    at once wait for one attempt together, the next ones get the good server's tools at once
    (none of the broken one's) until `UNLISTED_S` passes, then it is tried again. Once the
    servers are closed none is started again (a call then fails as the node stopping)."""
    monkeypatch.setattr(mcpservers, "UNLISTED_S", 3.0)
    limits = ToolLimits(memory=256 << 20, pids=64, timeout=2)
    servers = MCPServers([sdk_server(name="mute", command=command, limits=limits),
                          sdk_server(name="t", limits=ToolLimits(memory=256 << 20, pids=64,
                                                                 timeout=60))])  # fmt: skip
    svc = ToolService(Registry(), on_record=lambda r: None, sources=[servers])

    async def timed(n: int) -> tuple[float, list[set[str]]]:
        t0 = time.monotonic()
        lists = await asyncio.gather(*(svc.list("a") for _ in range(n)))
        return time.monotonic() - t0, [{t["name"].split("__")[0] for t in x} for x in lists]

    async def scenario() -> list[tuple[float, list[set[str]]]]:
        out = [await timed(3), await timed(3)]
        await asyncio.sleep(3.0)
        out.append(await timed(1))
        await servers.close()
        out.append((0.0, [{str(meta(await svc.call("t__add", {"a": 1, "b": 2}, A))["class"])}]))
        return out

    (first, firsts), (again, agains), (later, _), (_, closed) = asyncio.run(scenario())
    assert firsts == agains == [{"t"}] * 3
    assert first < 2 * limits.timeout + 5  # one attempt for the three, not three in a row
    assert again < 1.0  # no second attempt within UNLISTED_S
    if command[0] == "/bin/sleep":
        assert later >= limits.timeout - 0.5  # tried again after UNLISTED_S
    assert closed == [{"transient"}] and servers.instance_pid("t", "a") is None


def test_a_server_runs_sandboxed_one_instance_per_tenant(data_dir: Path) -> None:
    servers = MCPServers([sdk_server(idle_s=1.0)])
    records: list[dict[str, Any]] = []
    svc = ToolService(Registry(), on_record=records.append, sources=[servers])

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {"tools": await svc.list("a")}
        out["add"] = await svc.call("t__add", {"a": 2, "b": 40}, A)
        out["bad"] = await svc.call("t__add", {"a": "x", "b": 1}, A)
        out["a1"] = await svc.call("t__whoami", {}, A)
        out["a2"] = await svc.call("t__whoami", {}, A)
        pid_a = servers.instance_pid("t", "a")
        out["b"] = await svc.call("t__whoami", {}, B)
        out["pids"] = (pid_a, servers.instance_pid("t", "b"))
        for _ in range(100):  # idle for longer than its 1 s: both are stopped
            if not any(host_pid_alive(p) for p in out["pids"]):
                break
            await asyncio.sleep(0.1)
        out["idle"] = (servers.instance_pid("t", "a"), servers.instance_pid("t", "b"))
        await servers.close()
        return out

    out = asyncio.run(scenario())
    assert {t["name"] for t in out["tools"]} == {"t__add", "t__whoami", "t__connect", "t__flaky",
                                                 "t__crash", "t__session", "t__hog", "t__flood",
                                                 "t__wait", "t__events", "t__blob",
                                                 "t__chatty"}  # fmt: skip
    add = next(t for t in out["tools"] if t["name"] == "t__add")
    assert add["outputSchema"]["properties"]["sum"]["type"] == "integer"
    assert meta(out["add"])["class"] == "ok" and out["add"]["structuredContent"] == {"sum": 42}
    assert meta(out["bad"])["class"] == "invalid_input" and meta(out["bad"])["path"] == "/a"
    # pid 1 of its own pid namespace, host name of the sandbox: it runs sandboxed.
    assert out["a1"]["structuredContent"]["result"].startswith("1 agentnode")
    pid_a, pid_b = out["pids"]
    assert pid_a != pid_b and None not in (pid_a, pid_b)
    assert out["idle"] == (None, None)
    assert not host_pid_alive(pid_a) and not host_pid_alive(pid_b)
    assert [r["tool"] for r in records][:2] == ["t__add", "t__add"]


def test_a_listing_waits_a_bounded_time_for_a_server_that_never_answers(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that never answers `initialize` (its start timeout 30 s) beside a good one: a
    listing gives the good one's tools after `LISTING_WAIT_S`, not the 30 s, and the next
    listing does not wait for it again (its one attempt goes on)."""
    monkeypatch.setattr(mcpservers, "LISTING_WAIT_S", 2.0)
    hung = sdk_server(name="hung", command=("/bin/sleep", "1000"),
                      limits=ToolLimits(memory=256 << 20, pids=64, timeout=30))  # fmt: skip
    servers = MCPServers([hung, sdk_server(name="t")])
    svc = ToolService(Registry(), on_record=lambda r: None, sources=[servers])

    async def scenario() -> list[tuple[float, set[str]]]:
        # The good server started first: what is timed is the wait for the hung one.
        assert meta(await svc.call("t__add", {"a": 1, "b": 2}, A))["class"] == "ok"
        out = []
        for _ in range(2):
            t0 = time.monotonic()
            listed = await svc.list("a")
            out.append((time.monotonic() - t0, {t["name"].split("__")[0] for t in listed}))
        await servers.close()
        return out

    (first, names), (second, again) = asyncio.run(scenario())
    assert names == again == {"t"}
    assert 1.5 < first < 10 and second < 3, (first, second)


#: A server whose tools depend on its workspace, which is its tenant's own.
_BY_WORKSPACE = """
import os
from mcp.server.mcpserver import MCPServer
label = open("label").read().strip() if os.path.exists("label") else "none"
server = MCPServer("by-workspace")
server.add_tool(lambda: label, name="only_" + label, description="from " + label)
server.run()
"""


def test_each_tenant_sees_the_tools_its_own_instance_lists(data_dir: Path) -> None:
    """An instance's listing may depend on its tenant's workspace: no tenant's names,
    descriptions or schemas stand for another's, in either order or at once."""
    spec = sdk_server(name="w", command=(sys.executable, "-c", _BY_WORKSPACE))
    for tenant, label in (("a", "alpha"), ("b", "beta"), ("c", "gamma")):
        ws = data_dir / "mcp" / "w" / tenant
        ws.mkdir(parents=True)
        (ws / "label").write_text(label)
    servers = MCPServers([spec])
    records: list[dict[str, Any]] = []
    svc = ToolService(Registry(), on_record=records.append, sources=[servers])

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {"a": await svc.list("a"), "b": await svc.list("b")}
        out["a call b's"] = await svc.call("w__only_beta", {}, A)
        out["b call"] = await svc.call("w__only_beta", {}, B)
        out["c and a"] = await asyncio.gather(svc.list("c"), svc.list("a"))
        await servers.close()
        return out

    out = asyncio.run(scenario())
    assert [(t["name"], t["description"]) for t in out["a"]] == [("w__only_alpha", "from alpha")]
    assert [t["name"] for t in out["b"]] == ["w__only_beta"]
    assert meta(out["a call b's"])["class"] == "invalid_input", out["a call b's"]
    assert out["b call"]["content"][0]["text"] == "beta", out["b call"]
    listed_c, listed_a = out["c and a"]
    assert [t["name"] for t in listed_c] == ["w__only_gamma"]
    assert [t["name"] for t in listed_a] == ["w__only_alpha"]


def test_a_listed_tool_the_node_cannot_take_is_left_out_and_no_schema_is_fetched(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A server's schemas are its word: an invalid one must not break the listing of its other
    # tools, and a `$ref` by URL must not make the node (outside every egress policy) connect.
    async def scenario(url: str) -> dict[str, Any]:
        servers = MCPServers([sdk_server(command=(sys.executable, SERVER, "--schemas", url))])
        svc = ToolService(Registry(), on_record=lambda r: None, sources=[servers])
        out: dict[str, Any] = {"names": {t["name"] for t in await svc.list("a")}}
        out["remote"] = await svc.call("t__remote", {"a": 1}, A)
        out["unreached"] = await svc.call("t__remote", {}, A)  # the $ref not on the way
        out["broken"] = await svc.call("t__broken", {}, A)
        out["add"] = await svc.call("t__add", {"a": 1, "b": 2}, A)
        await servers.close()
        return out

    with counting_listener() as (url, connections):
        out = asyncio.run(scenario(url))
    assert {"t__add", "t__remote"} <= out["names"] and "t__broken" not in out["names"]
    assert meta(out["remote"])["class"] == "invalid_input"
    assert "does not fetch" in out["remote"]["content"][0]["text"]
    assert url in out["remote"]["content"][0]["text"]
    assert meta(out["unreached"])["class"] == "ok"
    assert meta(out["broken"])["class"] == "invalid_input"
    assert out["add"]["structuredContent"] == {"sum": 3}
    assert connections == []
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(left_out) == 1 and "'broken'" in left_out[0]


@pytest.mark.parametrize(
    ("transport", "tool", "args"),
    [
        ("stdio", "t__flood", {"mib": 96}),  # one endless line, no answer
        ("stdio", "t__blob", {"size": 24 << 20}),  # an answer too large
        ("http", "t__blob", {"size": 24 << 20}),
    ],
)
def test_a_server_sending_past_the_message_bound_is_stopped_and_the_node_holds_little(
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    transport: str,
    tool: str,
    args: dict[str, Any],
) -> None:
    # A sandboxed server's own memory limit does not bound what the node holds for it: a
    # message past the node's bound stops it, the call is transient, and the next call gets
    # a new instance.
    monkeypatch.setattr(mcpservers, "MAX_MESSAGE", 4 << 20)
    limits = ToolLimits(memory=512 << 20, pids=64, timeout=60)
    http: dict[str, Any] = {"command": (sys.executable, SERVER, "--http", "8000"),
            "url": "http://127.0.0.1:8000/mcp"} if transport == "http" else {}  # fmt: skip
    servers = MCPServers([sdk_server(limits=limits, **http)])
    svc = ToolService(Registry(), on_record=lambda r: None, sources=[servers])
    me = psutil.Process()

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {"first": await svc.call("t__whoami", {}, A)}
        pid = servers.instance_pid("t", "a")
        rss, t0 = me.memory_info().rss, time.monotonic()
        out["over"] = await svc.call(tool, args, A)
        out["took"], out["grew"] = time.monotonic() - t0, me.memory_info().rss - rss
        out["gone"] = not host_pid_alive(pid)
        out["next"] = await svc.call("t__add", {"a": 1, "b": 2}, A)
        out["new"] = servers.instance_pid("t", "a") not in (None, pid)
        await servers.close()
        return out

    out = asyncio.run(scenario())
    assert meta(out["first"])["class"] == "ok"
    assert meta(out["over"])["class"] == "transient", out["over"]
    assert out["took"] < 30 and out["gone"]
    assert out["grew"] < 16 << 20, f"the node grew {out['grew'] >> 20} MiB"
    assert out["next"]["structuredContent"] == {"sum": 3} and out["new"]
    cut = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert len(cut) == 1 and cut[0].startswith("MCP server t (a) stopped")


class _Chunks(httpx2.AsyncByteStream):
    """A response body read as these chunks, unread until then (as a server's is)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def __aiter__(self) -> Any:
        for c in self.chunks:
            yield c


def test_the_message_bound_counts_each_event_of_an_event_stream_not_the_stream() -> None:
    # An HTTP server's SSE stream (a call's notifications and result, or its standing stream)
    # may run on past the bound in small events; a JSON answer is one message.
    event = b"data: " + b"x" * 1000 + b"\n\n"
    many = event * 100

    def answer(request: httpx2.Request) -> httpx2.Response:
        kind = "text/event-stream" if request.url.path == "/sse" else "application/json"
        return httpx2.Response(200, headers={"content-type": kind}, stream=_Chunks([event] * 100))

    async def get(path: str) -> tuple[int, list[str]]:
        cut: list[str] = []
        transport = mcpservers._CappedTransport(httpx2.MockTransport(answer),
                                                lambda e: cut.append(str(e)))  # fmt: skip
        async with httpx2.AsyncClient(transport=transport) as client:
            try:
                return len((await client.get(f"http://server{path}")).content), cut
            except httpx2.ReadError:
                return 0, cut

    with pytest.MonkeyPatch.context() as m:
        m.setattr(mcpservers, "MAX_MESSAGE", 64 << 10)
        assert asyncio.run(get("/sse")) == (len(many), [])
        assert asyncio.run(get("/json")) == (0, [f"a response longer than {64 << 10} bytes"])


def test_capped_streams_find_event_ends_across_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way an SSE event may end (LF LF, CR CR, CRLF CRLF, mixed), split anywhere between
    chunks, resets the count; bytes with no event end count as one message."""
    monkeypatch.setattr(mcpservers, "MAX_MESSAGE", 100)

    def read(chunks: list[bytes], *, events: bool) -> bytes | str:
        cut: list[str] = []
        stream = mcpservers._CappedStream(_Chunks(chunks), lambda e: cut.append(str(e)),
                                          events=events)  # fmt: skip

        async def go() -> bytes:
            return b"".join([c async for c in stream])

        try:
            return asyncio.run(go())
        except httpx2.ReadError:
            return cut[0]

    event = b"data: " + b"x" * 60
    for end in (b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n", b"\r\n\n"):
        body = (event + end) * 10  # 660+ bytes, each event under 100
        for size in (1, 2, 3, 7, 64, len(body)):
            chunks = [body[i : i + size] for i in range(0, len(body), size)]
            assert read(chunks, events=True) == body, (end, size)
    assert read([b"data: " + b"y" * 120 + b"\n\n"], events=True) == "an event longer than 100 bytes"
    assert read([event + b"\n", b"data: " + b"z" * 60 + b"\n\n"], events=True) == (
        "an event longer than 100 bytes")  # one event of two lines  # fmt: skip
    assert read([event + b"\n\n"] * 2, events=False) == "a response longer than 100 bytes"


def test_a_crashed_server_is_restarted_and_a_keyed_call_runs_once(data_dir: Path) -> None:
    servers = MCPServers([sdk_server(limits=ToolLimits(memory=256 << 20, pids=64, timeout=60))])
    svc = ToolService(Registry(), on_record=lambda r: None, sources=[servers])
    marker = data_dir / "mcp" / "t" / "a" / "runs"

    async def scenario() -> list[dict[str, Any]]:
        try:
            crash = await svc.call("t__crash", {}, A)
            after = await svc.call("t__add", {"a": 1, "b": 1}, A)
            # Fails (the server dies) twice, then succeeds: three runs under one key.
            args = {"fails": 2, "marker": "runs"}
            first = await svc.call("t__flaky", args, A, idempotency_key="k1")
            again = await svc.call("t__flaky", args, A, idempotency_key="k1")
            unkeyed = await svc.call("t__flaky", {"fails": 5, "marker": "other"}, A)
            hog = await svc.call("t__hog", {"mib": 1024}, A)
            back = await svc.call("t__add", {"a": 1, "b": 1}, A)
            return [crash, after, first, again, unkeyed, hog, back]
        finally:
            await servers.close()

    crash, after, first, again, unkeyed, hog, back = asyncio.run(scenario())
    assert meta(crash)["class"] == "transient" and meta(crash)["retryable"]
    assert meta(after)["class"] == "ok"
    assert meta(first)["class"] == "ok" and meta(first)["attempts"] == 3
    assert first["content"][0]["text"] == "ran 3 times"
    assert again == first and marker.read_text() == "3"
    assert meta(unkeyed)["class"] == "transient" and meta(unkeyed)["attempts"] == 1
    # Killed at its sandbox's memory limit: `resource`, not retried; the next call restarts it.
    assert meta(hog)["class"] == "resource" and "memory" in hog["content"][0]["text"], hog
    assert meta(hog)["attempts"] == 1 and meta(back)["class"] == "ok"


def test_a_call_past_its_timeout_is_cancelled_and_its_server_started_again(
    data_dir: Path,
) -> None:
    """A passed-through call with no answer in the server's timeout comes back `timeout`
    (retryable, not retried without a key), the server is stopped (its state may be wedged)
    and the next call starts a new one; calls still in flight on it end `transient`."""
    servers = MCPServers([sdk_server(limits=ToolLimits(memory=256 << 20, pids=64, timeout=8))])
    records: list[dict[str, Any]] = []
    svc = ToolService(Registry(), on_record=records.append, sources=[servers])

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            await svc.call("t__add", {"a": 1, "b": 1}, A)
            out["pid"] = servers.instance_pid("t", "a")
            out["late"], out["later"] = await asyncio.gather(
                svc.call("t__wait", {"seconds": 30}, A),
                svc.call("t__wait", {"seconds": 1.0}, A),
            )
            out["gone"] = host_pid_alive(out["pid"])
            out["after"] = await svc.call("t__add", {"a": 2, "b": 3}, A)
            out["new pid"] = servers.instance_pid("t", "a")
        finally:
            await servers.close()
        return out

    out = asyncio.run(scenario())
    late = meta(out["late"])
    assert late["class"] == "timeout" and late["retryable"] and late["attempts"] == 1, late
    assert meta(out["later"])["class"] == "ok", "the quick call on it was answered first"
    assert not out["gone"]
    assert out["after"]["structuredContent"] == {"sum": 5}
    assert out["new pid"] not in (None, out["pid"])
    assert [r["class"] for r in records] == ["ok", "ok", "timeout", "ok"]


def test_a_server_whose_egress_allows_nothing_cannot_connect_out(
    world: tuple[World, EgressService], data_dir: Path
) -> None:
    """Over stdio and over streamable HTTP (its server on the sandbox's own loopback, which
    its policy does not block): the call comes back `policy`, naming the denial's record in the
    node's audit log, where the tool call's record points at it too."""
    _, net = world
    audit = AuditLog(data_dir / "audit")
    stdio = sdk_server(network="egress", egress=EgressPolicy())
    http = sdk_server(name="h", network="egress", egress=EgressPolicy(),
                      command=(sys.executable, SERVER, "--http", "8000"),
                      url="http://127.0.0.1:8000/mcp")  # fmt: skip
    servers = MCPServers([stdio, http], node_network=net)
    svc = ToolService(Registry(), on_record=audit.append, sources=[servers])

    async def scenario() -> list[dict[str, Any]]:
        try:
            return [
                await svc.call(f"{server}__connect", {"host": HOST4, "port": 8080}, A)
                for server in ("t", "h")
            ]
        finally:
            await servers.close()

    results = asyncio.run(scenario())
    audit.close()
    lines = (data_dir / "audit" / "audit.log").read_text().splitlines()
    logged = {r["seq"]: r for r in map(json.loads, lines)}
    for result, tool in zip(results, ("t__connect", "h__connect"), strict=True):
        assert meta(result)["class"] == "policy", result
        denial = meta(result)["denial"]
        assert denial["address"] == HOST4 and denial["port"] == 8080
        record = logged[denial["record"]]
        assert record["kind"] == "egress_denied" and record["tool"] == tool
        assert (record["task"], record["tenant"], record["port"]) == ("t1", "a", 8080)
        (call,) = (r for r in logged.values() if r["kind"] == "tool_call" and r["tool"] == tool)
        assert call["class"] == "policy" and denial["record"] in call["denials"]
        assert call["seq"] > denial["record"]
    assert verify(data_dir / "audit").records == len(logged)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_a_streamable_http_server_the_node_runs_in_its_sandbox(data_dir: Path) -> None:
    """`command` and `url`: the server listens on its sandbox's own loopback (no network of its
    own) and the node reaches it there with the SDK's streamable HTTP client: one instance per
    tenant, restarted after a crash, a keyed call runs once, stopped when idle, each call
    recorded."""
    url = "http://127.0.0.1:8000/mcp"
    spec = sdk_server(command=(sys.executable, SERVER, "--http", "8000"), url=url, idle_s=1.0)
    servers = MCPServers([spec])
    records: list[dict[str, Any]] = []
    svc = ToolService(Registry(), on_record=records.append, sources=[servers])

    def open_fds() -> set[str]:
        out = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own fd is gone by now
                out.add(os.readlink(f"/proc/self/fd/{fd}"))
        return out

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {"tools": {t["name"] for t in await svc.list("a")}}
        out["add"] = await svc.call("t__add", {"a": 2, "b": 40}, A)
        out["bad"] = await svc.call("t__add", {"a": "x", "b": 1}, A)
        out["a"] = await svc.call("t__whoami", {}, A)
        pid_a = servers.instance_pid("t", "a")
        out["netns"] = {os.readlink(f"/proc/{pid_a}/ns/net")}
        assert out["netns"] <= open_fds()
        out["b"] = await svc.call("t__whoami", {}, B)
        out["pids"] = (pid_a, servers.instance_pid("t", "b"))
        out["crash"] = await svc.call("t__crash", {}, A)
        out["after"] = await svc.call("t__add", {"a": 1, "b": 1}, A)
        args = {"fails": 2, "marker": "runs"}
        out["first"] = await svc.call("t__flaky", args, A, idempotency_key="k1")
        out["again"] = await svc.call("t__flaky", args, A, idempotency_key="k1")
        pids = (servers.instance_pid("t", "a"), servers.instance_pid("t", "b"))
        for _ in range(100):  # idle for longer than its 1 s: both are stopped
            if not any(host_pid_alive(p) for p in pids):
                break
            await asyncio.sleep(0.1)
        out["idle"] = pids
        await servers.close()
        return out

    out = asyncio.run(scenario())
    # The node held each instance's network namespace open while it ran, and let go after.
    assert out["netns"] and not out["netns"] & open_fds()
    assert "t__add" in out["tools"] and "t__session" in out["tools"]
    assert meta(out["add"])["class"] == "ok" and out["add"]["structuredContent"] == {"sum": 42}
    assert meta(out["bad"])["class"] == "invalid_input" and meta(out["bad"])["path"] == "/a"
    # pid 1 of its own pid namespace, the sandbox's host name: it runs sandboxed.
    assert out["a"]["structuredContent"]["result"].startswith("1 agentnode")
    assert None not in out["pids"] and out["pids"][0] != out["pids"][1]
    assert meta(out["crash"])["class"] == "transient" and meta(out["after"])["class"] == "ok"
    assert meta(out["first"])["class"] == "ok" and meta(out["first"])["attempts"] == 3
    assert out["again"] == out["first"]
    assert (data_dir / "mcp" / "t" / "a" / "runs").read_text() == "3"
    assert not any(host_pid_alive(p) for p in out["idle"])
    assert [r["tool"] for r in records][:3] == ["t__add", "t__add", "t__whoami"]
    assert [r["class"] for r in records][:2] == ["ok", "invalid_input"]


def test_a_streamable_http_server_a_user_runs_on_loopback(tmp_path: Path) -> None:
    """`url` only: the node connects to a server it does not run, one client per tenant;
    the server gone is `transient`, and once it is back the next call connects again."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO / "python"), "MCP_TEST_DIR": str(tmp_path)}

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, SERVER, "--http", str(port)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        for _ in range(200):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return proc
            time.sleep(0.05)
        proc.kill()
        raise AssertionError("the test server did not listen")

    spec = MCPServerSpec(name="u", url=f"http://127.0.0.1:{port}/mcp", idle_s=1.0)
    servers = MCPServers([spec])
    records: list[dict[str, Any]] = []
    svc = ToolService(Registry(), on_record=records.append, sources=[servers])
    user = start()

    async def scenario() -> dict[str, Any]:
        nonlocal user
        out: dict[str, Any] = {"add": await svc.call("u__add", {"a": 2, "b": 3}, A)}
        out["sa"] = [await svc.call("u__session", {}, A) for _ in range(2)]
        out["sb"] = await svc.call("u__session", {}, B)
        out["crash"] = await svc.call("u__crash", {}, A)
        user.wait()
        out["down"] = await svc.call("u__add", {"a": 1, "b": 1}, A)
        user = start()
        out["back"] = await svc.call("u__add", {"a": 1, "b": 1}, A)
        args = {"fails": 0, "marker": "runs"}
        out["keyed"] = await svc.call("u__flaky", args, A, idempotency_key="k")
        out["again"] = await svc.call("u__flaky", args, A, idempotency_key="k")
        await servers.close()
        return out

    try:
        out = asyncio.run(scenario())
    finally:
        user.kill()
        user.wait()
    assert meta(out["add"])["class"] == "ok" and out["add"]["structuredContent"] == {"sum": 5}
    a1, a2 = (r["structuredContent"]["result"] for r in out["sa"])
    b = out["sb"]["structuredContent"]["result"]
    assert a1 == a2 and a1 and b and a1 != b, "one connection per tenant"
    assert meta(out["crash"])["class"] == "transient"
    assert meta(out["down"])["class"] == "transient", out["down"]
    assert "did not start" in out["down"]["content"][0]["text"]
    assert "\n" not in out["down"]["content"][0]["text"]
    assert meta(out["back"])["class"] == "ok"
    assert meta(out["keyed"])["class"] == "ok"
    assert out["again"] == out["keyed"] and (tmp_path / "runs").read_text() == "1"
    assert all(r["tenant"] in ("a", "b") and r["tool"].startswith("u__") for r in records)


@pytest.fixture(scope="module")
def filesystem_server() -> Path:
    """`@modelcontextprotocol/server-filesystem`, installed once into a cache outside the repo."""
    if not FILESYSTEM.exists():
        NPM_CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund",
                        "@modelcontextprotocol/server-filesystem"], cwd=NPM_CACHE, check=True,
                       capture_output=True, timeout=300)  # fmt: skip
    return FILESYSTEM


def test_the_npm_filesystem_server_sees_only_its_directory(
    filesystem_server: Path, tmp_path: Path
) -> None:
    given = tmp_path / "given"
    given.mkdir()
    (given / "note.txt").write_text("inside")
    (tmp_path / "outside.txt").write_text("outside secret")
    os.symlink(tmp_path / "outside.txt", given / "link.txt")
    spec = MCPServerSpec(name="fs", command=("node", str(filesystem_server), "/data"),
                         mounts=(Mount(str(given), "/data", writable=True),), user="0",
                         limits=ToolLimits(memory=512 << 20, pids=64, timeout=60))  # fmt: skip
    servers = MCPServers([spec])
    svc = ToolService(Registry(), on_record=lambda r: None, sources=[servers])

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {"tools": {t["name"] for t in await svc.list("a")}}
        read = "fs__read_text_file" if "fs__read_text_file" in out["tools"] else "fs__read_file"
        out["inside"] = await svc.call(read, {"path": "/data/note.txt"}, A)
        outside = [str(tmp_path / "outside.txt"), "/data/../etc/passwd", "/etc/hostname",
                   "/data/link.txt"]  # fmt: skip
        out["outside"] = [await svc.call(read, {"path": p}, A) for p in outside]
        out["write"] = await svc.call("fs__write_file", {"path": "/tmp/x", "content": "x"}, A)
        out["wrote"] = await svc.call(
            "fs__write_file", {"path": "/data/new.txt", "content": "n"}, A
        )
        await servers.close()
        return out

    out = asyncio.run(scenario())
    assert meta(out["inside"])["class"] == "ok", out["inside"]
    assert "inside" in out["inside"]["content"][0]["text"]
    for result in out["outside"]:
        assert result["isError"], result
        assert "outside secret" not in json.dumps(result) and "root:" not in json.dumps(result)
    assert out["write"]["isError"]
    assert meta(out["wrote"])["class"] == "ok" and (given / "new.txt").read_text() == "n"


def test_idempotency_keys_outlive_a_node_restart(tmp_path: Path) -> None:
    """A keyed call that ran before a `kill -9` and restart of the node returns its first
    result afterwards and does not run again; one cut off mid-run is never run again under its
    key; the same key with other arguments is refused."""
    config = (
        "[tools.mcp.t]\n"
        f"command = [{json.dumps(sys.executable)}, {json.dumps(SERVER)}]\n"
        f"env = {{ PYTHONPATH = {json.dumps(str(REPO / 'python'))} }}\n"
        f"ro = [{json.dumps(str(REPO))}]\n"
        'user = "0"\n'
    )
    d = Daemon(tmp_path, config)
    runs = d.data / "mcp" / "t" / "a" / "runs"
    flaky = {"fails": 0, "marker": "runs"}

    def call(name: str, args: dict[str, Any], key: str) -> dict[str, Any]:
        body = {"arguments": args, "tenant": "a", "idempotency_key": key}
        out: dict[str, Any] = d.client.call("POST", f"/v1/tools/{name}/call", body)
        return out

    def sleeping() -> bool:
        return bool(processes_with("sleep\x0031.5", exact=True))

    d.start()
    try:
        first = call("t__flaky", flaky, "k1")

        def cut_off() -> None:
            with contextlib.suppress(Exception):  # the node dies under it
                call("run_code", {"language": "bash", "code": "sleep 31.5"}, "k-cut")

        cut = threading.Thread(target=cut_off, daemon=True)
        cut.start()
        for _ in range(300):
            if sleeping():
                break
            time.sleep(0.05)
        assert sleeping(), "the keyed run_code call did not start"
        d.stop(signal.SIGKILL)
        cut.join(10)
        d.start()
        again = call("t__flaky", flaky, "k1")
        other = call("t__flaky", {"fails": 0, "marker": "other"}, "k1")
        cut_again = call("run_code", {"language": "bash", "code": "sleep 31.5"}, "k-cut")
        fresh = call("t__flaky", flaky, "k2")
    finally:
        if d.proc is not None:
            d.stop()
    assert meta(first)["class"] == "ok" and first["content"][0]["text"] == "ran 1 times"
    assert again == first, "the first result, from before the restart"
    assert meta(other)["class"] == "invalid_input" and "other arguments" in json.dumps(other)
    assert meta(cut_again)["class"] == "permanent" and meta(cut_again)["interrupted"] is True
    assert "cut off by a node restart" in cut_again["content"][0]["text"]
    assert fresh["content"][0]["text"] == "ran 2 times" and runs.read_text() == "2"
    assert not sleeping()


TASK_CLIENT = """
import asyncio, json, os
from agentnode.sdk import Tools

async def main():
    async with Tools.mcp_client() as client:
        names = sorted(t.name for t in (await client.list_tools()).tools)
        added = await client.call_tool("t__add", {"a": 20, "b": 22})
        code = await client.call_tool("run_code", {"code": "x = 5", "session": True})
        code = await client.call_tool("run_code", {"code": "print(x * 2)", "session": True})
        wrote = await client.call_tool("write_file", {"path": "w.txt", "content": "hi"})
        read = "fs__read_text_file" if "fs__read_text_file" in names else "fs__read_file"
        fs = await client.call_tool(read, {"path": "/data/note.txt"})
        http = await client.call_tool("h__add", {"a": 1, "b": 2})
    # The streamable-HTTP door, which unmodified MCP clients take, lists the same tools.
    async with Tools.mcp_client(url=os.environ["AGENTNODE_MCP_URL"]) as door:
        door_names = sorted(t.name for t in (await door.list_tools()).tools)
    rest = Tools().call("read_file", {"path": "/workspace/w.txt"})
    print(json.dumps({
        "url": os.environ["AGENTNODE_MCP_URL"], "names": names, "door_names": door_names,
        "socket": os.environ["AGENTNODE_MCP_STDIO_SOCKET"],
        "added": added.structured_content, "code": code.structured_content["stdout"],
        "class": code.meta["agentnode"]["class"], "wrote": wrote.is_error,
        "rest": rest["content"][0]["text"], "listed": len(Tools().list()),
        "fs": fs.content[0].text, "http": http.structured_content,
    }))

asyncio.run(main())
"""


def test_a_task_uses_node_tools_through_its_mcp_endpoint_and_the_api(
    tmp_path: Path, filesystem_server: Path
) -> None:
    """A task lists and calls, through its MCP socket with the `mcp` client SDK (what
    `Tools.mcp_client()` takes), the built-ins and the tools of three servers the node runs in
    sandboxes: the test server over stdio and over streamable HTTP, and the npm filesystem
    server; `AGENTNODE_MCP_URL` lists the same; and the API door."""
    given = tmp_path / "given"
    given.mkdir()
    (given / "note.txt").write_text("from the filesystem server")
    config = (
        "[tools.mcp.fs]\n"
        f'command = ["node", {json.dumps(str(filesystem_server))}, "/data"]\n'
        f"ro = [{json.dumps(f'{given}:/data')}]\n"
        'user = "0"\n'
        "[tools.mcp.h]\n"
        f'command = [{json.dumps(sys.executable)}, {json.dumps(SERVER)}, "--http", "8000"]\n'
        'url = "http://127.0.0.1:8000/mcp"\n'
        f"env = {{ PYTHONPATH = {json.dumps(str(REPO / 'python'))} }}\n"
        f"ro = [{json.dumps(str(REPO))}]\n"
        'user = "0"\n'
        "[tools.mcp.t]\n"
        f"command = [{json.dumps(sys.executable)}, {json.dumps(SERVER)}]\n"
        f"env = {{ PYTHONPATH = {json.dumps(str(REPO / 'python'))} }}\n"
        f"ro = [{json.dumps(str(REPO))}]\n"
        'user = "0"\n'
        "[tools.mcp.only_b]\n"
        f"command = [{json.dumps(sys.executable)}, {json.dumps(SERVER)}]\n"
        f"ro = [{json.dumps(str(REPO))}]\n"
        'tenants = ["b"]\n'
    )
    with daemon(tmp_path, config) as d:
        task = d.submit([sys.executable, "-c", TASK_CLIENT], user="0", memory="256M",
                        ro=[str(REPO)], env={"PYTHONPATH": str(REPO / "python")})  # fmt: skip
        done = d.wait(task["id"], timeout=120)
        log = d.log(task["id"])
        assert done["state"] == "succeeded", log
        seen = json.loads(log.strip().splitlines()[-1])
        # The admin API answers for a tenant, and for a task (its workspace).
        listed = d.client.call("GET", "/v1/tools?tenant=a")["tools"]
        ran = d.client.call("POST", "/v1/tools/run_code/call",
                            {"arguments": {"code": "print(7)"}, "tenant": "a"})  # fmt: skip
        read = d.client.call("POST", "/v1/tools/read_file/call",
                             {"arguments": {"path": "w.txt"}, "task": task["id"]})  # fmt: skip
    # Every call's record is in the node's audit log (written out by the time the node stops).
    logged = [json.loads(x) for x in (d.data / "audit" / "audit.log").read_text().splitlines()]
    records = [r for r in logged if r["kind"] == "tool_call"]
    assert seen["url"] == "http://agentnode/mcp"
    assert seen["socket"] == "/run/agentnode/sockets/mcps.sock"
    assert seen["door_names"] == seen["names"]
    assert "t__add" in seen["names"] and "run_code" in seen["names"]
    assert not any(n.startswith("only_b") for n in seen["names"])  # another tenant's server
    assert seen["added"] == {"sum": 42} and seen["code"] == "10\n" and seen["class"] == "ok"
    assert seen["fs"] == "from the filesystem server" and seen["http"] == {"sum": 3}
    assert any(n.startswith("fs__") for n in seen["names"]) and "h__add" in seen["names"]
    assert seen["wrote"] is False and seen["rest"] == "hi"
    assert seen["listed"] == len(seen["names"])
    assert {t["name"] for t in listed} == set(seen["names"])
    assert ran["structuredContent"]["stdout"] == "7\n" and read["content"][0]["text"] == "hi"
    mine = [r for r in records if r["task"] == task["id"]]
    # The task's own seven calls, then the operator's read_file made for it.
    fs_read = "fs__read_text_file" if "fs__read_text_file" in seen["names"] else "fs__read_file"
    assert [r["tool"] for r in mine] == [
        "t__add", "run_code", "run_code", "write_file", fs_read, "h__add", "read_file",
        "read_file",
    ]  # fmt: skip
    assert all(r["tenant"] == "default" and r["class"] == "ok" for r in mine)


NETWORKED_CODE = """
import json
from agentnode.sdk import Tools
def connect(host):
    return f"import socket; socket.create_connection(({host!r}, 8080), timeout=5); print('in')"
out = {}
for session in (False, True):
    for name, host in (("a", %r), ("b", %r)):
        r = Tools().call("run_code", {"code": connect(host), "session": session})
        agentnode = r["_meta"]["agentnode"]
        out[f"{name}{int(session)}"] = [agentnode["class"], agentnode.get("denial")]
print(json.dumps(out))
"""


def test_run_code_with_the_task_network_through_the_node(tmp_path: Path) -> None:
    """`[tools.run_code] network = "task"`: a task allowed HOST4:8080 (not OTHER4:8080) calls
    run_code through the node API: it reaches HOST4 and is denied OTHER4 (`policy`, naming
    the denial's record in the node's audit log); a call made with the node's token for a
    tenant has no network."""
    with World() as world:
        world.serve(tcp=[[HOST4, 8080], [OTHER4, 8080]])
        config = (
            f'[network]\nsubnet = "10.{os.getpid() % 250 + 1}.{time.time_ns() % 250}.0/24"\n'
            '[tools.run_code]\nnetwork = "task"\n'
        )
        netns = ("nsenter", f"--net=/run/netns/{world.task}")
        with daemon(tmp_path, config, netns) as d:
            task = d.submit([sys.executable, "-c", NETWORKED_CODE % (HOST4, OTHER4)],
                            network="egress", allow=[f"{HOST4}:8080"], user="0",
                            memory="256M", ro=[str(REPO)],
                            env={"PYTHONPATH": str(REPO / "python")})  # fmt: skip
            done = d.wait(task["id"], timeout=120)
            log = d.log(task["id"])
            code = f"import socket; socket.create_connection(({HOST4!r}, 8080), timeout=5)"
            untasked = d.client.call("POST", "/v1/tools/run_code/call",
                                     {"arguments": {"code": code}, "tenant": "a"})  # fmt: skip
    assert done["state"] == "succeeded", log
    seen = json.loads(log.strip().splitlines()[-1])
    logged = {r["seq"]: r for r in
              map(json.loads, (d.data / "audit" / "audit.log").read_text().splitlines())}  # fmt: skip
    for session in "01":
        assert seen[f"a{session}"] == ["ok", None], seen
        cls, denial = seen[f"b{session}"]
        assert cls == "policy" and (denial["address"], denial["port"]) == (OTHER4, 8080), seen
        record = logged[denial["record"]]
        assert record["kind"] == "egress_denied" and record["tool"] == "run_code"
        assert record["task"] == task["id"] and record["address"] == OTHER4
    assert meta(untasked)["class"] == "permanent" and "denial" not in meta(untasked)
    assert "unreachable" in untasked["content"][0]["text"]


def test_the_mcp_endpoint_refuses_a_missing_or_wrong_token(tmp_path: Path) -> None:
    script = """
import asyncio, json, os
from agentnode.errors import ConfigError
from agentnode.sdk import Tools
async def main():
    url = os.environ["AGENTNODE_MCP_URL"]
    async with Tools.mcp_client(url=url, token="not-a-token") as client:
        tools = (await client.list_tools()).tools
        call = await client.call_tool("run_code", {"code": "print(1)"})
    try:
        async with Tools.mcp_client(token="not-a-token") as client:
            socket = "connected"
    except ConfigError as e:
        socket = str(e)
    print(json.dumps({"tools": len(tools), "error": call.is_error,
                      "text": call.content[0].text, "socket": socket}))
asyncio.run(main())
"""
    with daemon(tmp_path) as d:
        task = d.submit([sys.executable, "-c", script], user="0", memory="256M", ro=[str(REPO)],
                        env={"PYTHONPATH": str(REPO / "python")})  # fmt: skip
        done = d.wait(task["id"], timeout=60)
        log = d.log(task["id"])
        sock = ["--socket", str(d.socket)]
        ls = run_cli(["tool", "ls", *sock])
        ok = run_cli(["tool", "call", "run_code", "--json", '{"code": "print(6 * 7)"}', *sock])
        bad = run_cli(["tool", "call", "run_code", "--json", '{"code": 1}', *sock])
        garbled = run_cli(["tool", "call", "run_code", "--json", "{nope", *sock])
    assert ls.returncode == 0 and "run_code" in ls.stdout and "read_file" in ls.stdout
    assert ok.returncode == 0 and ok.stdout.startswith("42\n"), ok
    assert bad.returncode == 1 and "input /code: 1 is not of type 'string'" in bad.stdout
    assert bad.stderr == "agentnode: tool run_code: invalid_input\n"
    assert garbled.returncode == 2 and garbled.stderr.startswith("agentnode: error: --json:")
    assert done["state"] == "succeeded", (done["reason"], log)
    seen = json.loads(log.strip().splitlines()[-1])
    assert seen == {
        "tools": 0,
        "error": True,
        "text": "missing or unknown task token (send Authorization: Bearer TOKEN)",
        "socket": "the node's MCP socket /run/agentnode/sockets/mcps.sock refused the "
        "connection: error: missing or unknown task token (send the task's token as the first "
        "line)",
    }
