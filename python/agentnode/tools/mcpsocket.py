"""The MCP socket: the node's MCP server (`endpoint.mcp_server`, the same one the streamable-HTTP
endpoint serves) on a unix socket bound into every task, speaking MCP's stdio framing (one
JSON-RPC message per line, parsed and dumped by the `mcp` SDK's own types) over each
connection. It is the cheap door for `agentnode.sdk.Tools.mcp_client()`: no HTTP request, no
session lookup and no SSE machinery per call.

A connection opens with one line that is the task's token; the node answers `ok` (then MCP
runs on the connection until either side closes) or one line `error: WHY` and closes. One
connection is one MCP session for that task's tenant: it sees only that tenant's tools, and
the servers it calls are that tenant's own instances. The token is checked again at every
request, as the HTTP endpoint does: once its task's attempt ends, the connection lists
nothing and every call is refused.

A `tools/call` on a connection that opened in the 2026-07-28 era (every request carries its
own envelope: what `Tools.mcp_client()` negotiates) is passed through rather than dispatched
by the SDK session: its line, parsed by the SDK's types, is taken off the session's way and
served in a task of its own with the SDK's own checks in the SDK's order (the envelope
ladder, the per-version check of the request, `CallToolRequestParams`, the same handler as
the session's, the per-version check and sieve of the result, the `serverInfo` stamp), and
its answer written back as one `JSONRPCResponse` or `JSONRPCError` (the SDK's error mapping). A
`notifications/cancelled` naming it cancels that task (and so the call at the server; no
answer follows, as the SDK does); the connection ending cancels every call still running.
The opening request, `initialize`-era connections and every other method go through the SDK
session as before. Each passed-through call saves the session's memory-stream hops, task
group, per-request dispatcher, connection and context objects, cancel scopes and middleware
(bench/HISTORY.md, "mcppass").

What one task can hold of the daemon is bounded, so it cannot starve other tasks' doors: the
token line must come within `HANDSHAKE_S` and be at most `MAX_TOKEN_LINE` bytes, a task
has at most `MAX_PER_TASK` connections open (a further one is refused with one line), and a
connection at most `MAX_CALLS` passed-through calls running (a further one is answered with
a JSON-RPC error)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mcp_types as types
from mcp.server.runner import modern_error_data, serve_dual_era_loop
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import InboundLadderRejection, classify_inbound_request
from mcp.shared.jsonrpc_dispatcher import cancelled_request_id_from_params
from mcp_types import CONNECTION_CLOSED, INTERNAL_ERROR, METHOD_NOT_FOUND, SERVER_INFO_META_KEY
from mcp_types import methods as protocol
from pydantic import ValidationError

from agentnode.peercap import PeerCap
from agentnode.tools.endpoint import (
    CALLER_KEY,
    MAX_PER_TASK,
    REVOKED,
    Authenticate,
    call_result,
    mcp_server,
    tenant_scope,
)
from agentnode.tools.lines import (
    HANDSHAKE_OK,
    MAX_MESSAGE,
    STALL_S,
    FdLines,
    FdWriter,
    LineTooLong,
    serving_streams,
    write_message,
)
from agentnode.tools.registry import Caller
from agentnode.tools.service import ToolService
from agentnode.unixsock import listen_unix

__all__ = ["HANDSHAKE_S", "MAX_CALLS", "MAX_PER_TASK", "MAX_TOKEN_LINE", "MCPSocket"]

log = logging.getLogger("agentnode.tools.mcp")

#: Seconds a new connection has to send its token line.
HANDSHAKE_S = 10.0
#: Passed-through calls one connection may have running at once.
MAX_CALLS = 256
#: The longest token line (a task token is a few dozen bytes).
MAX_TOKEN_LINE = 4096


class MCPSocket:
    """Serves the MCP socket at `path` in the running loop; `authenticate(token)` names the
    calling task (None: refused)."""

    def __init__(
        self,
        service: ToolService,
        authenticate: Authenticate,
        *,
        path: Path,
        max_line: int = MAX_MESSAGE,
    ) -> None:
        self.path = path
        self._service = service
        self._server = mcp_server(service)
        self._stamp = self._server.server_info_stamp
        self._init = self._server.create_initialization_options()
        self._authenticate = authenticate
        self._max_line = max_line
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._peers = PeerCap(f"MCP socket {path}")
        self._per_task: dict[str, int] = {}

    @property
    def connections(self) -> int:
        """How many connections are open now."""
        return len(self._connections)

    async def start(self) -> None:
        """Listens at `path` (a stale socket file there is replaced)."""
        listener = listen_unix(self.path)
        self._listener = listener
        self._accepting = asyncio.get_running_loop().create_task(self._accept(listener))

    async def stop(self) -> None:
        """Stops listening and ends every connection."""
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:  # EMFILE and the like: the listener itself stays good
                log.warning("MCP socket: cannot accept a connection: %s", e)
                await asyncio.sleep(0.1)
                continue
            peer = self._peers.admit(conn)
            if peer is None:
                conn.close()
                continue
            task = loop.create_task(self._serve(conn))
            task.add_done_callback(functools.partial(self._left, peer))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def _left(self, peer: str, _: asyncio.Task[None]) -> None:
        self._peers.release(peer)

    async def _serve(self, conn: socket.socket) -> None:
        lines = FdLines(conn.fileno(), limit=MAX_TOKEN_LINE)
        try:
            out = FdWriter(
                conn.fileno(), stall_s=STALL_S, on_stall=functools.partial(_hang_up, conn)
            )
            try:
                token = (await asyncio.wait_for(anext(lines, ""), HANDSHAKE_S)).strip()
            except (LineTooLong, TimeoutError):
                token = ""
            caller = self._authenticate(token) if token else None
            if caller is None:
                await out.write("error: missing or unknown task token (send the task's token "
                                "as the first line)\n")  # fmt: skip
                return
            if self._per_task.get(caller.task, 0) >= MAX_PER_TASK:
                await out.write(f"error: task {caller.task} has {MAX_PER_TASK} MCP connections "
                                "open already (close one first)\n")  # fmt: skip
                return
            self._per_task[caller.task] = self._per_task.get(caller.task, 0) + 1
            try:
                lines.limit = self._max_line
                await out.write(HANDSHAKE_OK + "\n")
                await self._session(lines, out, token, caller.tenant)
            finally:
                if (left := self._per_task.pop(caller.task) - 1) > 0:
                    self._per_task[caller.task] = left
        except OSError:
            pass  # the task went away mid-write: its connection is simply over
        except Exception:
            log.exception("MCP socket: a connection failed")
        finally:
            lines.close()
            conn.close()

    async def _session(self, lines: FdLines, out: FdWriter, token: str, tenant: str) -> None:
        """One MCP session on an accepted connection, the token checked at every request."""
        authenticate = self._authenticate
        state: dict[str, Any] = {CALLER_KEY: lambda: authenticate(token)}
        calls = _PassThrough(self._service, out, state[CALLER_KEY], stamp=self._stamp)
        with tenant_scope(tenant):
            try:
                async with serving_streams(lines, out, route=calls.route) as (read, write):
                    await serve_dual_era_loop(
                        self._server, read, write, lifespan_state=state, init_options=self._init
                    )
            finally:
                await calls.close()


def _hang_up(conn: socket.socket) -> None:
    """Ends a connection whose task reads none of its answers: its reader sees the end, and
    what was held for it goes."""
    log.warning("MCP socket: a connection read none of its answers for %g s: closed", STALL_S)
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


#: Seconds the answer to a call cut off by the node's stop may take to write.
_CLOSING_WRITE_S = 1.0


def _enveloped(params: Mapping[str, Any] | None) -> bool:
    """The request carries the 2026-07-28 envelope (the key the SDK routes eras by)."""
    meta = params.get("_meta") if params else None
    return isinstance(meta, Mapping) and types.PROTOCOL_VERSION_META_KEY in meta


class _PassThrough:
    """A connection's passed-through `tools/call` requests (module docstring): `route` takes
    them off the SDK session's way, in the order the lines came."""

    def __init__(
        self,
        service: ToolService,
        out: FdWriter,
        caller: Callable[[], Caller | None],
        *,
        stamp: dict[str, Any],
    ) -> None:
        self._service = service
        self._out = out
        self._caller = caller
        #: The SDK server's `serverInfo` stamp for 2026-era results (dumped, never changed).
        self._stamp = stamp
        #: Decided by the connection's first request, as the SDK decides it.
        self._modern: bool | None = None
        self._running: dict[types.RequestId, asyncio.Task[None]] = {}
        #: Refusals of calls over `MAX_CALLS` being written.
        self._refusals: set[asyncio.Task[None]] = set()
        #: Calls the peer cancelled (never answered), until their task has ended.
        self._cancelled: dict[types.RequestId, bool] = {}

    def route(self, message: types.JSONRPCMessage) -> bool:
        if isinstance(message, types.JSONRPCRequest):
            if self._modern is None:
                # The opening request is the SDK's: it picks the same era from it.
                self._modern = message.method != "initialize" and _enveloped(message.params)
                return False
            # "7" and 7 are one id to the SDK's correlation: so they are here.
            key = coerce_request_id(message.id)
            if (
                not self._modern
                or message.method != "tools/call"
                or not _enveloped(message.params)
                or key in self._running
            ):
                return False
            loop = asyncio.get_running_loop()
            if len(self._running) >= MAX_CALLS:
                busy = types.ErrorData(code=types.INTERNAL_ERROR, message=f"the connection has "
                                       f"{MAX_CALLS} calls running already (wait for one)")  # fmt: skip
                error = types.JSONRPCError(jsonrpc="2.0", id=message.id, error=busy)
                self._refusals.add(refusal := loop.create_task(self._write(error)))
                refusal.add_done_callback(self._refusals.discard)
                return True
            task = loop.create_task(self._answer(message, key))
            self._running[key] = task
            task.add_done_callback(functools.partial(self._done, key))
            return True
        if (
            isinstance(message, types.JSONRPCNotification)
            and message.method == "notifications/cancelled"
            and (rid := cancelled_request_id_from_params(message.params)) is not None
            and (held := self._running.get(key := coerce_request_id(rid))) is not None
        ):
            self._cancelled[key] = True
            held.cancel()
            return True
        return False

    async def _write(self, message: types.JSONRPCMessage) -> None:
        with contextlib.suppress(OSError):  # the task left: nothing to answer
            await write_message(self._out, message)

    def _done(self, rid: types.RequestId, task: asyncio.Task[None]) -> None:
        if self._running.get(rid) is task:
            del self._running[rid]
            self._cancelled.pop(rid, None)

    async def _answer(self, request: types.JSONRPCRequest, key: types.RequestId) -> None:
        reply: types.JSONRPCMessage
        try:
            result = await self._serve(request.params)
            reply = types.JSONRPCResponse(jsonrpc="2.0", id=request.id, result=result)
        except asyncio.CancelledError:
            if self._cancelled.pop(key, None) is None:
                # The connection is being closed under it (the node stops): answered, as
                # the SDK answers, so the task is not left waiting; a peer's cancel is not.
                closed = types.ErrorData(code=CONNECTION_CLOSED, message="Connection closed")
                with contextlib.suppress(OSError, TimeoutError):
                    await asyncio.wait_for(write_message(self._out, types.JSONRPCError(
                        jsonrpc="2.0", id=request.id, error=closed)), _CLOSING_WRITE_S)  # fmt: skip
            raise
        except Exception as e:
            # The SDK's own mapping: its errors and pydantic's to theirs, the rest logged.
            reply = types.JSONRPCError(jsonrpc="2.0", id=request.id, error=modern_error_data(e))
        await self._write(reply)

    async def _serve(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """What the SDK's modern stream loop and its kernel (`ServerRunner`) do with a
        `tools/call`, in their order and with their checks, but none of the per-request
        connection, session, context and middleware objects (the node installs no global
        tracer for the SDK's span)."""
        route = classify_inbound_request({"method": "tools/call", "params": params})
        if isinstance(route, InboundLadderRejection):
            raise MCPError(code=route.code, message=route.message, data=route.data)
        version = route.protocol_version
        try:
            protocol.validate_client_request("tools/call", version, params)
        except KeyError:
            raise MCPError(
                code=METHOD_NOT_FOUND, message="Method not found", data="tools/call"
            ) from None
        typed = types.CallToolRequestParams.model_validate(params or {}, by_name=False)
        caller = self._caller()
        result = await call_result(self._service, REVOKED if caller is None else caller, typed)
        try:
            dumped = protocol.serialize_server_result("tools/call", version, result)
        except ValidationError:
            log.exception("tools/call produced an invalid result")
            raise MCPError(
                code=INTERNAL_ERROR, message="Handler returned an invalid result"
            ) from None
        dumped.setdefault("resultType", "complete")
        meta = dumped.get("_meta")
        if meta is None:
            dumped["_meta"] = {SERVER_INFO_META_KEY: self._stamp}
        elif isinstance(meta, dict) and meta.get(SERVER_INFO_META_KEY) is None:
            dumped["_meta"] = {**meta, SERVER_INFO_META_KEY: self._stamp}
        return dumped

    async def close(self) -> None:
        """Cancels the calls still running (the connection ended) and waits for them."""
        running = [*self._running.values(), *self._refusals]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
