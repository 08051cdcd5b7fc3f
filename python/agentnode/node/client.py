"""A small synchronous client of the node API over its unix socket (what the CLI uses)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from agentnode.errors import AgentnodeError, UsageError
from agentnode.node.paths import DEFAULT_SOCKET
from agentnode.node.unixhttp import IDEMPOTENT, Closed, exchange
from agentnode.unixsock import connect_unix, dropped

TYPE_CHECKING = False  # not typing's, which costs a command ~3 ms to import
if TYPE_CHECKING:
    from typing import Any

__all__ = ["NodeClient", "NodeNotRunning", "default_socket"]


class NodeNotRunning(AgentnodeError):
    """Nothing answers on the node's socket."""


def default_socket() -> Path:
    return Path(os.environ.get("AGENTNODE_SOCKET", DEFAULT_SOCKET))


class NodeClient:
    """Calls the node's admin API; raises AgentnodeError with the API's own message.

    `call` keeps one connection per thread open between calls (HTTP keep-alive): a new unix
    connection costs the client and the node more than a small request does. It speaks
    HTTP/1.1 itself (`unixhttp`): http.client's imports were a quarter of a command's time. A connection the
    node has closed (idle timeout, restart) is noticed before it is reused. Streams (`stream`)
    get a connection of their own. `close()` (or leaving a `with` block) closes the kept ones;
    a thread's connection also goes with the thread.
    """

    def __init__(self, path: Path | None = None, *, timeout: float | None = 30.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout
        self._local = threading.local()
        # Weak: a connection lives in its thread's local storage and ends with the thread.
        self._kept: weakref.WeakSet[_Kept] = weakref.WeakSet()
        self._lock = threading.Lock()  # over _kept, which a first call in a thread adds to
        self._pid = os.getpid()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connections kept by `call` (in every thread); a later call reconnects."""
        with self._lock:
            kept = list(self._kept)
        for k in kept:
            k.close()

    def _connection(self) -> tuple[_Kept, bool]:
        """This thread's kept connection (and whether it was used before), or a new one."""
        if os.getpid() != self._pid:  # a forked child must not talk over its parent's socket
            self._pid = os.getpid()
            self._kept = weakref.WeakSet()
            self._lock = threading.Lock()
            self._local = threading.local()
        kept: _Kept | None = getattr(self._local, "kept", None)
        if kept is None:
            kept = self._local.kept = _Kept()
            with self._lock:
                self._kept.add(kept)
            return kept, False
        if kept.sock is not None and not dropped(kept.sock):
            return kept, True
        kept.close()  # the next request opens it again
        return kept, False

    @contextlib.contextmanager
    def _reaching(self, close: Callable[[], None]) -> Iterator[None]:
        """Says what it means when the socket cannot be reached; `close`s on any error."""
        try:
            yield
        except (FileNotFoundError, ConnectionRefusedError):
            close()
            raise NodeNotRunning(
                f"agentnode is not running at {self.path} (start it with 'sudo agentnode run')"
            ) from None
        except PermissionError:
            close()
            raise NodeNotRunning(
                f"no permission to use {self.path} (run as root or join the agentnode group)"
            ) from None
        except BaseException:
            close()
            raise

    def _send(self, kept: _Kept, method: str, url: str, body: Any) -> tuple[int, bytes]:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        with self._reaching(kept.close):
            if kept.sock is None:
                kept.sock = connect_unix(self.path, timeout=self.timeout)
            status, data, keep = exchange(kept.sock, method, url, payload, headers)
        if not keep:
            kept.close()
        return status, data

    def call(self, method: str, url: str, body: Any = None) -> Any:
        """One request to the API; the answer's JSON. AgentnodeError with the node's message."""
        kept, reused = self._connection()
        try:
            status, raw = self._send(kept, method, url, body)
        except (Closed, ConnectionResetError, BrokenPipeError):
            # The node closed a kept connection as this request went out. It had not read
            # the request, but a node that died mid-request looks the same: only a request
            # that may be repeated is sent again.
            if not reused or method not in IDEMPOTENT:
                raise AgentnodeError(
                    f"the node closed the connection during {method} {url}; it may or may not "
                    "have been applied (check with 'agentnode ps')"
                ) from None
            kept, _ = self._connection()
            status, raw = self._send(kept, method, url, body)
        except ValueError as e:
            raise AgentnodeError(
                f"the node answered {method} {url.partition('?')[0]} with something that is not "
                f"HTTP ({e}; is the socket an agentnode API?)"
            ) from None
        if status >= 400:
            raise _error(status, raw, method, url)
        return json.loads(raw)

    def stream(self, url: str) -> Iterator[bytes]:
        """The response body as it arrives (logs -f, events), on a connection of its own."""
        from http.client import HTTPException

        from agentnode.sdk.transport import UnixHTTPConnection

        conn = UnixHTTPConnection(str(self.path), timeout=self.timeout)
        with contextlib.closing(conn), self._reaching(conn.close):
            conn.request("GET", url)
            resp = conn.getresponse()
            if resp.status >= 400:
                raise _error(resp.status, resp.read(), "GET", url)
            why = "its body cut short"
            try:
                while chunk := resp.read1(1 << 16):
                    yield chunk
                if not resp.length:  # a body of a length whose every byte came
                    return
            except (HTTPException, ConnectionError) as e:  # a chunked body cut short
                why = type(e).__name__
            raise AgentnodeError(
                f"the node closed GET {url.partition('?')[0]} before its end (it stopped or "
                f"restarted: {why}); its tasks run on, so ask again"
            )


def _error(status: int, body: bytes, method: str, url: str) -> AgentnodeError:
    """The node's own error (a `UsageError` for a request it found malformed), or, from
    something that is not this node's API, one line saying so."""
    try:
        message = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        message = None
    if not isinstance(message, str):
        return AgentnodeError(
            f"the node answered {method} {url.partition('?')[0]} with HTTP {status} and no "
            "error of its own (is the socket an agentnode API of this version?)"
        )
    return UsageError(message) if status in (400, 422) else AgentnodeError(message)


class _Kept:
    """A thread's kept connection, closed when the thread (and so its local storage) ends."""

    __slots__ = ("__weakref__", "sock")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None

    def close(self) -> None:
        """Closes the socket; the next request opens a new one."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __del__(self) -> None:
        self.close()
