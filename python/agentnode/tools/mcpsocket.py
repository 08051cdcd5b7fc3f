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

What one task can hold of the daemon is bounded, so it cannot starve other tasks' doors: the
token line must come within `HANDSHAKE_S` and be at most `MAX_TOKEN_LINE` bytes, and a task
has at most `MAX_PER_TASK` connections open (a further one is refused with one line)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path
from typing import Any

from mcp.server.runner import serve_dual_era_loop

from agentnode.tools.endpoint import CALLER_KEY, Authenticate, mcp_server, tenant_scope
from agentnode.tools.lines import HANDSHAKE_OK, FdLines, FdWriter, LineTooLong, serving_streams
from agentnode.tools.service import ToolService

__all__ = ["HANDSHAKE_S", "MAX_LINE", "MAX_PER_TASK", "MAX_TOKEN_LINE", "MCPSocket"]

log = logging.getLogger("agentnode.tools.mcp")

#: The longest line (one JSON-RPC message) a connection may send: its arguments are held whole.
MAX_LINE = 64 << 20
#: Seconds a new connection has to send its token line.
HANDSHAKE_S = 10.0
#: The longest token line (a task token is a few dozen bytes).
MAX_TOKEN_LINE = 4096
#: Connections one task may have open at once (an agent needs one or a few).
MAX_PER_TASK = 64


class MCPSocket:
    """Serves the MCP socket at `path` in the running loop; `authenticate(token)` names the
    calling task (None: refused)."""

    def __init__(
        self,
        service: ToolService,
        authenticate: Authenticate,
        *,
        path: Path,
        max_line: int = MAX_LINE,
    ) -> None:
        self.path = path
        self._server = mcp_server(service)
        self._init = self._server.create_initialization_options()
        self._authenticate = authenticate
        self._max_line = max_line
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._per_task: dict[str, int] = {}

    @property
    def connections(self) -> int:
        """How many connections are open now."""
        return len(self._connections)

    async def start(self) -> None:
        """Listens at `path` (a stale socket file there is replaced)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(self.path))
            self.path.chmod(0o666)  # tasks run as unprivileged users; tokens guard it
            listener.listen(128)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
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
            task = loop.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        try:
            lines = FdLines(conn.fileno(), limit=MAX_TOKEN_LINE)
            out = FdWriter(conn.fileno())
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
            conn.close()

    async def _session(self, lines: FdLines, out: FdWriter, token: str, tenant: str) -> None:
        """One MCP session on an accepted connection, the token checked at every request."""
        authenticate = self._authenticate
        state: dict[str, Any] = {CALLER_KEY: lambda: authenticate(token)}
        with tenant_scope(tenant):
            async with serving_streams(lines, out) as (read, write):
                await serve_dual_era_loop(
                    self._server, read, write, lifespan_state=state, init_options=self._init
                )
