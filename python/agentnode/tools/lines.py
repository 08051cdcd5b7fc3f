"""MCP's stdio framing (one JSON-RPC message per line) on file descriptors, read and written
on the event loop: a sandboxed server's pipes, and the unix-socket connections of the node's
MCP socket (`agentnode.tools.mcpsocket`) at both ends.

The `mcp` SDK's `stdio_server` takes any async line source and sink; these are those, without
the thread hand-off per line of `anyio.wrap_file` (it cost ~5 ms p50 under load).
`serving_streams` is that transport for the serving end of a connection a task opened: a line
that is not a JSON-RPC message gets a JSON-RPC error back instead of the SDK's silent drop.
`client_streams` is the same for the node's end of a sandboxed server's pipes (the SDK's
`stdio_server` framing, which is the same both ways).

Both take a `route`: each parsed message is offered to it first, in the order the lines came,
and one it takes never reaches the SDK session (the node's pass-through of tool calls,
`agentnode.tools.mcpsocket` and `agentnode.tools.mcpservers`, answers those itself with
`write_message`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable

import anyio
import mcp_types as types
from mcp.client._transport import TransportStreams
from mcp.shared._context_streams import create_context_streams
from mcp.shared.message import SessionMessage
from pydantic import ValidationError

__all__ = [
    "HANDSHAKE_OK",
    "MAX_CONTAINERS",
    "MAX_MESSAGE",
    "STALL_S",
    "FdLines",
    "FdWriter",
    "LineTooLong",
    "PeerStalled",
    "Route",
    "client_streams",
    "containers",
    "serving_streams",
    "too_many_containers",
    "write_message",
]

#: The node's answer to a good token on its MCP socket (`agentnode.tools.mcpsocket`).
HANDSHAKE_OK = "ok"
#: The largest JSON-RPC message the node takes from a peer (a line on a task's connection or
#: a server's stdout, a request body on the HTTP door): a message is held whole, so this
#: bounds what one peer makes the node hold.
MAX_MESSAGE = 64 << 20
#: The most arrays and objects one message may open (its `[` and `{` bytes, strings' too): each
#: costs the node ~170 bytes and ~1.7 us to parse, held by the loop, so 3.5 million of them
#: (a 10 MiB line of `[],`) cost 630 MiB and stalled every tenant's calls for 5 s.
MAX_CONTAINERS = 100_000
#: Seconds a peer (a task's connection, a server's stdin) may make no room for what the node
#: writes to it before it is taken for gone: what waits for it is held in the node meanwhile.
STALL_S = 60.0

#: Takes a parsed message off the SDK session's way (True) or leaves it to the session.
Route = Callable[[types.JSONRPCMessage], bool]


def containers(raw: str | bytes) -> int:
    """The arrays and objects `raw` may open, counted without parsing it (`MAX_CONTAINERS`)."""
    if isinstance(raw, str):
        return raw.count("[") + raw.count("{")
    return raw.count(b"[") + raw.count(b"{")


def too_many_containers(count: int) -> str:
    """The refusal of a message that opens `count` arrays and objects."""
    return (
        f"message opens {count} arrays and objects ('[' and '{{' bytes), over the node's "
        f"{MAX_CONTAINERS}: send less in one message"
    )


class LineTooLong(ValueError):
    """A peer sent more than the reader's limit without ending its line."""


