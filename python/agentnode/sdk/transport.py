"""HTTP over the node's unix sockets (http.client only: task code should stay light)."""

from __future__ import annotations

import http.client
import json
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from agentnode.errors import ConfigError, NodeUnreachable, TaskError
from agentnode.node.unixhttp import IDEMPOTENT
from agentnode.unixsock import connect_unix, dropped

if TYPE_CHECKING:
    import ssl

__all__ = ["UnixHTTPConnection", "connect", "error_message", "request", "tls_verify"]


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix stream socket at `path`."""

    def __init__(self, path: str, *, timeout: float | None = None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = connect_unix(self.path, timeout=self.timeout)


def connect(url: str, *, timeout: float | None) -> tuple[http.client.HTTPConnection, str]:
    """A connection for `http://host:port/base`, `unix:///path/to.sock` or
    `http+unix://%2Fpath%2Fto.sock/base` (the socket path percent-encoded), and the base path."""
    parts = urlsplit(url)
    if parts.scheme == "unix" and parts.path:
        return UnixHTTPConnection(parts.path, timeout=timeout), ""
    if parts.scheme == "http+unix" and parts.netloc:
        return UnixHTTPConnection(unquote(parts.netloc), timeout=timeout), parts.path.rstrip("/")
    if parts.scheme == "http" and parts.hostname:
        conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
        return conn, parts.path.rstrip("/")
    raise ConfigError(
        f"AGENTNODE_URL {url!r} is not an http://host:port, unix:///path or http+unix:// URL"
    )


def error_message(status: int, body: bytes) -> str:
    """The `error` of a node API error body, or what there is when it has none."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip() or f"HTTP {status}"


def request(
    conn: http.client.HTTPConnection,
    method: str,
    target: str,
    body: bytes | None,
    headers: dict[str, str],
    *,
    where: str,
    what: str,
) -> bytes:
    """One request on `conn`; the body of a 2xx/3xx answer. `NodeUnreachable` names `where`
    (the node's address) when it cannot be reached, `TaskError` `what` with the node's message
    when it answers an error. A kept-alive connection the node closed (it restarted, or let
    an idle one go) is opened again before the request goes."""
    if conn.sock is not None and dropped(conn.sock):
        conn.close()  # the node let it go (idle, or restarting): sent on a new one
    reused = conn.sock is not None
    try:
        conn.request(method, target, body, headers)
        resp = conn.getresponse()
        data = resp.read()
    except OSError as e:
        conn.close()
        # It went as the request went out: the node had not read it, but one that died
        # mid-request looks the same, so only a request that may be repeated is.
        if reused and method in IDEMPOTENT and isinstance(e, ConnectionError):
            return request(conn, method, target, body, headers, where=where, what=what)
        raise NodeUnreachable(f"{where} unreachable ({e})") from e
    if resp.status >= 400:
        raise TaskError(f"{what}: {error_message(resp.status, data)}")
    return data


def tls_verify(url: str) -> ssl.SSLContext | bool:
    """What an httpx client for `url` should verify with: for plain HTTP (the node's proxy and
    MCP endpoint are), a TLS context that trusts no certificate, which costs nothing to make;
    httpx's default loads the system's CA bundle (20-27 ms of CPU a client) for TLS such a
    client never speaks, and a redirect to https then fails its certificate check (fails
    closed). Anything else: True, httpx's own verification."""
    if not url.startswith("http://"):
        return True
    import ssl

    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
