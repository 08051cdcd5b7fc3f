"""The node's MCP socket (MCP's stdio framing on a unix socket, `agentnode.tools.mcpsocket`):
what `Tools.mcp_client()` uses in a task. Tenants, tokens, malformed input, clients that leave
mid-call, and per-tenant server instances, with the `mcp` client SDK and with raw lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mcp_types import TextContent

from agentnode.errors import ConfigError, NodeUnreachable, TaskError
from agentnode.isolation.spec import Mount
from agentnode.sdk.tools import Tools
from agentnode.tools.lines import MAX_CONTAINERS
from agentnode.tools.mcpservers import MCPServers, MCPServerSpec
from agentnode.tools.mcpsocket import MCPSocket
from agentnode.tools.registry import Caller, Registry, Tool
from agentnode.tools.result import Outcome
from agentnode.tools.service import ToolService

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)"),
    pytest.mark.usefixtures("data_dir"),
]

REPO = Path(__file__).resolve().parents[1]
SERVER = str(REPO / "tests" / "support" / "tools_mcp_server.py")
CALLERS = {
    "ta": Caller(task="t1", tenant="a"),
    "tb": Caller(task="t2", tenant="b"),
    "tc": Caller(task="t4", tenant="c"),
}
A3 = Caller(task="t3", tenant="a")
REFUSED = "error: missing or unknown task token (send the task's token as the first line)"
OBJECT = {"type": "object"}


class Node:
    """A tool service behind an MCP socket, in the test's loop; `slow` blocks until released
    (or cancelled) and says which happened in `events`."""

    def __init__(self, path: Path, *, servers: MCPServers | None = None, **kw: Any) -> None:
        self.records: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

        async def echo(args: dict[str, Any], caller: Caller) -> Outcome:
            return Outcome.text(f"{caller.task}/{caller.tenant}: {args.get('say', '')}")

        async def slow(args: dict[str, Any], caller: Caller) -> Outcome:
            self.entered += 1
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.events.append("cancelled")
                raise
            self.events.append("finished")
            return Outcome.text("done")

        async def count(args: dict[str, Any], caller: Caller) -> Outcome:
            self.runs += 1
            return Outcome.text(f"run {self.runs} of {args['n']}")

        self.runs = 0
        #: How many `slow` calls have started.
        self.entered = 0
        counted = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        registry = Registry([
            Tool(name="echo", description="echo", input_schema=OBJECT, run=echo),
            Tool(name="b_only", description="b's", input_schema=OBJECT, run=echo,
                 tenants=frozenset({"b"})),
            Tool(name="slow", description="waits", input_schema=OBJECT, run=slow),
            Tool(name="count", description="counts its runs", input_schema=counted, run=count,
                 tenants=frozenset({"c"})),
        ])  # fmt: skip
        self.service = ToolService(
            registry, on_record=self.records.append, sources=[servers] if servers else []
        )
        #: The tokens it takes (a test revokes one by removing it).
        self.tokens = dict(CALLERS)
        self.socket = MCPSocket(self.service, lambda t: self.tokens.get(t), path=path, **kw)


@asynccontextmanager
async def serving(tmp_path: Path, **kw: Any) -> AsyncIterator[Node]:
    node = Node(tmp_path / "mcps.sock", **kw)
    await node.socket.start()
    try:
        yield node
    finally:
        await node.socket.stop()


@asynccontextmanager
async def http_door(tmp_path: Path) -> AsyncIterator[tuple[Node, Any]]:
    """A `Node` behind the streamable-HTTP door (on a unix socket), and an httpx client to it
    (its url: `DOOR`)."""
    import httpx2

    from agentnode.tools.endpoint import MCPEndpoint, mcp_app

    node = Node(tmp_path / "mcps.sock")
    uds = tmp_path / "mcp.sock"
    endpoint = MCPEndpoint(lambda: mcp_app(node.service, node.tokens.get), uds=uds)
    await endpoint.start()
    try:
        transport = httpx2.AsyncHTTPTransport(uds=str(uds))
        async with httpx2.AsyncClient(transport=transport, timeout=30) as http:
            yield node, http
    finally:
        await endpoint.stop()


DOOR = "http://agentnode/mcp"


class Raw:
    """A connection speaking lines by hand, to send what the SDK never would."""

    def __init__(self, path: Path) -> None:
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter
        self.path = path

    async def open(self, token: str) -> str:
        self.reader, self.writer = await asyncio.open_unix_connection(str(self.path))
        return await self.send(token)

    async def send(self, line: str) -> str:
        self.writer.write(line.encode(errors="surrogateescape") + b"\n")
        await self.writer.drain()
        return (await asyncio.wait_for(self.reader.readline(), 10)).decode()

    async def message(self, line: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(await self.send(line))
        return out

    async def initialize(self) -> None:
        init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}}  # fmt: skip
        assert "result" in await self.message(json.dumps(init))
        self.writer.write(b'{"jsonrpc": "2.0", "method": "notifications/initialized"}\n')

    async def discover(self) -> None:
        """Opens the connection in the 2026-07-28 era (what `Tools.mcp_client()` does)."""
        line = {
            "jsonrpc": "2.0",
            "id": 0,
            "method": "server/discover",
            "params": {"_meta": ENVELOPE},
        }
        assert "result" in await self.message(json.dumps(line))

    async def opening(self, era: str) -> None:
        await (self.discover() if era == "modern" else self.initialize())

    async def receive(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(await asyncio.wait_for(self.reader.readline(), 30))
        return out

    def close(self) -> None:
        self.writer.close()


#: The 2026-07-28 per-request envelope.
ENVELOPE = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
}


def call_line(
    request_id: int | str,
    name: Any,
    args: Any = None,
    *,
    era: str = "legacy",
    meta: dict[str, Any] | None = None,
) -> str:
    """A `tools/call` line; in the modern era with the envelope (and `meta`) in `_meta`."""
    params: dict[str, Any] = {"name": name, "arguments": {} if args is None else args}
    if era == "modern" or meta is not None:
        params["_meta"] = {**(ENVELOPE if era == "modern" else {}), **(meta or {})}
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "tools/call",
                       "params": params})  # fmt: skip


def test_a_task_sees_only_its_tenants_tools_and_calls_as_itself(tmp_path: Path) -> None:
    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with serving(tmp_path) as node:
            path = str(node.socket.path)
            async with Tools.mcp_client(socket=path, token="ta") as a, \
                    Tools.mcp_client(socket=path, token="tb") as b:  # fmt: skip
                out["a"] = sorted(t.name for t in (await a.list_tools()).tools)
                out["b"] = sorted(t.name for t in (await b.list_tools()).tools)
                out["echo"] = await a.call_tool("echo", {"say": "hi"})
                out["theirs"] = await a.call_tool("b_only", {})
                out["mine"] = await b.call_tool("b_only", {"say": "b"})
            out["records"] = node.records
        return out

    out = asyncio.run(scenario())
    assert out["a"] == ["echo", "slow"] and out["b"] == ["b_only", "echo", "slow"]
    assert out["echo"].content[0].text == "t1/a: hi" and not out["echo"].is_error
    assert out["echo"].meta["agentnode"]["class"] == "ok"
    # Another tenant's tool looks like no tool at all.
    assert out["theirs"].is_error and out["theirs"].meta["agentnode"]["class"] == "invalid_input"
    assert "no tool named 'b_only'" in out["theirs"].content[0].text
    assert out["mine"].content[0].text == "t2/b: b"
    assert [(r["task"], r["tenant"], r["tool"], r["class"]) for r in out["records"]] == [
        ("t1", "a", "echo", "ok"), ("t1", "a", "b_only", "invalid_input"),
        ("t2", "b", "b_only", "ok"),
    ]  # fmt: skip


def test_a_revoked_token_ends_what_its_connection_may_do(tmp_path: Path) -> None:
    """A token is revoked when its task's attempt ends: an open connection is checked again
    at every request, as the HTTP endpoint checks each request."""

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with serving(tmp_path) as node:
            node.tokens["t3"] = A3
            async with Tools.mcp_client(socket=str(node.socket.path), token="t3") as c:
                out["before"] = await c.call_tool("echo", {"say": "1"})
                del node.tokens["t3"]
                out["listed"] = (await c.list_tools()).tools
                out["after"] = await c.call_tool("echo", {"say": "2"})
            out["records"] = node.records
        return out

    out = asyncio.run(scenario())
    assert out["before"].content[0].text == "t3/a: 1"
    assert out["listed"] == [] and out["after"].is_error
    assert out["after"].content[0].text == (
        "the connection's task token is no longer valid (its task has ended)"
    )
    assert [r["tool"] for r in out["records"]] == ["echo"]  # the refused call ran nothing


def test_a_long_message_goes_through_whole(tmp_path: Path) -> None:
    """A message of many reads (8 MiB of arguments) arrives whole, and its answer too."""
    say = "0123456789abcdef" * (1 << 19)

    async def scenario() -> str:
        async with (
            serving(tmp_path) as node,
            Tools.mcp_client(socket=str(node.socket.path), token="ta") as a,
        ):
            block = (await a.call_tool("echo", {"say": say})).content[0]
        assert isinstance(block, TextContent)
        return block.text

    assert asyncio.run(scenario()) == f"t1/a: {say}"


@pytest.mark.parametrize("token", ["nope", "", " ", "ta tb", "\x00", "Bearer ta", "é" * 10])
def test_a_bad_token_is_refused_with_one_line(tmp_path: Path, token: str) -> None:
    async def scenario() -> tuple[str, bytes, str]:
        async with serving(tmp_path) as node:
            raw = Raw(node.socket.path)
            answer = await raw.open(token)
            rest = await asyncio.wait_for(raw.reader.read(), 10)  # then it hangs up
            raw.close()
            with pytest.raises(ConfigError) as e:
                async with Tools.mcp_client(socket=str(node.socket.path), token=token or "x"):
                    pass
            # A good token still works afterwards.
            async with Tools.mcp_client(socket=str(node.socket.path), token="ta") as a:
                assert len((await a.list_tools()).tools) == 2
        return answer, rest, str(e.value)

    answer, rest, error = asyncio.run(scenario())
    assert answer == REFUSED + "\n" and rest == b""
    assert error.endswith(f"refused the connection: {REFUSED}") and "\n" not in error


def test_an_unreachable_socket_is_one_line(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Tools.mcp_client(socket=str(tmp_path / "none.sock"), token="ta"):
            pass

    with pytest.raises(
        NodeUnreachable, match=r"cannot reach the node's MCP socket .*none\.sock: No"
    ):
        asyncio.run(scenario())


def test_the_runtime_opens_its_mcp_session_at_its_first_tool_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reference runtime's MCP door connects at its first call, not at its start (an
    agent that answers without a tool opens no session), then keeps that one session."""
    from agentnode.runtime.nodetools import open_tools

    sock = tmp_path / "mcps.sock"
    monkeypatch.setenv("AGENTNODE_URL", f"unix://{tmp_path / 'api.sock'}")  # lists only
    monkeypatch.setenv("AGENTNODE_TOKEN", "ta")
    monkeypatch.setenv("AGENTNODE_MCP_STDIO_SOCKET", str(sock))
    # Nothing serves the socket yet: a door that calls nothing never notices.
    open_tools("mcp").close()
    unserved = open_tools("mcp")
    with pytest.raises(TaskError) as e:
        unserved.call("echo", {}, key="k0")
    assert str(e.value).startswith("the node's MCP endpoint: connect: ") and "\n" not in str(
        e.value
    )
    unserved.close()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    served = serving(tmp_path)
    node = asyncio.run_coroutine_threadsafe(served.__aenter__(), loop).result(10)
    try:
        door = open_tools("mcp")
        assert node.socket.connections == 0
        first = door.call("echo", {"say": "1"}, key="k1")
        second = door.call("echo", {"say": "2"}, key="k2")
        assert node.socket.connections == 1
        door.close()
        deadline = time.monotonic() + 10
        while node.socket.connections:
            assert time.monotonic() < deadline, "the session outlived its door"
            time.sleep(0.01)
    finally:
        asyncio.run_coroutine_threadsafe(served.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    assert [c["text"] for c in first["content"] + second["content"]] == ["t1/a: 1", "t1/a: 2"]
    assert [(r["task"], r["tool"], r["class"]) for r in node.records] == [
        ("t1", "echo", "ok"), ("t1", "echo", "ok")]  # fmt: skip


def test_a_malformed_line_gets_a_jsonrpc_error_and_the_connection_goes_on(
    tmp_path: Path,
) -> None:
    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with serving(tmp_path, max_line=4096) as node:
            raw = Raw(node.socket.path)
            assert await raw.open("ta") == "ok\n"
            await raw.initialize()
            out["not json"] = await raw.message("{nope")
            out["not an object"] = await raw.message("[1, 2]")
            out["bad method"] = await raw.message('{"jsonrpc": "2.0", "id": 7, "method": 5}')
            out["no version"] = await raw.message('{"id": 8, "method": "tools/list"}')
            out["binary"] = await raw.message("\udcff\x00\x01")
            out["deep"] = await raw.message("[" * 1500 + "]" * 1500)
            out["deep object"] = await raw.message('{"id": 3, "a": ' * 150 + "1" + "}" * 150)
            for odd in ("1.5", "null", "true", "[1]"):  # the SDK read these as notifications
                out[f"id {odd}"] = await raw.message(
                    f'{{"jsonrpc": "2.0", "id": {odd}, "method": "tools/list"}}'
                )
            out["after"] = await raw.message(call_line(9, "echo", {"say": "still"}))
            # Another connection was never disturbed.
            async with Tools.mcp_client(socket=str(node.socket.path), token="tb") as b:
                out["other"] = await b.call_tool("echo", {"say": "other"})
            # A line over the limit is answered, and ends that connection only.
            out["long"] = await raw.message(call_line(10, "echo", {"say": "x" * 5000}))
            out["eof"] = await asyncio.wait_for(raw.reader.read(), 10)
            raw.close()
            for _ in range(100):
                if node.socket.connections == 0:
                    break
                await asyncio.sleep(0.05)
            out["left"] = node.socket.connections
        return out

    out = asyncio.run(scenario())
    for key in ("not json", "binary", "deep"):
        assert out[key]["id"] is None and out[key]["error"]["code"] == -32700, out[key]
    for key, request_id in (("not an object", None), ("bad method", 7), ("no version", 8),
                            ("deep object", 3)):  # fmt: skip
        assert out[key]["id"] == request_id and out[key]["error"]["code"] == -32600, out[key]
        assert out[key]["error"]["message"].startswith("not a JSON-RPC message: ")
    for odd in ("1.5", "null", "true", "[1]"):
        assert out[f"id {odd}"] == {"jsonrpc": "2.0", "id": None, "error": {
            "code": -32600, "message": "a request's id is a string or an integer"}}  # fmt: skip
    assert out["after"]["id"] == 9
    assert out["after"]["result"]["content"] == [{"type": "text", "text": "t1/a: still"}]
    assert out["other"].content[0].text == "t2/b: other"
    assert out["long"] == {"jsonrpc": "2.0", "id": None, "error": {
        "code": -32600, "message": "a line longer than 4096 bytes"}}  # fmt: skip
    assert out["eof"] == b"" and out["left"] == 0


#: Arguments that open more arrays and objects than the node parses in one message, three ways.
_MANY = {
    "lists": {"say": "x", "pad": [[] for _ in range(MAX_CONTAINERS + 1)]},
    "objects": {"say": "x", "pad": [{} for _ in range(MAX_CONTAINERS + 1)]},
    "in a string": {"say": "[" * (MAX_CONTAINERS + 1)},
}


def test_a_message_opening_too_many_arrays_is_refused_before_it_is_parsed(
    tmp_path: Path,
) -> None:
    """Each array or object costs the node ~170 bytes and its loop ~1.7 us to parse: a line
    that opens more than MAX_CONTAINERS is answered unparsed, and the connection goes on."""

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with serving(tmp_path) as node:
            raw = Raw(node.socket.path)
            assert await raw.open("ta") == "ok\n"
            await raw.initialize()
            for n, (way, args) in enumerate(_MANY.items()):
                out[way] = await raw.message(call_line(n, "echo", args))
            fits = {"say": "fits", "pad": [[] for _ in range(MAX_CONTAINERS // 2)]}
            out["fits"] = await raw.message(call_line(7, "echo", fits))
            raw.close()
        return out

    out = asyncio.run(scenario())
    for way in _MANY:
        assert out[way]["id"] is None and out[way]["error"]["code"] == -32600, way
        assert f"over the node's {MAX_CONTAINERS}" in out[way]["error"]["message"], way
    assert out["fits"]["result"]["content"] == [{"type": "text", "text": "t1/a: fits"}]


def test_the_http_door_refuses_a_body_opening_too_many_arrays(tmp_path: Path) -> None:
    headers = {"Authorization": "Bearer ta", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call",
               "Mcp-Name": "echo", "Content-Type": "application/json"}  # fmt: skip

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with http_door(tmp_path) as (_, http):
            for n, (way, args) in enumerate(_MANY.items()):
                body = call_line(n, "echo", args, era="modern").encode()
                r = await http.post(DOOR, content=body, headers=headers)
                out[way] = (r.status_code, r.json())

                async def chunks(body: bytes = body) -> AsyncIterator[bytes]:
                    for i in range(0, len(body), 64 << 10):
                        yield body[i : i + (64 << 10)]

                r = await http.post(DOOR, content=chunks(), headers=headers)
                out[way + " chunked"] = (r.status_code, r.json())
            line = call_line(9, "echo", {"say": "after"}, era="modern").encode()
            out["after"] = (await http.post(DOOR, content=line, headers=headers)).json()
        return out

    out = asyncio.run(scenario())
    for way in [*_MANY, *(w + " chunked" for w in _MANY)]:
        status, body = out[way]
        assert status == 400 and body["error"]["code"] == -32600, (way, body)
        assert f"over the node's {MAX_CONTAINERS}" in body["error"]["message"], way
    assert out["after"]["result"]["content"][0]["text"] == "t1/a: after"


def fds(path: Path) -> set[str]:
    """This process's descriptors of unix sockets at `path` (an accepted connection shows its
    listener's path): the suite's other threads open and close descriptors of their own."""
    listed = (line.split() for line in Path("/proc/self/net/unix").read_text().splitlines()[1:])
    inodes = {f"socket:[{cols[6]}]" for cols in listed if len(cols) == 8 and cols[7] == str(path)}
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"/proc/self/fd/{fd}") in inodes:
                found.add(fd)
    return found


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_a_client_leaving_mid_call_leaves_nothing_behind(tmp_path: Path, era: str) -> None:
    """In either era (modern: the passed-through call) the call ends with its connection."""

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with serving(tmp_path) as node:
            before = (fds(node.socket.path), len(asyncio.all_tasks()))
            for how in ("close", "reset"):
                node.started.clear()
                raw = Raw(node.socket.path)
                assert await raw.open("ta") == "ok\n"
                await raw.opening(era)
                raw.writer.write(call_line(1, "slow", era=era).encode() + b"\n")
                await asyncio.wait_for(node.started.wait(), 10)
                out.setdefault("seen", []).append(len(fds(node.socket.path) - before[0]))
                if how == "reset":  # RST-like: gone without reading what was sent
                    sock = raw.writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                raw.close()
                for _ in range(200):
                    if node.socket.connections == 0:
                        break
                    await asyncio.sleep(0.05)
                out[f"{how} left"] = node.socket.connections
            # The SDK session (legacy era) closes its streams a few loop turns after the
            # connection: on a loaded box that can take longer than any fixed pause.
            for _ in range(100):
                out["fds"] = fds(node.socket.path) - before[0]
                out["tasks"] = len(asyncio.all_tasks()) - before[1]
                if not out["fds"] and not out["tasks"]:
                    break
                await asyncio.sleep(0.05)
            out["events"] = list(node.events)
            async with Tools.mcp_client(socket=str(node.socket.path), token="ta") as a:
                out["after"] = await a.call_tool("echo", {"say": "after"})
        out["stopped"] = not node.socket.path.exists()
        return out

    out = asyncio.run(scenario())
    assert out["close left"] == 0 and out["reset left"] == 0
    assert out["events"] == ["cancelled", "cancelled"], "the call ends with its connection"
    assert out["seen"] == [1, 1]  # the node's end of each connection, while it was open
    assert out["fds"] == set() and out["tasks"] == 0
    assert out["after"].content[0].text == "t1/a: after"
    assert out["stopped"]


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_stopping_ends_open_connections(tmp_path: Path, era: str) -> None:
    async def scenario() -> tuple[bytes, list[str]]:
        async with serving(tmp_path) as node:
            raw = Raw(node.socket.path)
            assert await raw.open("ta") == "ok\n"
            await raw.opening(era)
            raw.writer.write(call_line(1, "slow", era=era).encode() + b"\n")
            await asyncio.wait_for(node.started.wait(), 10)
        rest = await asyncio.wait_for(raw.reader.read(), 10)
        raw.close()
        return rest, node.events

    rest, events = asyncio.run(scenario())
    # The call in flight is answered (an error: the connection closed), then the node hangs up.
    (answer,) = map(json.loads, rest.splitlines())
    assert answer["id"] == 1 and answer["error"]["message"] == "Connection closed", answer
    assert events == ["cancelled"]


def sdk_server() -> MCPServerSpec:
    return MCPServerSpec(name="t", command=(sys.executable, SERVER), user="0",
                         env={"PYTHONPATH": str(REPO / "python")},
                         mounts=(Mount(str(REPO), str(REPO)),))  # fmt: skip


def test_two_tenants_never_share_server_instances(tmp_path: Path) -> None:
    servers = MCPServers([sdk_server()])

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            async with serving(tmp_path, servers=servers) as node:
                path = str(node.socket.path)
                async with Tools.mcp_client(socket=path, token="ta") as a, \
                        Tools.mcp_client(socket=path, token="tb") as b, \
                        Tools.mcp_client(socket=path, token="ta") as a2:  # fmt: skip
                    out["a"] = await a.call_tool("t__add", {"a": 1, "b": 2})
                    out["b"] = await b.call_tool("t__add", {"a": 3, "b": 4})
                    out["a2"] = await a2.call_tool("t__whoami", {})
                    out["pids"] = (servers.instance_pid("t", "a"), servers.instance_pid("t", "b"))
                    out["bad"] = await b.call_tool("t__add", {"a": "x", "b": 1})
                    out["more"] = [await a.call_tool("t__add", {"a": i, "b": 1}) for i in range(3)]
        finally:
            await servers.close()
        return out

    out = asyncio.run(scenario())
    assert out["a"].structured_content == {"sum": 3} and out["b"].structured_content == {"sum": 7}
    assert out["a2"].content[0].text.startswith("1 agentnode")
    pid_a, pid_b = out["pids"]
    assert None not in (pid_a, pid_b) and pid_a != pid_b
    assert out["bad"].meta["agentnode"]["class"] == "invalid_input"
    assert out["bad"].meta["agentnode"]["path"] == "/a"
    # Each call's share of its server's CPU, and the server's memory peak.
    for result in (out["a"], out["b"], *out["more"]):
        assert result.meta["agentnode"]["cpu_s"] > 0, result.meta
        assert result.meta["agentnode"]["memory_peak"] > 1 << 20, result.meta


async def events(client: Any) -> str:
    """What the test server's `wait` calls did so far."""
    block = (await client.call_tool("t__events", {})).content[0]
    assert isinstance(block, TextContent)
    return block.text


@pytest.mark.parametrize("era", ["legacy", "modern"])
def test_a_client_leaving_mid_call_to_a_server_cancels_it_there(tmp_path: Path, era: str) -> None:
    """The request to the tenant's server ends with the task's connection: it is cancelled at
    the server, and the instance is left idle, not busy with a call nobody owns."""
    servers = MCPServers([sdk_server()])

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            async with serving(tmp_path, servers=servers) as node:
                path = str(node.socket.path)
                async with Tools.mcp_client(socket=path, token="ta") as a:
                    assert not (await a.call_tool("t__events", {})).is_error
                    raw = Raw(node.socket.path)
                    assert await raw.open("ta") == "ok\n"
                    await raw.opening(era)
                    line = call_line(1, "t__wait", {"seconds": 60}, era=era)
                    raw.writer.write(line.encode() + b"\n")
                    seen = ""
                    for _ in range(200):
                        seen = await events(a)
                        if "started" in seen:
                            break
                        await asyncio.sleep(0.05)
                    raw.close()
                    for _ in range(200):
                        seen = await events(a)
                        if seen != "started":
                            break
                        await asyncio.sleep(0.05)
                    out["events"] = seen
                    out["busy"] = servers._instances[("t", "a")].busy
        finally:
            await servers.close()
        return out

    out = asyncio.run(scenario())
    assert out["events"] == "started cancelled", out
    assert out["busy"] == 0, "no call left in flight"


@pytest.mark.parametrize(
    ("url", "plain"),
    [("http://agentnode/mcp", True), ("http://127.0.0.1:9/mcp", True),
     ("https://example.invalid/mcp", False)],
)  # fmt: skip
def test_the_http_door_client_loads_no_ca_bundle_for_plain_http(
    url: str, plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Tools.mcp_client(url=...)` over plain HTTP (the node's endpoint) gets a TLS context that
    trusts nothing (no CA bundle read: 20-27 ms of CPU a client; a redirect to https fails its
    certificate check); an https URL keeps httpx's default verification."""
    import ssl

    import httpx2

    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def client(**kwargs: Any) -> None:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(httpx2, "AsyncClient", client)
    monkeypatch.setenv("AGENTNODE_MCP_SOCKET", "/nonexistent/mcp.sock")

    async def enter() -> None:
        async with Tools.mcp_client(url=url, token="t"):
            pass

    with pytest.raises(Stop):
        asyncio.run(enter())
    verify = seen["verify"]
    if plain:
        assert isinstance(verify, ssl.SSLContext)
        assert verify.cert_store_stats()["x509_ca"] == 0 and verify.check_hostname
    else:
        assert verify is True


def said(result: Any) -> str:
    """The text of a call's one text block."""
    block = result.content[0]
    assert isinstance(block, TextContent), result
    return block.text


def test_what_one_task_holds_of_the_socket_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A silent connection is refused after the handshake time, an over-long token line at
    once, and a task's connections beyond its cap are refused with one line while another task
    of the same tenant and another tenant still connect; a closed one frees its place."""
    from agentnode.tools import mcpsocket

    monkeypatch.setattr(mcpsocket, "HANDSHAKE_S", 0.3)
    monkeypatch.setattr(mcpsocket, "MAX_PER_TASK", 3)
    capped = "error: task t1 has 3 MCP connections open already (close one first)\n"

    async def scenario() -> None:
        async with serving(tmp_path) as node:
            node.tokens["ta3"] = A3
            path = node.socket.path
            silent = await asyncio.open_unix_connection(str(path))
            long = Raw(path)
            assert await long.open("t" * 5000) == REFUSED + "\n"
            assert await asyncio.wait_for(silent[0].read(), 10) == (REFUSED + "\n").encode()
            silent[1].close()
            long.close()
            held = [Raw(path) for _ in range(3)]
            for raw in held:
                assert await raw.open("ta") == "ok\n"
            over = Raw(path)
            assert await over.open("ta") == capped
            assert await asyncio.wait_for(over.reader.read(), 10) == b""
            over.close()
            # The same tenant's other task, and another tenant, are not held back.
            async with Tools.mcp_client(socket=str(path), token="ta3") as a3:
                assert said(await a3.call_tool("echo", {"say": "x"})) == "t3/a: x"
            async with Tools.mcp_client(socket=str(path), token="tb") as b:
                assert said(await b.call_tool("echo", {"say": "y"})) == "t2/b: y"
            held.pop().close()
            for _ in range(100):
                if node.socket.connections == 2:
                    break
                await asyncio.sleep(0.05)
            async with Tools.mcp_client(socket=str(path), token="ta") as a:
                assert said(await a.call_tool("echo", {"say": "z"})) == "t1/a: z"
            for raw in held:
                raw.close()

    asyncio.run(scenario())


def without_timings(message: dict[str, Any]) -> dict[str, Any]:
    """`message` without what differs between two runs of one call (its duration)."""
    out: dict[str, Any] = json.loads(json.dumps(message))
    mine = out.get("result", {}).get("_meta", {}).get("agentnode", {})
    mine.pop("duration_ms", None)
    return out


#: Modern-era `tools/call` lines the pass-through takes, one of each way a call can go wrong
#: (and right), for tenant c's connection (its `count` tool has an integer `n`).
CALL_LINES = {
    "ok": call_line(1, "count", {"n": 1}, era="modern"),
    "unknown tool": call_line(2, "nope", era="modern"),
    "another tenant's tool": call_line(3, "b_only", era="modern"),
    "bad input": call_line(4, "count", {"n": "x"}, era="modern"),
    "missing input": call_line(5, "count", era="modern"),
    "name not a string": call_line(6, 5, era="modern"),
    "arguments not an object": call_line(7, "count", [1], era="modern"),
    "string id": call_line("s-8", "echo", {"say": "x"}, era="modern"),
    "keyed": call_line(9, "count", {"n": 2}, era="modern", meta={"agentnode/idempotency_key": "k"}),
    "keyed again": call_line(
        10, "count", {"n": 2}, era="modern", meta={"agentnode/idempotency_key": "k"}
    ),
    "key reused": call_line(
        11, "count", {"n": 3}, era="modern", meta={"agentnode/idempotency_key": "k"}
    ),
    "progress token": call_line(12, "echo", {"say": "p"}, era="modern", meta={"progressToken": 7}),
    "unsupported version": call_line(
        13, "echo", era="modern", meta={"io.modelcontextprotocol/protocolVersion": "2099-01-01"}
    ),
    "version not a string": call_line(
        14, "echo", era="modern", meta={"io.modelcontextprotocol/protocolVersion": 5}
    ),
    "no capabilities": json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 15,
            "method": "tools/call",
            "params": {
                "name": "echo",
                "arguments": {},
                "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28"},
            },
        }
    ),
    "no envelope": call_line(16, "echo"),
    "no params": json.dumps({"jsonrpc": "2.0", "id": 17, "method": "tools/call"}),
}


def test_a_passed_through_call_is_answered_as_the_sdk_session_answers_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way in CALL_LINES, the pass-through's answer and audit record are the SDK
    session's (the same lines sent with the pass-through turned off), as are a call after the
    connection's token was revoked and one whose line is not JSON."""
    from agentnode.tools import mcpsocket

    async def answers() -> tuple[dict[str, Any], list[dict[str, Any]], int]:
        out: dict[str, Any] = {}
        async with serving(tmp_path) as node:
            raw = Raw(node.socket.path)
            assert await raw.open("tc") == "ok\n"
            await raw.discover()
            for how, line in CALL_LINES.items():
                out[how] = without_timings(await raw.message(line))
            out["not json"] = await raw.message('{"jsonrpc": "2.0", "id": 20, "method": "tools/')
            del node.tokens["tc"]
            out["revoked"] = await raw.message(call_line(21, "echo", era="modern"))
            raw.close()
            records = [{k: v for k, v in r.items() if k not in ("time", "duration_ms")}
                       for r in node.records]  # fmt: skip
            return out, records, node.runs

    served: list[Any] = []
    serve = mcpsocket._PassThrough._serve

    async def counted(self: Any, params: Any) -> dict[str, Any]:
        served.append(params)
        return await serve(self, params)

    monkeypatch.setattr(mcpsocket._PassThrough, "_serve", counted)
    through = asyncio.run(answers())
    # Every enveloped call (all but two of CALL_LINES, and the revoked one) was passed through.
    assert len(served) == len(CALL_LINES) - 2 + 1
    monkeypatch.setattr(mcpsocket._PassThrough, "route", lambda self, message: False)
    by_sdk = asyncio.run(answers())
    for how in through[0]:
        assert through[0][how] == by_sdk[0][how], how
    assert through[1:] == by_sdk[1:]
    out, records, runs = through
    assert out["ok"]["result"]["content"] == [{"type": "text", "text": "run 1 of 1"}]
    assert out["ok"]["result"]["_meta"]["agentnode"]["class"] == "ok"
    assert "io.modelcontextprotocol/serverInfo" in out["ok"]["result"]["_meta"]
    assert out["ok"]["result"]["resultType"] == "complete"
    assert out["string id"]["id"] == "s-8"
    for how in ("unknown tool", "another tenant's tool", "bad input", "missing input"):
        assert out[how]["result"]["_meta"]["agentnode"]["class"] == "invalid_input", how
    assert out["bad input"]["result"]["_meta"]["agentnode"]["path"] == "/n"
    for how in ("name not a string", "arguments not an object", "no capabilities"):
        assert out[how]["error"]["code"] == -32602, (how, out[how])
    assert out["unsupported version"]["error"]["code"] == -32022
    # One key, one run: the repeat gets the first run's result, other arguments are refused.
    assert out["keyed"]["result"]["content"] == out["keyed again"]["result"]["content"]
    assert out["key reused"]["result"]["_meta"]["agentnode"]["class"] == "invalid_input"
    assert runs == 2
    assert out["not json"]["error"]["code"] == -32700
    assert out["revoked"]["result"]["isError"] is True
    assert [r["class"] for r in records if r["tool"] == "count"] == [
        "ok", "invalid_input", "invalid_input", "ok", "invalid_input"]  # fmt: skip


def test_passed_through_calls_run_at_once_and_are_answered_by_id(tmp_path: Path) -> None:
    """Calls on one connection run side by side and each answer carries its own id (a later
    call's first), with the SDK session's requests and the client's notifications between."""

    async def scenario() -> list[dict[str, Any]]:
        async with serving(tmp_path) as node:
            raw = Raw(node.socket.path)
            assert await raw.open("ta") == "ok\n"
            await raw.discover()
            raw.writer.write(call_line("first", "slow", era="modern").encode() + b"\n")
            await asyncio.wait_for(node.started.wait(), 10)
            raw.writer.write(b'{"jsonrpc": "2.0", "method": "notifications/roots/list_changed"}\n')
            listing = {"jsonrpc": "2.0", "id": "list", "method": "tools/list",
                       "params": {"_meta": ENVELOPE}}  # fmt: skip
            lines = [call_line(i, "echo", {"say": str(i)}, era="modern") for i in range(20)]
            lines.insert(10, json.dumps(listing))
            raw.writer.write("\n".join(lines).encode() + b"\n")
            got = [await raw.receive() for _ in range(21)]
            node.release.set()
            got.append(await raw.receive())
            raw.close()
        return got

    got = asyncio.run(scenario())
    assert got[-1]["id"] == "first" and got[-1]["result"]["content"][0]["text"] == "done"
    by_id = {m["id"]: m for m in got[:-1]}
    assert sorted(by_id, key=str) == sorted([*range(20), "list"], key=str)
    for i in range(20):
        assert by_id[i]["result"]["content"] == [{"type": "text", "text": f"t1/a: {i}"}]
    assert [t["name"] for t in by_id["list"]["result"]["tools"]] == ["echo", "slow"]


def test_a_passed_through_call_the_client_cancels_is_not_answered(tmp_path: Path) -> None:
    """`notifications/cancelled` naming a passed-through call cancels it; no answer follows (as
    the SDK does), a cancel naming no call changes nothing, and the connection goes on."""

    async def scenario() -> tuple[list[str], dict[str, Any], dict[str, Any]]:
        async with serving(tmp_path) as node:
            raw = Raw(node.socket.path)
            assert await raw.open("ta") == "ok\n"
            await raw.discover()
            raw.writer.write(call_line(5, "slow", era="modern").encode() + b"\n")
            await asyncio.wait_for(node.started.wait(), 10)
            for rid in (99, "5"):  # "5" names call 5, as in the SDK
                cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled",
                          "params": {"requestId": rid, "reason": "test"}}  # fmt: skip
                raw.writer.write(json.dumps(cancel).encode() + b"\n")
            for _ in range(100):
                if node.events:
                    break
                await asyncio.sleep(0.02)
            after = await raw.message(call_line(6, "echo", {"say": "on"}, era="modern"))
            node.started.clear()
            raw.writer.write(call_line(7, "slow", era="modern").encode() + b"\n")
            await asyncio.wait_for(node.started.wait(), 10)
            node.release.set()
            released = await raw.receive()
            raw.close()
            return node.events, after, released

    events, after, released = asyncio.run(scenario())
    assert events == ["cancelled", "finished"]
    assert after["id"] == 6, "nothing came for the cancelled call"
    assert released["id"] == 7


def test_calls_to_a_server_pass_through_several_ways(tmp_path: Path) -> None:
    """Through the MCP socket to the tenant's sandboxed server: calls side by side answered by
    id (a quick one before a slow one), 8 MiB results whole, a call during which the server
    sends log messages and progress, and a crash with calls in flight (each `transient`, then
    a new instance)."""
    servers = MCPServers([sdk_server()])
    size = 8 << 20

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        try:
            async with serving(tmp_path, servers=servers) as node:
                path = str(node.socket.path)
                async with Tools.mcp_client(socket=path, token="ta") as a:
                    slow = asyncio.ensure_future(a.call_tool("t__wait", {"seconds": 0.5}))
                    sums = await asyncio.gather(
                        *(a.call_tool("t__add", {"a": i, "b": 100}) for i in range(10))
                    )
                    out["slow done first"] = slow.done()
                    out["slow"] = await slow
                    out["sums"] = [r.structured_content for r in sums]
                    out["blobs"] = await asyncio.gather(
                        a.call_tool("t__blob", {"size": size}), a.call_tool("t__blob", {"size": 3})
                    )
                    out["chatty"] = await asyncio.gather(
                        a.call_tool("t__chatty", {"n": 20}), a.call_tool("t__add", {"a": 1, "b": 1})
                    )
                    pid = servers.instance_pid("t", "a")
                    waiting = asyncio.ensure_future(a.call_tool("t__wait", {"seconds": 30}))
                    await asyncio.sleep(0.3)
                    out["crash"] = await a.call_tool("t__crash", {})
                    out["waiting"] = await waiting
                    out["after"] = await a.call_tool("t__add", {"a": 2, "b": 2})
                    out["pids"] = (pid, servers.instance_pid("t", "a"))
                out["records"] = [(r["tool"], r["class"]) for r in node.records]
        finally:
            await servers.close()
        return out

    out = asyncio.run(scenario())
    assert not out["slow done first"] and said(out["slow"]) == "slept"
    assert out["sums"] == [{"sum": i + 100} for i in range(10)]
    big, small = out["blobs"]
    assert len(said(big)) == size and said(big).startswith("0123456789abcdef")
    assert big.meta["agentnode"]["bytes_out"] == size and said(small) == "012"
    assert said(out["chatty"][0]) == "said 20 things"
    assert out["chatty"][1].structured_content == {"sum": 2}
    for how in ("crash", "waiting"):
        assert out[how].is_error and out[how].meta["agentnode"]["class"] == "transient", how
    assert out["after"].structured_content == {"sum": 4}
    old, new = out["pids"]
    assert None not in (old, new) and old != new
    assert ("t__crash", "transient") in out["records"] and ("t__wait", "transient") in out[
        "records"
    ]


def test_what_one_task_holds_of_the_http_door_is_bounded(tmp_path: Path) -> None:
    """The streamable-HTTP door's bound, as the socket's: a task's requests beyond its cap are
    refused (429, one JSON-RPC error naming the bound) while another task of the same tenant
    and another tenant still get through, and a finished request frees its place."""
    import httpx2

    from agentnode.tools.endpoint import MCPEndpoint, mcp_app

    def post(token: str, request_id: int, name: str) -> dict[str, Any]:
        body = json.loads(call_line(request_id, name, {"say": "h"}, era="modern"))
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json, text/event-stream",
                   "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call",
                   "Mcp-Name": name}  # fmt: skip
        return {"url": "http://agentnode/mcp", "json": body, "headers": headers}

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        node = Node(tmp_path / "mcps.sock")
        node.tokens["ta3"] = A3
        uds = tmp_path / "mcp.sock"
        endpoint = MCPEndpoint(lambda: mcp_app(node.service, node.tokens.get, max_per_task=3),
                               uds=uds)  # fmt: skip
        await endpoint.start()
        transport = httpx2.AsyncHTTPTransport(uds=str(uds))
        try:
            async with httpx2.AsyncClient(transport=transport, timeout=30) as http:
                held = [asyncio.ensure_future(http.post(**post("ta", i, "slow"))) for i in range(3)]
                for _ in range(200):
                    if node.entered == 3:
                        break
                    await asyncio.sleep(0.05)
                over = await http.post(**post("ta", 9, "echo"))
                out["over"] = (over.status_code, over.json())
                out["same tenant"] = (await http.post(**post("ta3", 10, "echo"))).json()
                out["other tenant"] = (await http.post(**post("tb", 11, "echo"))).json()
                node.release.set()
                out["held"] = [(await h).status_code for h in held]
                out["after"] = (await http.post(**post("ta", 12, "echo"))).json()
        finally:
            await endpoint.stop()
        return out

    out = asyncio.run(scenario())
    status, body = out["over"]
    assert status == 429 and body["error"]["message"] == (
        "task t1 has 3 MCP requests open already (finish or close one first)"
    )
    assert out["same tenant"]["result"]["content"][0]["text"] == "t3/a: h"
    assert out["other tenant"]["result"]["content"][0]["text"] == "t2/b: h"
    assert out["held"] == [200, 200, 200]
    assert out["after"]["result"]["content"][0]["text"] == "t1/a: h"


def test_the_http_door_keeps_no_session_a_task_could_pile_up(tmp_path: Path) -> None:
    """Sessions would sit in one node-wide table (the SDK's: 10,000, 30 minutes idle) that one
    task initializing in a loop could fill for every tenant: the door keeps none, and answers
    initializations and calls all the same."""
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}}  # fmt: skip
    headers = {"Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}  # fmt: skip

    async def scenario() -> tuple[list[int], set[str | None], dict[str, Any]]:
        async with http_door(tmp_path) as (_, http):
            answers = [await http.post(DOOR, json=init, headers={
                **headers, "Authorization": "Bearer ta"}) for _ in range(200)]  # fmt: skip
            call = json.loads(call_line(2, "echo", {"say": "h"}, era="modern"))
            other = await http.post(DOOR, json=call, headers={
                **headers, "Authorization": "Bearer tb", "MCP-Protocol-Version": "2026-07-28",
                "Mcp-Method": "tools/call", "Mcp-Name": "echo"})  # fmt: skip
        return ([a.status_code for a in answers],
                {a.headers.get("mcp-session-id") for a in answers}, other.json())  # fmt: skip

    statuses, sessions, other = asyncio.run(scenario())
    assert set(statuses) == {200} and sessions == {None}
    assert other["result"]["content"][0]["text"] == "t2/b: h"


def test_a_request_body_over_the_bound_is_refused_not_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HTTP door holds at most one message's bound of a request (the socket's, which the
    SDK's limit is set to): a body announced larger is refused before it is read (with a token
    or without), a chunked one as it grows past it, and calls under the bound are served."""
    from agentnode.tools import endpoint as door

    monkeypatch.setattr(door, "MAX_MESSAGE", 1 << 20)
    headers = {"Authorization": "Bearer ta", "Accept": "application/json, text/event-stream",
               "MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/call",
               "Mcp-Name": "echo", "Content-Type": "application/json"}  # fmt: skip
    line = call_line(1, "echo", {"say": "h"}, era="modern").encode()
    # Valid JSON-RPC up to the end, padded with spaces past the bound.
    big = line[:-1] + b" " * (2 << 20) + line[-1:]

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 256 << 10):
            yield big[i : i + (256 << 10)]

    async def scenario() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with http_door(tmp_path) as (_, http):
            for who, auth in (("token", headers), ("none", {**headers, "Authorization": ""})):
                out[who] = (await http.post(DOOR, content=big, headers=auth)).status_code
            out["chunked"] = (await http.post(DOOR, content=chunks(), headers=headers)).status_code
            out["after"] = (await http.post(DOOR, content=line, headers=headers)).json()
        return out

    out = asyncio.run(scenario())
    for who in ("token", "none"):
        assert out[who] == 413, who
    assert out["chunked"] == 413
    assert out["after"]["result"]["content"][0]["text"] == "t1/a: h"


@pytest.mark.parametrize("era", ["modern", "initialize"])
def test_a_connection_that_reads_none_of_its_answers_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, era: str
) -> None:
    """Answers a task does not read wait in the node: past `STALL_S` with no room made, the
    connection is closed and they go; another connection is served all along."""
    from agentnode.tools import mcpsocket

    monkeypatch.setattr(mcpsocket, "STALL_S", 1.0)
    say = "x" * (512 << 10)

    async def scenario() -> tuple[list[dict[str, Any]], int, float, int]:
        async with serving(tmp_path) as node:
            stuck, other = Raw(node.socket.path), Raw(node.socket.path)
            assert await stuck.open("ta") == "ok\n" and await other.open("tb") == "ok\n"
            await stuck.opening(era)
            await other.opening(era)
            for i in range(40):  # ~20 MiB of answers; the socket holds a few hundred KiB
                stuck.writer.write(call_line(i + 1, "echo", {"say": say}, era=era).encode()
                                   + b"\n")  # fmt: skip
            await stuck.writer.drain()
            t0 = time.monotonic()
            served = [await other.message(call_line(i + 1, "echo", {"say": "hi"}, era=era))
                      for i in range(3)]  # fmt: skip
            await asyncio.sleep(2.5)  # reads nothing meanwhile
            got = 0
            while chunk := await asyncio.wait_for(stuck.reader.read(1 << 20), 10):
                got += len(chunk)
            took = time.monotonic() - t0
            stuck.close()
            other.close()
            return served, got, took, len(node.records)

    served, got, took, ran = asyncio.run(scenario())
    assert all(m["result"]["content"][0]["text"] == "t2/b: hi" for m in served)
    assert got < 10 << 20, f"{got >> 20} MiB reached the stuck connection"
    assert took < 15 and ran >= 3
    closed = [
        r.getMessage() for r in caplog.records if "read none of its answers" in r.getMessage()
    ]
    assert len(closed) == 1


def test_what_one_connection_runs_at_once_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passed-through calls beyond a connection's bound are answered with an error naming it
    (the calls running are not disturbed); once one ends, calls run again."""
    from agentnode.tools import mcpsocket

    monkeypatch.setattr(mcpsocket, "MAX_CALLS", 3)

    async def scenario() -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
        async with serving(tmp_path) as node:
            raw = Raw(node.socket.path)
            assert await raw.open("ta") == "ok\n"
            await raw.discover()
            for i in range(3):
                raw.writer.write(call_line(i, "slow", era="modern").encode() + b"\n")
            for _ in range(200):
                if node.entered == 3:
                    break
                await asyncio.sleep(0.05)
            over = await raw.message(call_line(9, "echo", era="modern"))
            node.release.set()
            done = sorted([(await raw.receive())["id"] for _ in range(3)])
            after = await raw.message(call_line(10, "echo", {"say": "again"}, era="modern"))
            raw.close()
            return over, done, after

    over, done, after = asyncio.run(scenario())
    assert over["id"] == 9 and over["error"]["message"] == (
        "the connection has 3 calls running already (wait for one)"
    )
    assert done == [0, 1, 2]
    assert after["result"]["content"] == [{"type": "text", "text": "t1/a: again"}]