class FdLines:
    """Lines (each with its newline) read from fd `fd` when it is readable; ends at EOF or a
    read error. With `limit` (which may be changed between lines), a line longer than `limit`
    bytes raises `LineTooLong`. `close()` before the fd is closed.

    The fd stays registered with the loop between lines while a reader keeps coming back: a
    registration per wait (uvloop makes and frees a poll handle, six syscalls) was most of the
    syscalls of a tool call through the node. Readable with nobody waiting, it is dropped, so
    a consumer that stopped reading never makes the loop spin."""

    def __init__(self, fd: int, *, limit: int | None = None) -> None:
        self._fd = fd
        # A bytearray, searched from where the last search stopped: a long line read in
        # many chunks costs linear time, not a copy and a rescan of the whole per chunk.
        self._buffer = bytearray()
        self._scanned = 0
        self.limit = limit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None
        os.set_blocking(fd, False)

    def __aiter__(self) -> FdLines:
        return self

    async def __anext__(self) -> str:
        try:
            while (end := self._buffer.find(b"\n", self._scanned)) < 0:
                self._scanned = len(self._buffer)
                if self.limit is not None and self._scanned > self.limit:
                    raise LineTooLong(f"a line longer than {self.limit} bytes")
                try:
                    chunk = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    await self._readable()
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    raise StopAsyncIteration
                self._buffer += chunk
        except BaseException:
            self.close()  # every way out (EOF, cancel, error): the fd may be closed next
            raise
        line = self._buffer[:end].decode(errors="replace") + "\n"
        del self._buffer[: end + 1]
        self._scanned = 0
        if self.limit is not None and end > self.limit:
            self.close()
            raise LineTooLong(f"a line longer than {self.limit} bytes")
        return line

    async def _readable(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._fd, self._wake)
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        if self._waiter is None:
            self.close()  # nobody reads now: registered again at the next wait
        elif not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Drops the fd's registration with the loop (the fd itself is the caller's)."""
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None


class PeerStalled(ConnectionError):
    """The peer made no room to write for the writer's `stall_s`: it is not reading."""


class FdWriter:
    """Writes text to fd `fd` from the event loop, waiting while it is full. Writers take
    turns: a line written in several pieces is never cut by another writer's.

    With `stall_s`, a peer that makes no room for that long is taken for gone: `on_stall` is
    called once, and that write and every later one raise `PeerStalled` (what waited to be
    written is dropped, not held for a peer that may never read it)."""

    def __init__(
        self, fd: int, *, stall_s: float | None = None, on_stall: Callable[[], None] | None = None
    ) -> None:
        self._fd = fd
        self._turn = asyncio.Lock()
        self._stall_s = stall_s
        self._on_stall = on_stall
        self._stalled = False
        os.set_blocking(fd, False)

    async def write(self, text: str) -> None:
        self._check()
        data = memoryview(text.encode())
        if not self._turn.locked():  # nobody mid-line: most lines go whole at once
            with contextlib.suppress(BlockingIOError):
                data = data[os.write(self._fd, data) :]
            if not data:
                return
        async with self._turn:
            while data:
                self._check()
                try:
                    data = data[os.write(self._fd, data) :]
                except BlockingIOError:
                    try:
                        async with asyncio.timeout(self._stall_s):
                            await _writable(self._fd)
                    except TimeoutError:
                        self._stalled = True
                        if self._on_stall is not None:
                            self._on_stall()
                        self._check()

    def _check(self) -> None:
        if self._stalled:
            raise PeerStalled(f"the peer read nothing for {self._stall_s:g} s")

    async def flush(self) -> None:
        return None


async def _writable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_writer(fd, wake)
    try:
        await done
    finally:
        loop.remove_writer(fd)


def _malformed(line: str, error: ValidationError) -> types.JSONRPCError:
    """The JSON-RPC error for a line that is no JSON-RPC message: a parse error for bad JSON,
    an invalid request (with the id, when one can be read) for JSON of the wrong shape."""
    errors = error.errors()
    if not errors or errors[0]["type"] == "json_invalid":
        return types.JSONRPCError(
            jsonrpc="2.0",
            id=None,
            error=types.ErrorData(code=types.PARSE_ERROR, message="the line is not JSON"),
        )
    request_id: types.RequestId | None = None
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):  # the SDK's parser took it: not expected, not fatal
        raw = None
    if isinstance(raw, dict):
        found = raw.get("id")
        if isinstance(found, str | int) and not isinstance(found, bool):
            request_id = found
    where = ".".join(str(p) for p in errors[0]["loc"])
    return types.JSONRPCError(
        jsonrpc="2.0",
        id=request_id,
        error=types.ErrorData(
            code=types.INVALID_REQUEST,
            message=f"not a JSON-RPC message: {errors[0]['msg']}"
            + (f" at {where}" if where else ""),
        ),
    )


