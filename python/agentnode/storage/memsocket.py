"""The memory socket: the node's memory and checkpoint operations on a unix socket bound into
every task, served by an asyncio Protocol on the daemon's loop. It is the cheap door beside the
HTTP API (`storage.api`): the same operations (`storage.operations`, and the task's own
checkpoint from `node.api`), without HTTP's parsing, routing and headers around a request of a
few hundred bytes. The wire is `agentnode.sdk.memsocket`'s (length-prefixed msgpack frames
after a token line); `agentnode.sdk.Memory` and `ThisTask` take it when it is announced.

Tenancy is the HTTP API's: the token line names the caller, and the token is checked again at
every request (once its task's attempt ends, every request is refused), unless the door is told
its tokens never change while it serves (`tokens_fixed`: `agentnode memory serve`'s tenants
file, read once), where the token line's answer stands for the connection; the tenant comes
from the token alone. An answer goes out only once its operation is done (a write is in RocksDB's
log), so a returned put survives the death of the task or of the node, as over HTTP.

What one caller can hold of the daemon is bounded, so it cannot starve other tasks: the token
line must come within `HANDSHAKE_S` and be at most `MAX_TOKEN_LINE` bytes; a frame is at most
`max_frame` bytes (a longer one is answered with an error and the connection closed); a caller
(a task, or a tenant for tokens not pinned to a task) has at most `MAX_PER_CALLER` connections
open; a connection has at most `MAX_QUEUED` requests read ahead of its answers, and reading
stops while the client does not read its answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import msgpack

from agentnode.errors import AgentnodeError, AuthError, MemoryKeyError, StorageError
from agentnode.peercap import PeerCap, capped
from agentnode.sdk.memsocket import HANDSHAKE_OK, HEADER, MAX_FRAME, MAX_TOKEN_LINE
from agentnode.storage.operations import Operation, settle
from agentnode.storage.tenancy import Principal
from agentnode.unixsock import listen_unix

__all__ = ["HANDSHAKE_S", "MAX_PER_CALLER", "MAX_QUEUED", "MemorySocket"]

log = logging.getLogger("agentnode.storage.memsocket")

#: Seconds a new connection has to send its token line.
HANDSHAKE_S = 10.0
#: Connections one caller may have open at once (an agent needs one per thread).
MAX_PER_CALLER = 64
#: Requests a connection may have read ahead of their answers (pipelining), before reading
#: from it pauses.
MAX_QUEUED = 64

Authenticate = Callable[[str], Principal | None]


def _caller(who: Principal) -> str:
    return f"task:{who.task}" if who.task is not None else f"tenant:{who.tenant}"


class MemorySocket:
    """Serves `operations` (by name) at `path` in the running loop; `authenticate(token)`
    names the caller (None: refused). `tokens_fixed`: a token `authenticate` accepts stays
    valid while this door serves, so it is checked once per connection, not per request."""

    def __init__(
        self,
        operations: Mapping[str, Operation],
        authenticate: Authenticate,
        *,
        path: Path,
        max_frame: int = MAX_FRAME,
        max_per_caller: int = MAX_PER_CALLER,
        tokens_fixed: bool = False,
    ) -> None:
        self.path = path
        self.tokens_fixed = tokens_fixed
        self.operations = dict(operations)
        self.authenticate = authenticate
        self.max_frame = max_frame
        self.max_per_caller = max_per_caller
        self.per_caller: dict[str, int] = {}
        self.open: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        # Answers are packed on the loop's thread only: one Packer, not one per answer.
        self.packer = msgpack.Packer()

    @property
    def connections(self) -> int:
        """How many connections are open now."""
        return len(self.open)

    async def start(self) -> None:
        """Listens at `path` (a stale socket file there is replaced)."""
        listener = listen_unix(self.path)
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(
                capped(lambda: _Connection(self), PeerCap(f"memory socket {self.path}")),
                sock=listener,
            )
        except BaseException:
            listener.close()
            raise

    async def stop(self) -> None:
        """Stops listening and ends every connection (an operation under way runs to its
        end; its answer is lost with the connection)."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.open):
            conn.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _Connection(asyncio.Protocol):
    """One task's connection: the token line, then frames answered in order."""

    __slots__ = (
        "_buffer",
        "_busy",
        "_caller",
        "_closed",
        "_door",
        "_paused",
        "_queue",
        "_timer",
        "_token",
        "_transport",
        "_who",
        "_writable",
    )  # fmt: skip

    def __init__(self, door: MemorySocket) -> None:
        self._door = door
        self._buffer = bytearray()
        self._queue: collections.deque[bytes] = collections.deque()
        self._token: str | None = None
        self._who: Principal | None = None  # the token line's answer
        self._caller: str | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # an operation of this connection is awaited
        self._writable = True
        self._paused = False  # reading from the transport is paused
        self._closed = False

    # -- the transport's callbacks --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, though they are ones.
        self._transport = cast(asyncio.Transport, transport)
        self._door.open.add(self)
        self._timer = asyncio.get_running_loop().call_later(
            HANDSHAKE_S, self._refuse, f"no token line within {HANDSHAKE_S:g} s"
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
        self._door.open.discard(self)
        if self._caller is not None:
            left = self._door.per_caller.pop(self._caller) - 1
            if left > 0:
                self._door.per_caller[self._caller] = left
            self._caller = None

    def pause_writing(self) -> None:
        # The client does not read its answers: stop reading its requests until it does.
        self._writable = False
        if not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writable = True
        self._run()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._token is None and not self._greet():
            return
        max_frame = self._door.max_frame
        while len(buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer)
            if size > max_frame:
                self._reply(1, {"error": f"a request of {size} bytes is over the memory "
                                f"socket's {max_frame}-byte limit (send smaller batches, or "
                                "large data to /v1/objects)", "kind": "ValueTooLargeError"})  # fmt: skip
                self.close()
                return
            end = HEADER.size + size
            if len(buffer) < end:
                break
            with memoryview(buffer) as view:  # one copy of the frame, not two
                self._queue.append(bytes(view[HEADER.size : end]))
            del buffer[:end]
        self._run()

    # -- the token line -------------------------------------------------------------------------

    def _greet(self) -> bool:
        """Reads the token line; True once the connection is admitted."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_TOKEN_LINE:
                self._refuse(f"token line longer than {MAX_TOKEN_LINE} bytes")
            return False
        token = self._buffer[:end].strip().decode(errors="surrogateescape")
        del self._buffer[: end + 1]
        who = self._door.authenticate(token) if token else None
        if who is None:
            self._refuse("missing or unknown task token (send the task's token as the first line)")
            return False
        caller, door = _caller(who), self._door
        if door.per_caller.get(caller, 0) >= door.max_per_caller:
            self._refuse(f"{caller.replace(':', ' ')} has {door.max_per_caller} memory socket "
                         "connections open already (close one first)")  # fmt: skip
            return False
        door.per_caller[caller] = door.per_caller.get(caller, 0) + 1
        self._caller, self._token, self._who = caller, token, who
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        assert self._transport is not None
        self._transport.write(HANDSHAKE_OK)
        return True

    def _refuse(self, why: str) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(f"error: {why}\n".encode())
        self.close()

    # -- requests -------------------------------------------------------------------------------

    def _run(self) -> None:
        """Answers queued requests in order until one must be awaited, the client stops
        reading, or none is left."""
        assert self._transport is not None
        while self._queue and not self._busy and self._writable and not self._closed:
            try:
                answer = self._start(self._queue.popleft())
            except Exception as e:  # answered; logged when unexpected
                self._fail(e)
                continue
            if answer is not None:
                self._busy = True
                answer.add_done_callback(self._finished)
        if self._closed:
            return
        pause = len(self._queue) >= MAX_QUEUED or not self._writable
        if pause != self._paused:
            self._paused = pause
            if pause:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    def _start(self, frame: bytes) -> asyncio.Future[Any] | None:
        """Runs one request: answers it now, or returns the future of its answer; raises
        what the request is answered with when it fails at once."""
        try:
            request = _unpacked(frame)
        except _TooMany:
            raise MemoryKeyError(
                f"request holds over {MAX_CONTAINERS} arrays and maps: send less in one"
            ) from None
        except (msgpack.StackError, RecursionError):
            raise MemoryKeyError("request is nested too deeply") from None
        except (ValueError, msgpack.UnpackException) as e:
            raise MemoryKeyError(
                f"request is not valid msgpack ({e or type(e).__name__})"
            ) from None
        if not (isinstance(request, list) and len(request) == 2 and isinstance(request[1], dict)):
            raise MemoryKeyError("a request is [operation, {arguments}]")
        name, args = request
        op = self._door.operations.get(name) if isinstance(name, str) else None
        if op is None:
            known = ", ".join(sorted(self._door.operations))
            raise MemoryKeyError(f"unknown operation {name!r} (known: {known})")
        assert self._token is not None
        who = self._who if self._door.tokens_fixed else self._door.authenticate(self._token)
        if who is None:
            raise AuthError("this task's token is no longer valid (its attempt ended): "
                            "open a new connection with a current one")  # fmt: skip
        answer = op(who, args)
        if isinstance(answer, dict | list | None):
            self._reply(0, answer)
            return None
        return asyncio.ensure_future(settle(answer))

    def _finished(self, future: asyncio.Future[Any]) -> None:
        self._busy = False
        if self._closed:
            # The client left: the operation ran to its end all the same; nobody to answer.
            if not future.cancelled():
                future.exception()  # retrieved: not "never retrieved" noise
            return
        if future.cancelled():
            self._fail(StorageError("the node is stopping (send the request again)"))
        elif (e := future.exception()) is not None:
            self._fail(e)
        else:
            self._reply(0, future.result())
        self._run()

    def _fail(self, e: BaseException) -> None:
        if not isinstance(e, AgentnodeError):
            log.error("memory socket: an operation failed", exc_info=e)
            e = StorageError(f"internal error ({type(e).__name__}; the node's log has more)")
        self._reply(1, {"error": str(e), "kind": type(e).__name__})

    def _reply(self, status: int, answer: Any) -> None:
        if self._closed:
            return
        assert self._transport is not None
        try:
            payload = self._door.packer.pack([status, answer])
        except (OverflowError, TypeError, ValueError) as e:
            log.error("memory socket: cannot encode an answer: %s", e)
            payload = msgpack.packb([1, {"error": f"internal error (answer not encodable: {e})",
                                         "kind": "StorageError"}])  # fmt: skip
        self._transport.write(HEADER.pack(len(payload)) + payload)

    def close(self) -> None:
        """Closes the connection once what was written has gone out."""
        if self._transport is not None and not self._closed:
            self._closed = True
            self._transport.close()


#: The most arrays and maps one request may hold: each costs the node ~80 bytes and its loop
#: time to build, so a 4 MiB frame of empty arrays (one byte each) would hold 300 MiB.
MAX_CONTAINERS = 100_000


class _TooMany(Exception):
    pass


def _unpacked(frame: bytes) -> Any:
    """The request in `frame`, given up past `MAX_CONTAINERS` arrays and maps (msgpack hands
    each to a hook as it is built, so the count stops it early)."""
    built = 0

    def count(value: Any) -> Any:
        nonlocal built
        built += 1
        if built > MAX_CONTAINERS:
            raise _TooMany
        return value

    return msgpack.unpackb(frame, list_hook=count, object_hook=count)
