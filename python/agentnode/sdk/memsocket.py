"""The memory socket's client: the cheap door from a task to the node's memory and checkpoints
(`agentnode.storage.memsocket` serves it; the node announces it in $AGENTNODE_MEMORY_SOCKET).

The wire: a connection opens with one line, the task's token; the node answers the line `ok`
or `error: WHY` (and closes). Then each request is a frame, a 4-byte big-endian length and that
many bytes of msgpack `[operation, {arguments}]`; the node answers every frame, in order, with
a frame `[0, answer]` or `[1, {"error": WHY, "kind": ERROR CLASS}]`. A client may send several
requests before reading their answers (`SocketClient.pipeline`).

The token line goes out with the first request, so a connection costs no round trip of its own.
A connection the node closed while idle (it restarted) is noticed before the next request and
opened again; one lost in the middle of a request is opened again and the request sent again
only when it is safe to repeat (`retry=True`: reads, and writes that replace what they name).
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from agentnode import errors
from agentnode.errors import AgentnodeError, StorageError
from agentnode.unixsock import connect_unix

__all__ = ["ENV", "HANDSHAKE_OK", "HEADER", "MAX_FRAME", "SocketClient", "error_of"]

#: The environment variable that announces the socket inside a task.
ENV = "AGENTNODE_MEMORY_SOCKET"
#: The length before each frame.
HEADER = struct.Struct(">I")
#: The longest frame either side sends by default (the HTTP memory API's body limit).
MAX_FRAME = 4 << 20
#: The node's answer to a good token line.
HANDSHAKE_OK = b"ok\n"
#: The longest token line the node reads (a task token is a few dozen bytes).
MAX_TOKEN_LINE = 4096
#: Requests of a pipeline sent ahead of their answers (the node reads up to 64 ahead), and
#: their bytes beyond the first (well within a unix socket's buffer).
_WINDOW, _WINDOW_BYTES = 32, 64 << 10


def error_of(problem: Any, *, base: type[AgentnodeError] = StorageError) -> AgentnodeError:
    """The exception an error answer names (`{"error", "kind"}`): the `agentnode.errors` class
    of that name when it is a `base`, else `base` itself."""
    if not isinstance(problem, dict):
        return base(f"the node answered an error that is not one: {problem!r}")
    cls = getattr(errors, str(problem.get("kind")), base)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        cls = base
    return cls(str(problem.get("error", "the node refused the request")))


class SocketClient:
    """One connection to the memory socket at `path`, authenticated by `token`; synchronous,
    one request at a time (one client per thread)."""

    def __init__(self, path: str, token: str, *, timeout: float | None = 30.0) -> None:
        self.path = path
        self._token = token.encode() + b"\n"
        self._timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: Any = None  # the socket's buffered reader (`socket.makefile("rb")`)
        self._greeted = False
        self._poll: select.poll | None = None
        # One Packer for the client's requests (msgpack.packb makes one per call), as the
        # client sends one request at a time.
        self._packer = msgpack.Packer()

    def call(self, op: str, args: Mapping[str, Any], *, retry: bool = False) -> Any:
        """The answer to one request; raises the error the node answered. `retry`: the
        request may be sent again on a new connection if this one breaks mid-request."""
        (answer,) = self._exchange([(op, args)], retry=retry, raise_first=True)
        return answer

    def pipeline(
        self, calls: Sequence[tuple[str, Mapping[str, Any]]], *, retry: bool = False
    ) -> list[Any]:
        """The answers to several requests sent at once (one round trip): each an answer or
        the `AgentnodeError` the node answered for that request."""
        return self._exchange(calls, retry=retry, raise_first=False)

    def _exchange(
        self, calls: Sequence[tuple[str, Mapping[str, Any]]], *, retry: bool, raise_first: bool
    ) -> list[Any]:
        frames = []
        for op, args in calls:
            try:
                payload = self._packer.pack([op, args])
            except (OverflowError, TypeError, ValueError) as e:
                raise StorageError(
                    f"cannot send {op}: {e} (numbers are within -2**63..2**64-1; values are "
                    "JSON-like: str, bytes, numbers, lists, dicts)"
                ) from None
            if len(payload) > MAX_FRAME:
                raise errors.ValueTooLargeError(
                    f"{op} request is {len(payload)} bytes, over the memory socket's "
                    f"{MAX_FRAME}-byte limit (send smaller batches, or large data as objects)"
                )
            frames.append(HEADER.pack(len(payload)) + payload)
        for attempt in (1, 2):
            self._check_idle()
            try:
                answers = self._send_and_read(frames)
                break
            except TimeoutError:
                self.close()
                raise StorageError(
                    f"memory socket {self.path}: no answer within {self._timeout} s (the node "
                    "is overloaded or stuck; the request may or may not have been applied)"
                ) from None
            except (OSError, EOFError) as e:
                self.close()
                if isinstance(e, FileNotFoundError | ConnectionRefusedError):
                    raise StorageError(
                        f"memory socket {self.path} unreachable ({e.strerror}; is the node "
                        "running?)"
                    ) from None
                if attempt == 2 or not retry:
                    raise StorageError(
                        f"memory socket {self.path}: connection lost mid-request ({e or 'EOF'}; "
                        "the node may have restarted, and the request may or may not have "
                        "been applied)"
                    ) from None
        results: list[Any] = []
        for ok, answer in answers:
            if ok:
                results.append(answer)
            elif raise_first:
                raise error_of(answer)
            else:
                results.append(error_of(answer))
        return results

    def _send_and_read(self, frames: list[bytes]) -> list[tuple[bool, Any]]:
        """Sends `frames` and reads their answers, at most `_WINDOW` requests and about
        `_WINDOW_BYTES` unanswered at a time: the node stops reading from a client that does
        not read its answers, so one that sent a long pipeline whole before reading could wait
        on the node while the node waits on it."""
        if self._sock is None:
            self._open()
        assert self._sock is not None
        answers: list[tuple[bool, Any]] = []
        sent = 0
        while len(answers) < len(frames):
            window: list[bytes] = []
            size = 0
            while (
                sent < len(frames)
                and sent - len(answers) < _WINDOW
                and (not window or size + len(frames[sent]) <= _WINDOW_BYTES)
            ):
                window.append(frames[sent])
                size += len(frames[sent])
                sent += 1
            if window:
                data = b"".join(window)
                self._sock.sendall(data if self._greeted else self._token + data)
                if not self._greeted:
                    self._greet()
            answers.append(self._answer())
        return answers

    def _check_idle(self) -> None:
        """Closes the connection if the node closed its end while it was idle (a restart):
        the next request then goes out on a new one, with nothing of it sent on the old.
        (Bytes no request asked for cannot come from a node speaking this protocol either.)"""
        if self._poll is not None and self._poll.poll(0):
            self.close()

    def _open(self) -> None:
        sock = connect_unix(self.path, timeout=self._timeout)
        self._sock, self._reader, self._greeted = sock, sock.makefile("rb"), False
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def _greet(self) -> None:
        line = self._reader.readline(MAX_TOKEN_LINE)
        if line == HANDSHAKE_OK:
            self._greeted = True
            return
        self.close()
        if not line:
            raise EOFError("the node closed the connection at its greeting")
        why = line.decode(errors="replace").strip().removeprefix("error: ")
        raise errors.AuthError(f"memory socket {self.path} refused the connection: {why}")

    def _answer(self) -> tuple[bool, Any]:
        head = self._reader.read(HEADER.size)
        if len(head) < HEADER.size:
            raise EOFError("the node closed the connection")
        (size,) = HEADER.unpack(head)
        body = self._reader.read(size)
        if len(body) < size:
            raise EOFError("the node closed the connection mid-answer")
        try:
            status, answer = msgpack.unpackb(body)
        except (ValueError, TypeError, msgpack.UnpackException) as e:
            self.close()
            raise StorageError(f"memory socket {self.path} sent a malformed answer ({e})") from None
        return status == 0, answer

    def close(self) -> None:
        """Closes the connection (the next request opens a new one)."""
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = self._poll = None
        self._greeted = False
