"""The MCP door: a streamable-HTTP MCP server (the `mcp` SDK's) that the node serves to its
tasks. Each request carries a task's token; `tools/list` shows only what that task's tenant
may use and `tools/call` runs through the same `ToolService` as the HTTP API and the CLI.
`mcp_server` is the SDK server both MCP doors serve (this one and `agentnode.tools.mcpsocket`)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import mcp_types as types
import uvicorn
from mcp.server.lowlevel import Server
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from agentnode.peercap import PeerCap
from agentnode.sdk.tools import IDEMPOTENCY_META
from agentnode.tools.lines import MAX_CONTAINERS, MAX_MESSAGE, containers, too_many_containers
from agentnode.tools.registry import Caller
from agentnode.tools.service import ToolService
from agentnode.unixsock import listen_unix

__all__ = [
    "CALLER_KEY",
    "MAX_PER_TASK",
    "REVOKED",
    "MCPEndpoint",
    "call_result",
    "mcp_app",
    "mcp_server",
    "tenant_scope",
]

#: Requests (HTTP door) or connections (MCP socket) one task may have open at once: an agent
#: needs one or a few, and a task must not hold what other tasks' doors need.
MAX_PER_TASK = 64

Authenticate = Callable[[str], Caller | None]


class _Unauthorized(Exception):
    pass


#: The tenant of the HTTP request being handled (None: no valid token), for the one SDK hook
#: that is not handed the request (`get_tool_input_schema`).
_TENANT: contextvars.ContextVar[str | None] = contextvars.ContextVar("mcp_tenant", default=None)
#: What `CallToolResult` carries by default: 2026-07-28 requires `resultType`; the SDK drops
#: it for clients of earlier protocol versions.
_COMPLETE = {"resultType": "complete"}
#: Where a request's caller is found: in its ASGI scope (`_authenticating` puts it there), or
#: for a connection of the MCP socket, in the connection's lifespan state as a function that
#: authenticates the connection's token again (a token is revoked when its task's attempt
#: ends: a connection must not outlive it).
CALLER_KEY = "agentnode.caller"
#: Why a call on an MCP socket connection whose task has ended is refused.
REVOKED = "the connection's task token is no longer valid (its task has ended)"


def _caller(ctx: Any) -> Caller:
    request = ctx.request
    if request is not None:
        caller = request.scope.get(CALLER_KEY)
        why = "missing or unknown task token (send Authorization: Bearer TOKEN)"
    else:
        state = ctx.lifespan_context
        current = state.get(CALLER_KEY) if isinstance(state, dict) else None
        caller = current() if callable(current) else None
        why = REVOKED
    if caller is None:
        raise _Unauthorized(why)
    assert isinstance(caller, Caller)
    return caller


def _authenticating(app: ASGIApp, authenticate: Authenticate, *, max_per_task: int) -> ASGIApp:
    """`app` with each HTTP request's token checked once: its caller in the request's scope
    (the handlers' view) and its tenant in `_TENANT` while the request is handled. A task has
    at most `max_per_task` requests open at once (a further one is refused with 429)."""
    open_now: dict[str, int] = {}

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)
        header = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = header.decode("latin-1").partition(" ")
        caller = authenticate(token) if scheme.lower() == "bearer" and token else None
        if caller is None:
            held = 0
        elif (held := open_now.get(caller.task, 0)) >= max_per_task:
            return await _too_many(send, f"task {caller.task} has {max_per_task} MCP requests "
                                   "open already (finish or close one first)")  # fmt: skip
        scope[CALLER_KEY] = caller
        if caller is not None:
            open_now[caller.task] = held + 1
        try:
            if caller is not None and scope["method"] == "POST":
                read = await _checked_body(receive, send)
                if read is None:
                    return
                receive = read
            with tenant_scope(None if caller is None else caller.tenant):
                await app(scope, receive, send)
        finally:
            if caller is not None and (left := open_now.pop(caller.task) - 1) > 0:
                open_now[caller.task] = left

    return wrapped


async def _checked_body(receive: Receive, send: Send) -> Receive | None:
    """The request body read ahead and counted as a task's line is (`MAX_CONTAINERS`): a
    `receive` that hands it on, or None once a refusal is sent. (Past `MAX_MESSAGE` bytes the
    SDK refuses it.)"""
    read: list[Message] = []
    count = size = 0
    while True:
        message = await receive()
        read.append(message)
        if message["type"] != "http.request":
            break
        body = message.get("body", b"")
        count += containers(body)
        size += len(body)
        if count > MAX_CONTAINERS:
            await _refuse(send, 400, types.INVALID_REQUEST, too_many_containers(count))
            return None
        if size > MAX_MESSAGE or not message.get("more_body"):
            break
    ahead = iter(read)

    async def replay() -> Message:
        return next(ahead, None) or await receive()

    return replay


async def _too_many(send: Send, why: str) -> None:
    """A 429 whose body is one JSON-RPC error naming the bound (the SDK's own refusals take
    the same shape)."""
    await _refuse(send, 429, types.INTERNAL_ERROR, why)


async def _refuse(send: Send, status: int, code: int, why: str) -> None:
    error = types.JSONRPCError(
        jsonrpc="2.0", id=None, error=types.ErrorData(code=code, message=why)
    )
    body = error.model_dump_json(by_alias=True, exclude_unset=True).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


@contextlib.contextmanager
def tenant_scope(tenant: str | None) -> Iterator[None]:
    """Sets the tenant `mcp_server`'s input-schema hook answers for, within the block."""
    reset = _TENANT.set(tenant)
    try:
        yield
    finally:
        _TENANT.reset(reset)


async def call_result(
    service: ToolService, caller: Caller | str, params: types.CallToolRequestParams
) -> dict[str, Any]:
    """`tools/call`'s result for `caller` (a string: why the call is refused), in MCP's wire
    shape: the SDK checks it once as it serialises the response (a `CallToolResult` built here
    would be validated, then dumped, for nothing)."""
    if isinstance(caller, str):
        return {**_COMPLETE, "content": [{"type": "text", "text": caller}], "isError": True}
    key = params.meta.get(IDEMPOTENCY_META) if params.meta is not None else None
    result = await service.call(
        params.name,
        params.arguments or {},
        caller,
        idempotency_key=key,  # checked by the service: a bad one is refused, not dropped
    )
    return {**_COMPLETE, **result}


def mcp_server(service: ToolService) -> Server[Any]:
    """The SDK's lowlevel server over `service`. Its handlers find the caller as `_caller`
    says (none: `tools/list` is empty and `tools/call` an error)."""

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        try:
            caller = _caller(ctx)
        except _Unauthorized:
            return types.ListToolsResult(tools=[])
        listed = await service.list(caller.tenant)
        return types.ListToolsResult(tools=[types.Tool.model_validate(t) for t in listed])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> dict[str, Any]:
        try:
            caller: Caller | str = _caller(ctx)
        except _Unauthorized as e:
            caller = str(e)
        return await call_result(service, caller, params)

    def input_schema(name: str) -> Mapping[str, Any] | None:
        # Without this hook the SDK runs a whole tools/list per tools/call to find the
        # schema it checks `Mcp-Param-*` headers against (it was ~1 ms of each call).
        tenant = _TENANT.get()
        return None if tenant is None else service.input_schema(name, tenant)

    server: Server[Any] = Server(
        "agentnode",
        on_list_tools=list_tools,
        # It returns a wire dict, which the SDK's runner takes as it takes a CallToolResult
        # (validated and sieved per protocol version once); the hook's type names models only.
        on_call_tool=cast(Any, call_tool),
        get_tool_input_schema=input_schema,
    )
    return server


def mcp_app(
    service: ToolService, authenticate: Authenticate, *, max_per_task: int = MAX_PER_TASK
) -> ASGIApp:
    """The endpoint as an ASGI app at /mcp; `authenticate(token)` names the calling task, which
    may have `max_per_task` requests open at once (a long-lived stream counts)."""
    server = mcp_server(service)
    # Requests come from tasks over the node's own socket or bridge and carry a task token:
    # DNS-rebinding checks (which guard browsers on localhost) do not apply. Stateless: the
    # node's tools need no session, and the SDK's sessions sit in one node-wide table (10,000,
    # 30 minutes idle) that one task opening sessions in a loop would fill for every tenant.
    app = server.streamable_http_app(
        stateless_http=True,
        json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        # The socket's bound on one message, not the SDK's 4 MiB: a call takes the same
        # arguments through either door.
        max_request_body_size=MAX_MESSAGE,
    )
    return _authenticating(app, authenticate, max_per_task=max_per_task)


def _capped_http(door: str) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol behind a `PeerCap` of its own (a door into tasks)."""
    cap = PeerCap(door)

    class Capped(HttpToolsProtocol):
        _peer: str | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._peer = cap.admit(transport.get_extra_info("socket"))
            if self._peer is None:
                transport.abort()
                return
            super().connection_made(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            if self._peer is not None:
                cap.release(self._peer)
                super().connection_lost(exc)

    return Capped


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the node owns SIGTERM and SIGINT


class MCPEndpoint:
    """Serves the app `app()` makes (one per listener: each runs its own session manager) on
    a unix socket (bound into every task) and optionally a TCP address, in the node's loop."""

    def __init__(
        self,
        app: Callable[[], ASGIApp],
        *,
        uds: Path | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> None:
        self._servers: list[_QuietServer] = []
        #: The unix socket's server, which serves on a socket bound here (any path length).
        self._on_uds: _QuietServer | None = None
        # httptools: uvicorn's C parser (its pure-Python h11 cost ~15% of a tool call).
        common: dict[str, Any] = {"log_level": "warning", "lifespan": "on", "access_log": False}
        if uds is not None:
            http = _capped_http(f"MCP endpoint {uds}")
            self._on_uds = _QuietServer(uvicorn.Config(app(), http=http, **common))
            self._servers.append(self._on_uds)
        if host is not None and port is not None:
            http = _capped_http(f"MCP endpoint {host}:{port}")
            self._servers.append(
                _QuietServer(uvicorn.Config(app(), host=host, port=port, http=http, **common))
            )
        self._tasks: list[asyncio.Task[None]] = []
        self.uds = uds

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for s in self._servers:
            if s is self._on_uds and self.uds is not None:
                # Tasks run as unprivileged users; tokens guard the socket.
                sockets = [listen_unix(self.uds, mode=0o666)]
                self._tasks.append(loop.create_task(s.serve(sockets=sockets)))
            else:
                self._tasks.append(loop.create_task(s.serve()))
        while not all(s.started for s in self._servers):
            for t in self._tasks:
                if t.done():
                    t.result()  # raises what stopped it
                    raise OSError("the MCP endpoint stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        for s in self._servers:
            s.should_exit = True
        for t in self._tasks:
            with contextlib.suppress(Exception):
                await t
