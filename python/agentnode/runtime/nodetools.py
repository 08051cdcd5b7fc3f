"""The node's tools as the loop reaches them: through the node's MCP endpoint
($AGENTNODE_MCP_URL, the official `mcp` SDK client) or its HTTP tool API (`agentnode.sdk.Tools`).
Both doors end in the same tool service (the same checks, audit and idempotency keys) and give
the same normalised result; they differ in cost (docs/agents.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from agentnode.errors import NodeUnreachable, TaskError
from agentnode.sdk.tools import IDEMPOTENCY_META, Tools

if TYPE_CHECKING:
    from mcp import Client

__all__ = ["DOORS", "NodeTools", "open_tools"]

#: How the runtime reaches the tools, as `--tools-via` takes it.
DOORS = ("mcp", "api")
#: Seconds a call goes on trying a node it cannot reach: a node restarting (its tasks run on)
#: is back within a few. Each try sends the call's idempotency key, so none runs twice.
RECONNECT_S = 60.0

_T = TypeVar("_T")


class NodeTools(Protocol):
    """What the loop needs of a door to the node's tools."""

    def list(self) -> list[dict[str, Any]]:
        """The tools this task may use (name, description, inputSchema)."""

    def call(self, name: str, arguments: dict[str, Any], *, key: str) -> dict[str, Any]:
        """Runs a tool once per idempotency `key`; its normalised result (MCP's shape)."""

    def close(self) -> None:
        """Lets go of the connection."""


def open_tools(door: str) -> NodeTools:
    """A connection to the node's tools through `door` (one of `DOORS`)."""
    if door == "mcp":
        return _Mcp()
    if door == "api":
        return _Api()
    raise TaskError(f"no way to reach tools called {door!r} (use one of: {', '.join(DOORS)})")


class _Api:
    def __init__(self) -> None:
        self._tools = Tools()

    def list(self) -> list[dict[str, Any]]:
        return self._tools.list()

    def call(self, name: str, arguments: dict[str, Any], *, key: str) -> dict[str, Any]:
        return _until_reached(lambda: self._tools.call(name, arguments, idempotency_key=key))

    def close(self) -> None:
        pass


def _until_reached(attempt: Callable[[], _T], *, lost: Callable[[], None] = lambda: None) -> _T:
    """`attempt()`, tried again while the node cannot be reached (`lost()` after each such
    failure), for up to `RECONNECT_S` seconds."""
    deadline = time.monotonic() + RECONNECT_S
    delay = 0.1
    while True:
        try:
            return attempt()
        except NodeUnreachable:
            lost()
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


class _Mcp(_Api):
    """An MCP session, opened at the run's first tool call and kept open for the rest of the
    run, driven from the synchronous loop on a private event loop. One task holds the session
    open from start to close (anyio wants its scopes left by the task that entered them); each
    call is a task of its own on the same loop.

    Its list is the HTTP tool API's (`_Api.list`): the list `tools/list` answers, of the same
    service for the same caller. An agent that answers without a tool then opens no session,
    which cost a fresh agent ~8 ms of CPU and the daemon ~3 ms (docs/agents.md); the SDK lists
    the tools over the session at its first call, to check results against output schemas."""

    def __init__(self) -> None:
        super().__init__()
        self._key_meta = IDEMPOTENCY_META
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Client | None = None

    def _open(self) -> Client:
        self._loop = asyncio.new_event_loop()
        self._closing = asyncio.Event()
        self._ready: asyncio.Future[Client] = self._loop.create_future()
        self._session = self._loop.create_task(self._hold())
        try:
            self._client = self._run(self._connected(), "connect")
        except BaseException:
            self.close()
            raise
        return self._client

    async def _hold(self) -> None:
        try:
            async with Tools.mcp_client() as client:
                self._ready.set_result(client)
                await self._closing.wait()
        except Exception as e:
            if self._ready.done():
                raise
            self._ready.set_exception(e)

    async def _connected(self) -> Client:
        return await self._ready

    def _run(self, step: Awaitable[_T], what: str) -> _T:
        assert self._loop is not None
        try:
            return self._loop.run_until_complete(step)
        except Exception as e:
            # The SDK's errors (a refused socket, an HTTP error, a JSON-RPC error, a closed
            # session) in one line: the attempt ends, and a retry resumes from the checkpoint.
            message = " ".join(str(e).split()) or type(e).__name__
            kind = NodeUnreachable if _connection_lost(e) else TaskError
            raise kind(f"the node's MCP endpoint: {what}: {message}") from e

    def call(self, name: str, arguments: dict[str, Any], *, key: str) -> dict[str, Any]:
        meta: Any = {self._key_meta: key}  # a TypedDict open to extra keys; mypy sees it closed

        def attempt() -> dict[str, Any]:
            client = self._client or self._open()
            result = self._run(client.call_tool(name, arguments, meta=meta),
                               f"tools/call {name}")  # fmt: skip
            return result.model_dump(by_alias=True, exclude_none=True)

        # A session the node dropped (it restarted) is opened again, and the call sent again.
        return _until_reached(attempt, lost=self._drop)

    def _drop(self) -> None:
        """Lets go of a session whose connection is gone, whatever its ending raises."""
        with contextlib.suppress(TaskError):
            self.close()

    def close(self) -> None:
        if self._loop is None:
            return
        self._closing.set()
        try:
            self._run(self._session, "close")
        finally:
            self._loop.close()
            self._loop = self._client = None


def _connection_lost(e: BaseException) -> bool:
    """Whether `e` is the node's connection going (not an answer from it)."""
    import anyio
    import httpx2
    from mcp.shared.exceptions import MCPError
    from mcp_types import CONNECTION_CLOSED

    if isinstance(e, BaseExceptionGroup):
        return any(_connection_lost(x) for x in e.exceptions)
    if isinstance(e, MCPError):
        return e.error.code == CONNECTION_CLOSED
    lost = (NodeUnreachable, OSError, httpx2.TransportError, anyio.ClosedResourceError,
            anyio.BrokenResourceError, anyio.EndOfStream)  # fmt: skip
    return isinstance(e, lost)
