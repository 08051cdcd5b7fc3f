"""The MCP door: a streamable-HTTP MCP server (the `mcp` SDK's) that the node serves to its
tasks. Each request carries a task's token; `tools/list` shows only what that task's tenant
may use and `tools/call` runs through the same `ToolService` as the HTTP API and the CLI."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server
from mcp.server.transport_security import TransportSecuritySettings
from starlette.applications import Starlette

from agentnode.tools.registry import Caller
from agentnode.tools.service import ToolService

__all__ = ["IDEMPOTENCY_META", "MCPEndpoint", "mcp_app"]

#: A call's idempotency key, in the request's `_meta` (MCP has no field of its own for it).
IDEMPOTENCY_META = "agentnode/idempotency_key"

Authenticate = Callable[[str], Caller | None]


class _Unauthorized(Exception):
    pass


def _caller(ctx: Any, authenticate: Authenticate) -> Caller:
    request = ctx.request
    header = "" if request is None else request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    caller = authenticate(token) if scheme.lower() == "bearer" and token else None
    if caller is None:
        raise _Unauthorized("missing or unknown task token (send Authorization: Bearer TOKEN)")
    return caller


def mcp_app(service: ToolService, authenticate: Authenticate) -> Starlette:
    """The endpoint as an ASGI app at /mcp; `authenticate(token)` names the calling task."""

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        try:
            caller = _caller(ctx, authenticate)
        except _Unauthorized:
            return types.ListToolsResult(tools=[])
        listed = await service.list(caller.tenant)
        return types.ListToolsResult(tools=[types.Tool.model_validate(t) for t in listed])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
            caller = _caller(ctx, authenticate)
        except _Unauthorized as e:
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=str(e))], is_error=True
            )
        meta: dict[str, Any] = dict(params.meta) if params.meta is not None else {}
        key = meta.get(IDEMPOTENCY_META)
        result = await service.call(
            params.name,
            params.arguments or {},
            caller,
            idempotency_key=key if isinstance(key, str) else None,
        )
        return types.CallToolResult.model_validate(result)

    server: Server[Any] = Server("agentnode", on_list_tools=list_tools, on_call_tool=call_tool)
    # Requests come from tasks over the node's own socket or bridge and carry a task token:
    # DNS-rebinding checks (which guard browsers on localhost) do not apply.
    return server.streamable_http_app(
        stateless_http=False,
        json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
    )


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the node owns SIGTERM and SIGINT


class MCPEndpoint:
    """Serves the app `app()` makes (one per listener: each runs its own session manager) on
    a unix socket (bound into every task) and optionally a TCP address, in the node's loop."""

    def __init__(
        self,
        app: Callable[[], Starlette],
        *,
        uds: Path | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> None:
        self._servers: list[_QuietServer] = []
        if uds is not None:
            uds.parent.mkdir(parents=True, exist_ok=True)
            self._servers.append(
                _QuietServer(
                    uvicorn.Config(
                        app(), uds=str(uds), log_level="warning", lifespan="on", access_log=False
                    )
                )
            )
        if host is not None and port is not None:
            self._servers.append(
                _QuietServer(
                    uvicorn.Config(
                        app(),
                        host=host,
                        port=port,
                        log_level="warning",
                        lifespan="on",
                        access_log=False,
                    )
                )
            )
        self._tasks: list[asyncio.Task[None]] = []
        self.uds = uds

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self._servers:
            self._tasks.append(loop.create_task(s.serve()))
        while not all(s.started for s in self._servers):
            for t in self._tasks:
                if t.done():
                    t.result()  # raises what stopped it
                    raise OSError("the MCP endpoint stopped while starting")
            await asyncio.sleep(0.01)
        if self.uds is not None:
            self.uds.chmod(0o666)  # tasks run as unprivileged users; tokens guard it

    async def stop(self) -> None:
        for s in self._servers:
            s.should_exit = True
        for t in self._tasks:
            with contextlib.suppress(Exception):
                await t
