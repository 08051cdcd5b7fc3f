"""`Tools`: the node's tools from Python agent code, over the node's HTTP API (the task socket
inside a task, with its token). For MCP-speaking frameworks, `mcp_client()` connects the `mcp`
SDK to the node's MCP endpoint ($AGENTNODE_MCP_URL, over $AGENTNODE_MCP_SOCKET when set)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from agentnode.errors import ConfigError
from agentnode.sdk.transport import connect, request

if TYPE_CHECKING:
    from mcp import Client
    from mcp.client._transport import TransportStreams

__all__ = ["Tools"]


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
    def mcp_client(*, url: str | None = None, token: str | None = None) -> Client:
        """An `mcp.Client` (use `async with`) on the node's MCP endpoint."""
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        url = url or os.environ.get("AGENTNODE_MCP_URL")
        token = token or os.environ.get("AGENTNODE_TOKEN")
        if not url or not token:
            raise ConfigError("AGENTNODE_MCP_URL and AGENTNODE_TOKEN are unset (run as a task)")
        sock = os.environ.get("AGENTNODE_MCP_SOCKET")
        use_socket = sock and url.startswith("http://agentnode/")

        @contextlib.asynccontextmanager
        async def transport() -> AsyncIterator[TransportStreams]:
            async with (
                httpx2.AsyncClient(
                    transport=httpx2.AsyncHTTPTransport(uds=sock) if use_socket else None,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=httpx2.Timeout(300.0),
                ) as http,
                streamable_http_client(url, http_client=http) as streams,
            ):
                yield streams

        return Client(transport())
