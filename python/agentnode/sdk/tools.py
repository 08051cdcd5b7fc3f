"""`Tools`: the node's tools from Python agent code, over the node's HTTP API (the task socket
inside a task, with its token). For MCP-speaking frameworks, `mcp_client()` connects the `mcp`
SDK to the node: over its MCP socket ($AGENTNODE_MCP_STDIO_SOCKET: MCP's stdio framing on a
unix socket, the cheap door) when a task has one, else to its streamable-HTTP endpoint
($AGENTNODE_MCP_URL, over $AGENTNODE_MCP_SOCKET when set)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket as sockets
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from agentnode.errors import ConfigError, NodeUnreachable
from agentnode.sdk.transport import connect, request, tls_verify
from agentnode.unixsock import reachable

if TYPE_CHECKING:
    from mcp import Client
    from mcp.client._transport import TransportStreams

__all__ = ["IDEMPOTENCY_META", "Tools"]

#: A call's idempotency key, in an MCP request's `_meta` (MCP has no field of its own for it):
#: what the node's MCP doors read (`agentnode.tools.endpoint`), here for clients to import
#: without the server's modules.
IDEMPOTENCY_META = "agentnode/idempotency_key"


class Tools:
    """List and call the tools this task's tenant may use; synchronous, one per thread.
    Every call returns the normalised result (MCP's shape, `_meta.agentnode.class` says what
    happened) and never raises for a tool's own failure."""

    def __init__(
        self, *, url: str | None = None, token: str | None = None, timeout: float = 300.0
    ) -> None:
        url = url or os.environ.get("AGENTNODE_URL")
        token = token or os.environ.get("AGENTNODE_TOKEN")
        if not url or not token:
            raise ConfigError(
                "no node to call tools on (AGENTNODE_URL and AGENTNODE_TOKEN are unset: run "
                "as an agentnode task, or give url= and token=)"
            )
        self._url = url
        self._conn, self._base = connect(url, timeout=timeout)
        self._auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        raw = request(self._conn, method, f"{self._base}{path}", data, self._auth,
                      where=f"node API at {self._url}", what=f"{method} {path}")  # fmt: skip
        return json.loads(raw)

    def list(self) -> list[dict[str, Any]]:
        """The tools (name, description, inputSchema, outputSchema)."""
        tools: list[dict[str, Any]] = self._call("GET", "/v1/tools")["tools"]
        return tools

    def call(
        self,
        name: str,
        arguments: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Calls tool `name`. With `idempotency_key` a transient failure is retried by the
        node, and a repeat of the key returns the first call's result without running it."""
        body: dict[str, Any] = {"arguments": arguments or {}}
        if idempotency_key is not None:
            body["idempotency_key"] = idempotency_key
        result: dict[str, Any] = self._call("POST", f"/v1/tools/{name}/call", body)
        return result

    @staticmethod
    def mcp_client(
        *, url: str | None = None, token: str | None = None, socket: str | None = None
    ) -> Client:
        """An `mcp.Client` (use `async with`) on the node: over its MCP socket at `socket`
        (default $AGENTNODE_MCP_STDIO_SOCKET, unless `url` is given), else its streamable-HTTP
        endpoint at `url` (default $AGENTNODE_MCP_URL)."""
        from mcp import Client

        token = token or os.environ.get("AGENTNODE_TOKEN")
        if socket is None and url is None:
            socket = os.environ.get("AGENTNODE_MCP_STDIO_SOCKET")
        url = url or os.environ.get("AGENTNODE_MCP_URL")
        if not token or not (socket or url):
            raise ConfigError("AGENTNODE_MCP_URL and AGENTNODE_TOKEN are unset (run as a task)")
        if socket:
            return Client(_socket_transport(socket, token))
        assert url is not None
        return Client(_http_transport(url, token))


@contextlib.asynccontextmanager
async def _http_transport(url: str, token: str) -> AsyncIterator[TransportStreams]:
    """The SDK's streamable-HTTP client transport to the node's endpoint at `url` (over
    $AGENTNODE_MCP_SOCKET for the node's own `http://agentnode/` address)."""
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    sock = os.environ.get("AGENTNODE_MCP_SOCKET")
    use_socket = sock and url.startswith("http://agentnode/")
    verify = tls_verify(url)
    async with (
        httpx2.AsyncClient(
            transport=httpx2.AsyncHTTPTransport(uds=sock, verify=verify) if use_socket else None,
            verify=verify,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx2.Timeout(300.0),
        ) as http,
        streamable_http_client(url, http_client=http) as streams,
    ):
        yield streams


@contextlib.asynccontextmanager
async def _socket_transport(path: str, token: str) -> AsyncIterator[TransportStreams]:
    """The SDK's stdio transport (the same framing, both ends) on a connection to the node's
    MCP socket at `path`, once the node took the task's token."""
    from mcp.server.stdio import stdio_server

    from agentnode.tools.lines import HANDSHAKE_OK, FdLines, FdWriter

    conn = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM | sockets.SOCK_CLOEXEC)
    try:
        conn.setblocking(False)
        try:
            with reachable(path) as short:
                await asyncio.get_running_loop().sock_connect(conn, short)
        except OSError as e:
            # Refused or absent: the node may be restarting, its tasks running on.
            raise NodeUnreachable(
                f"cannot reach the node's MCP socket {path}: {e.strerror}"
            ) from None
        lines = FdLines(conn.fileno())
        try:
            out = FdWriter(conn.fileno())
            await out.write(token + "\n")
            answer = (await anext(lines, "")).strip()
            if answer != HANDSHAKE_OK:
                raise ConfigError(f"the node's MCP socket {path} refused the connection: "
                                  f"{answer or 'it closed'}")  # fmt: skip
            # stdio_server: the SDK's line framing, the same in both directions (a client's
            # transport as well as a server's when handed the streams to use).
            async with stdio_server(lines, out) as streams:  # type: ignore[arg-type]
                try:
                    yield streams
                finally:
                    # Our reader sees EOF at once and the node sees the session end; without
                    # it the transport would wait on a read the node has no reason to answer.
                    with contextlib.suppress(OSError):
                        conn.shutdown(sockets.SHUT_RDWR)
        finally:
            lines.close()
    finally:
        conn.close()
