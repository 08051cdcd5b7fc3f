"""A small synchronous client of the node API over its unix socket (what the CLI uses)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentnode.errors import AgentnodeError
from agentnode.node.config import DEFAULT_SOCKET
from agentnode.sdk.transport import UnixHTTPConnection, error_message

__all__ = ["NodeClient", "NodeNotRunning", "default_socket"]


class NodeNotRunning(AgentnodeError):
    """Nothing answers on the node's socket."""


def default_socket() -> Path:
    return Path(os.environ.get("AGENTNODE_SOCKET", DEFAULT_SOCKET))


class NodeClient:
    """Calls the node's admin API; raises AgentnodeError with the API's own message."""

    def __init__(self, path: Path | None = None, *, timeout: float | None = 30.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout

    def _open(
        self, method: str, url: str, body: Any = None
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = UnixHTTPConnection(str(self.path), timeout=self.timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, url, payload, headers)
            resp = conn.getresponse()
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
        if resp.status >= 400:
            raw = resp.read()
            conn.close()
            raise AgentnodeError(error_message(resp.status, raw))
        return conn, resp

    def call(self, method: str, url: str, body: Any = None) -> Any:
        conn, resp = self._open(method, url, body)
        with contextlib.closing(conn):
            return json.loads(resp.read())

    def stream(self, url: str) -> Iterator[bytes]:
        """The response body as it arrives (logs -f, events)."""
        conn, resp = self._open("GET", url)
        with contextlib.closing(conn):
            while chunk := resp.read1(1 << 16):
                yield chunk
