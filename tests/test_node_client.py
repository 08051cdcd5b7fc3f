"""NodeClient's kept connections against a scripted unix-socket server (no node, no root)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from agentnode.errors import AgentnodeError
from agentnode.node.client import NodeClient

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok": 1}\r\n'


def serve(path: Path, script: list[str]) -> threading.Thread:
    """Answers requests in order: 'ok' with a keep-alive reply, 'drop' by closing the
    connection once the request has arrived (a node dying mid-request); each connection
    takes the next steps until it is dropped."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def run() -> None:
        steps = iter(script)
        with listener:
            for step in steps:
                conn, _ = listener.accept()
                with conn:
                    while True:
                        conn.recv(65536)  # one small request per read
                        if step == "drop":
                            break
                        conn.sendall(OK)
                        step = next(steps, "drop")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_request_cut_off_is_repeated_only_when_repeating_is_harmless(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    serve(sock, ["ok", "drop", "ok", "drop"])
    with NodeClient(sock, timeout=5) as client:
        assert client.call("GET", "/healthz") == {"ok": 1}
        # The kept connection dies under the GET: it is sent again on a new one.
        assert client.call("GET", "/healthz") == {"ok": 1}
        # ...and under a POST, which is not repeated: the error says what may have happened.
        with pytest.raises(AgentnodeError, match="may or may not have been applied"):
            client.call("POST", "/v1/tasks", {"command": ["true"]})
