"""One HTTP/1.1 request and its answer over a connected unix stream socket, for the CLI.

`http.client` would do, but it imports the `email` package (to parse headers) and `ssl`: about
15 ms of CPU, a quarter of what `agentnode ps` costs. The node's API is a small, known peer on a
local socket (no TLS, no proxies, no redirects), so what is needed is little: send the request,
read the status line and headers, and the body by Content-Length, chunked, or up to the close.
Streams (`logs -f`) still go through `http.client`, whose import is small next to a stream.
"""

from __future__ import annotations

import io
import socket

__all__ = ["IDEMPOTENT", "Closed", "exchange"]

#: Methods whose repetition has the effect of one call: only these are sent again after a
#: connection went under them.
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE"})

# Answers that never have a body (RFC 9112, section 6.3).
_NO_BODY = frozenset({204, 304})
# The longest status or header line read: the node's are a few dozen bytes.
_MAX_LINE = 65536


class Closed(ConnectionError):
    """The peer closed the connection before any of the answer arrived."""


def exchange(
    sock: socket.socket, method: str, target: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, bytes, bool]:
    """Sends one request on `sock` and reads its answer: the status, the body, and whether the
    connection may carry another request. OSError (TimeoutError included) when the socket
    fails; `Closed` when the peer closed it without answering; ValueError for an answer that
    is not HTTP/1.x."""
    head = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    if body is not None or method in ("POST", "PUT", "PATCH"):
        head.append(f"Content-Length: {len(body or b'')}")
    sock.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + (body or b""))
    with sock.makefile("rb") as f:
        status_line = f.readline(_MAX_LINE)
        if not status_line:
            raise Closed("the peer closed the connection without answering")
        version, _, rest = status_line.partition(b" ")
        if not version.startswith(b"HTTP/1.") or not rest[:3].isdigit():
            raise ValueError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
        status = int(rest[:3])
        fields: dict[bytes, bytes] = {}
        while (line := f.readline(_MAX_LINE)) not in (b"\r\n", b"\n"):
            if not line:
                raise ValueError("the answer ended inside its headers")
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip()
        keep = version != b"HTTP/1.0" and fields.get(b"connection", b"").lower() != b"close"
        if method == "HEAD" or status in _NO_BODY or status < 200:
            return status, b"", keep
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            return status, _chunks(f), keep
        length = fields.get(b"content-length")
        if length is None:
            return status, f.read(), False  # the body ends with the connection
        data = f.read(int(length))
        if len(data) != int(length):
            raise ValueError(f"the answer ended after {len(data)} of {int(length)} body bytes")
        return status, data, keep


def _chunks(f: io.BufferedReader) -> bytes:
    """A chunked body, joined (its trailer read and dropped); ValueError when it is cut off."""
    parts: list[bytes] = []
    while True:
        size = int(f.readline(_MAX_LINE).split(b";", 1)[0], 16)
        if size == 0:
            while f.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(parts)
        chunk = f.read(size)
        if len(chunk) != size or f.readline(_MAX_LINE) not in (b"\r\n", b"\n"):
            raise ValueError("the answer ended inside a chunk")
        parts.append(chunk)
