"""A test MCP server written with the `mcp` SDK, run by the node in its sandbox: over stdio, or
over streamable HTTP on 127.0.0.1:PORT (`--http PORT`).

Tools: `add` (with an output schema), `whoami` (its pid and hostname, to tell instances
apart), `session` (the caller's MCP session and TCP port over HTTP), `connect` (opens a TCP connection,
to test its egress policy), `flaky` (fails until it has been called N times; counts runs in a
file, to test retries), `hog` (allocates memory), `crash` (exits), `flood` (an endless line on stdout), `wait` (sleeps, noting in
`events` that it started and how it ended: to see a call cancelled from the other end),
`blob` (a large result), `chatty` (log messages and progress sent while it runs). With
`--schemas URL`, two tools whose listed input schemas the node cannot take (`odd_schemas`)."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import anyio
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel

server = MCPServer("agentnode-test")
#: The stdout the node reads, held before the SDK's stdio transport moves it off fd 1 (which
#: it points at stderr, so that stray prints cannot break the framing): `flood` writes here.
WIRE = os.dup(1)


class Sum(BaseModel):
    sum: int


@server.tool()
def add(a: int, b: int) -> Sum:
    """Adds two integers."""
    return Sum(sum=a + b)


@server.tool()
def whoami() -> str:
    """This server's pid (in its namespace) and its parent's view of it."""
    return f"{os.getpid()} {socket.gethostname()} {os.getuid()}"


@server.tool()
def session(ctx: Context) -> str:
    """The connection this call came in on: its MCP session id (when the protocol version has
    sessions) and TCP source port (streamable HTTP only; empty over stdio)."""
    request = ctx.request_context.request
    peer = getattr(request, "client", None)
    if peer is None:
        return ""
    return f"{(ctx.headers or {}).get('mcp-session-id', '-')} {peer[1]}"


@server.tool()
def connect(host: str, port: int) -> str:
    """Opens a TCP connection to host:port."""
    with socket.create_connection((host, port), timeout=2):
        return "connected"


@server.tool()
def flaky(fails: int, marker: str) -> str:
    """Fails `fails` times (counting runs in MARKER under $MCP_TEST_DIR, default /workspace),
    then succeeds."""
    path = os.path.join(os.environ.get("MCP_TEST_DIR", "/workspace"), marker)
    n = int(Path(path).read_text()) if os.path.exists(path) else 0
    with open(path, "w") as f:
        f.write(str(n + 1))
    if n < fails:
        os._exit(3)  # a crash: the node sees the server die (transient)
    return f"ran {n + 1} times"


@server.tool()
def hog(mib: int) -> str:
    """Allocates (and touches) `mib` MiB: past its sandbox's memory limit, it is killed."""
    held = bytearray(mib << 20)
    return f"held {len(held)} bytes"


@server.tool()
def flood(mib: int) -> str:
    """Writes `mib` MiB to its stdout with no newline (one endless line, on stdio), then
    waits: the node must not hold it all."""
    chunk = b"x" * (1 << 20)
    for _ in range(mib):
        os.write(WIRE, chunk)
    time.sleep(600)
    return "flooded"


@server.tool()
def crash() -> str:
    """Exits at once."""
    os._exit(1)


@server.tool()
def blob(size: int) -> str:
    """`size` bytes of text."""
    return ("0123456789abcdef" * (size // 16 + 1))[:size]


@server.tool()
async def chatty(n: int, ctx: Context) -> str:
    """Sends `n` log messages and progress notifications while it runs, then answers."""
    for i in range(n):
        await ctx.info(f"step {i}")
        await ctx.report_progress(i + 1, n)
        await anyio.sleep(0.001)
    return f"said {n} things"


#: What `wait` calls did, in order.
EVENTS: list[str] = []


@server.tool()
async def wait(seconds: float) -> str:
    """Sleeps `seconds`; notes in `events` that it started and whether it was cancelled."""
    EVENTS.append("started")
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        EVENTS.append("cancelled")
        raise
    EVENTS.append("finished")
    return "slept"


@server.tool()
def events() -> str:
    """What `wait` calls did so far, one word each."""
    return " ".join(EVENTS)


def odd_schemas(url: str) -> None:
    """Two more tools, listed with input schemas the node cannot take: `broken` (invalid) and
    `remote` (its `a` is a `$ref` to `url`, which must never be fetched)."""

    @server.tool()
    def broken() -> str:
        return "broken ran"

    @server.tool()
    def remote() -> str:
        return "remote ran"

    tools = server._tool_manager._tools
    tools["broken"].parameters = {"type": "object", "properties": {"a": {"type": "nonsense"}}}
    tools["remote"].parameters = {"type": "object", "properties": {"a": {"$ref": url}}}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--schemas"]:
        odd_schemas(sys.argv[2])
        server.run()
    elif sys.argv[1:2] == ["--http"]:
        server.run(transport="streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