def _has_id(line: str) -> bool:
    """Whether a line the SDK parsed as a notification names an id (notifications are few: the
    line is read again only for them, and only when it holds `"id"`)."""
    if '"id"' not in line:
        return False
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and "id" in raw


async def write_message(out: FdWriter, message: types.JSONRPCMessage) -> None:
    """Writes one message as a line, dumped by the SDK's types as its stdio transport does."""
    await out.write(message.model_dump_json(by_alias=True, exclude_unset=True) + "\n")


@contextlib.asynccontextmanager
async def serving_streams(
    lines: FdLines, out: FdWriter, *, route: Route | None = None
) -> AsyncIterator[TransportStreams]:
    """The SDK's stdio transport (the same read and write streams `stdio_server` makes, the
    messages parsed and dumped with its `JSONRPCMessage` types) for the serving end of a
    connection: a malformed line is answered with a JSON-RPC error and the connection goes
    on; a line over the reader's limit is answered and ends it."""
    async with _line_streams(
        lines, out, route, lambda line, e: SessionMessage(_malformed(line, e))
    ) as streams:
        yield streams


@contextlib.asynccontextmanager
async def client_streams(
    lines: FdLines,
    out: FdWriter,
    *,
    route: Route | None = None,
    on_too_long: Callable[[LineTooLong], None] | None = None,
) -> AsyncIterator[TransportStreams]:
    """The SDK's stdio transport for the node's end of a server's pipes: what `stdio_server`
    makes of them (a malformed line reaches the session as the error it is), with `route`.
    A line over the reader's limit ends the reading and is told to `on_too_long`."""
    async with _line_streams(lines, out, route, lambda line, e: e, on_too_long) as streams:
        yield streams


def _invalid(why: str) -> SessionMessage:
    """The answer to a line that cannot be taken as a request, and so has no id to answer."""
    error = types.ErrorData(code=types.INVALID_REQUEST, message=why)
    return SessionMessage(types.JSONRPCError(jsonrpc="2.0", id=None, error=error))


@contextlib.asynccontextmanager
async def _line_streams(
    lines: FdLines,
    out: FdWriter,
    route: Route | None,
    malformed: Callable[[str, ValidationError], SessionMessage | Exception],
    on_too_long: Callable[[LineTooLong], None] | None = None,
) -> AsyncIterator[TransportStreams]:
    """`malformed(line, error)` says what becomes of a line that is no JSON-RPC message: an
    answer to write back (a `SessionMessage`) or an error for the session to read."""
    read_writer, read_stream = create_context_streams[SessionMessage | Exception](0)
    write_stream, write_reader = create_context_streams[SessionMessage](0)
    answers = write_stream.clone()

    async def reader() -> None:
        async with read_writer, answers:
            try:
                async for line in lines:
                    if (count := containers(line)) > MAX_CONTAINERS:
                        await answers.send(_invalid(too_many_containers(count)))
                        continue
                    try:
                        message = types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                    except ValidationError as e:
                        got = malformed(line, e)
                        if isinstance(got, SessionMessage):
                            await answers.send(got)
                        else:
                            await read_writer.send(got)
                        continue
                    if isinstance(message, types.JSONRPCNotification) and _has_id(line):
                        # A request whose id is no string or integer (1.5, null, true): the
                        # SDK's parser takes it for a notification, which is never answered.
                        await answers.send(_invalid("a request's id is a string or an integer"))
                        continue
                    if route is not None and route(message):
                        continue
                    await read_writer.send(SessionMessage(message))
            except LineTooLong as e:
                if on_too_long is not None:
                    on_too_long(e)
                await answers.send(_invalid(str(e)))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # the session stopped reading: the connection is ending

    async def writer() -> None:
        gone = False
        async with write_reader:
            async for message in write_reader:
                if gone:
                    continue  # drained, so the session never blocks on a peer that left
                try:
                    await write_message(out, message.message)
                except OSError:
                    gone = True

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(writer)
        yield read_stream, write_stream
