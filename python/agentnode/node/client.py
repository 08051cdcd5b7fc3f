"""A small synchronous client of the node API over its unix socket (what the CLI uses)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import select
import socket
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentnode.errors import AgentnodeError, UsageError
from agentnode.node.paths import DEFAULT_SOCKET
from agentnode.sdk.transport import UnixHTTPConnection

__all__ = ["NodeClient", "NodeNotRunning", "default_socket"]


class NodeNotRunning(AgentnodeError):
    """Nothing answers on the node's socket."""


def default_socket() -> Path:
    return Path(os.environ.get("AGENTNODE_SOCKET", DEFAULT_SOCKET))


class NodeClient:
    """Calls the node's admin API; raises AgentnodeError with the API's own message.

    `call` keeps one connection per thread open between calls (HTTP keep-alive): a new unix
    connection costs the client and the node more than a small request does. A connection the
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
            k.conn.close()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's kept connection (and whether it was used before), or a new one."""
        if os.getpid() != self._pid:  # a forked child must not talk over its parent's socket
            self._pid = os.getpid()
            self._kept = weakref.WeakSet()
            self._lock = threading.Lock()
            self._local = threading.local()
        kept: _Kept | None = getattr(self._local, "kept", None)
        if kept is None:
            kept = self._local.kept = _Kept(
                UnixHTTPConnection(str(self.path), timeout=self.timeout)
            )
            with self._lock:
                self._kept.add(kept)
            return kept.conn, False
        conn = kept.conn
        if conn.sock is not None and not _dropped(conn.sock):
            return conn, True
        conn.close()  # the next request opens it again
        return conn, False

    def _send(
        self, conn: http.client.HTTPConnection, method: str, url: str, body: Any
    ) -> http.client.HTTPResponse:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, url, payload, headers)
            return conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError):
            conn.close()
            raise NodeNotRunning(
                f"agentnode is not running at {self.path} (start it with 'sudo agentnode run')"
            ) from None
        except PermissionError:
            conn.close()
            raise NodeNotRunning(
                f"no permission to use {self.path} (run as root or join the agentnode group)"
            ) from None
        except BaseException:
            conn.close()
            raise

    def call(self, method: str, url: str, body: Any = None) -> Any:
        conn, reused = self._connection()
        try:
            resp = self._send(conn, method, url, body)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            # The node closed a kept connection as this request went out. It had not read
            # the request, but a node that died mid-request looks the same: only a request
            # that may be repeated is sent again.
            if not reused or method not in _IDEMPOTENT:
                raise AgentnodeError(
                    f"the node closed the connection during {method} {url}; it may or may not "
                    "have been applied (check with 'agentnode ps')"
                ) from None
            conn, _ = self._connection()
            resp = self._send(conn, method, url, body)
        raw = resp.read()
        if resp.status >= 400:
            raise _error(resp.status, raw, method, url)
        return json.loads(raw)

    def stream(self, url: str) -> Iterator[bytes]:
        """The response body as it arrives (logs -f, events), on a connection of its own."""
        conn = UnixHTTPConnection(str(self.path), timeout=self.timeout)
        with contextlib.closing(conn):
            resp = self._send(conn, "GET", url, None)
            if resp.status >= 400:
                raise _error(resp.status, resp.read(), "GET", url)
            while chunk := resp.read1(1 << 16):
                yield chunk


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

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: http.client.HTTPConnection) -> None:
        self.conn = conn

    def __del__(self) -> None:
        self.conn.close()


#: Methods whose repetition has the effect of one call.
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})


def _dropped(sock: socket.socket) -> bool:
    """Whether the peer closed an idle connection (it reads as EOF, or has stray bytes)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True
