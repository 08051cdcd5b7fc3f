"""NodeClient's kept connections against a scripted unix-socket server (no node, no root)."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from agentnode.errors import AgentnodeError
from agentnode.node.client import NodeClient
from agentnode.unixsock import connect_unix, dropped, listen_unix

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


def answer_once(path: Path, reply: bytes) -> threading.Thread:
    """Answers one request with `reply` as it is, then closes the connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(reply)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize(
    "reply",
    [
        b'HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{"ok\r\n5;x=y\r\n": 1}\r\n0\r\n\r\n',
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"ok": 1}',  # ends at close
        b'HTTP/1.0 200 OK\r\nContent-Length: 9\r\n\r\n{"ok": 1}',
    ],
    ids=["chunked", "until-close", "http-1.0"],
)
def test_every_framing_of_an_answer_is_read_whole(tmp_path: Path, reply: bytes) -> None:
    sock = tmp_path / "api.sock"
    answer_once(sock, reply)
    with NodeClient(sock, timeout=5) as client:
        assert client.call("GET", "/healthz") == {"ok": 1}


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.x answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n{}", "ended after 2 of 20 body bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\n{}", "ended inside a chunk"),
        (b"HTTP/1.1 200 OK\r\nContent-Len", "ended inside its headers"),
    ],
    ids=["not-http", "short-body", "short-chunk", "short-headers"],
)
def test_an_answer_that_is_not_whole_http_is_one_clear_error(
    tmp_path: Path, reply: bytes, problem: str
) -> None:
    sock = tmp_path / "api.sock"
    answer_once(sock, reply)
    with NodeClient(sock, timeout=5) as client, pytest.raises(AgentnodeError) as e:
        client.call("GET", "/healthz")
    assert problem in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("length", [20, 200])
def test_a_socket_path_of_any_length_is_reached_and_a_missing_one_is_named(
    tmp_path: Path, length: int
) -> None:
    """Paths past the kernel's 107 bytes go through their directory's fd; a missing socket is
    the OS's error naming nothing else, and leaves no descriptor open."""
    path = tmp_path / ("d" * length) / "s.sock"
    listener = listen_unix(path, mode=0o600)
    with listener, connect_unix(path, timeout=5):
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ConnectionRefusedError):
        connect_unix(path, timeout=5)  # the file is there, nobody listens
    with pytest.raises(FileNotFoundError):
        connect_unix(path.with_name("missing.sock"), timeout=5)
    # None added (one of `before` may be closed meanwhile: an earlier test's object collected).
    assert set(os.listdir("/proc/self/fd")) <= before


def test_the_sdk_sends_on_a_new_connection_once_the_node_let_the_kept_one_go(
    tmp_path: Path,
) -> None:
    """A task's SDK keeps its connection to the node; the node restarting (or letting an idle
    one go) closes it. The next request, a POST too, goes on a new one; a connection that goes
    under a request is repeated only for a method that may be repeated."""
    from agentnode.errors import NodeUnreachable
    from agentnode.sdk.transport import UnixHTTPConnection, request

    sock = tmp_path / "task.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock))
    listener.listen()
    # What each connection does with its requests in turn: answer ("ok"), or close under
    # the request ("drop"); past its list, it is closed idle.
    connections = [["ok"], ["ok", "drop"], ["ok", "drop"]]

    def run() -> None:
        with listener:
            for actions in connections:
                conn, _ = listener.accept()
                with conn:
                    for action in actions:
                        request = b""
                        while not request.endswith(b"\r\n\r\n{}"):  # each sends "{}"
                            if not (chunk := conn.recv(65536)):
                                return
                            request += chunk
                        if action == "drop":
                            break
                        conn.sendall(OK)

    threading.Thread(target=run, daemon=True).start()
    conn = UnixHTTPConnection(str(sock), timeout=5)

    def send(method: str) -> bytes:
        return request(conn, method, "/v1/x", b"{}", {}, where="the node", what="x")

    assert send("POST") == b'{"ok": 1}\r\n'
    deadline = time.monotonic() + 5
    while conn.sock is not None and not dropped(conn.sock):  # the node lets it go, idle
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert send("POST") == b'{"ok": 1}\r\n', "sent on a new connection, not lost"
    assert send("GET") == b'{"ok": 1}\r\n', "went under the GET: repeated on a new one"
    with pytest.raises(NodeUnreachable, match="the node unreachable"):
        send("POST")  # went under the POST: it may have been applied, so not repeated
    conn.close()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nline\n\r\n9\r\nhal",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nline\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nline\n",
    ],
    ids=["inside-a-chunk", "between-chunks", "short-body"],
)
def test_a_stream_the_node_cuts_short_is_one_line(tmp_path: Path, reply: bytes) -> None:
    """The node stopping during `logs -f` or `agentnode agent` ends the stream mid-body: what
    came is given, then one line saying what happened (it was an internal error)."""
    sock = tmp_path / "api.sock"
    answer_once(sock, reply)
    got = []
    with (
        NodeClient(sock, timeout=5) as client,
        pytest.raises(AgentnodeError, match=r"the node closed GET /v1/x before its end"),
    ):
        for chunk in client.stream("/v1/x?follow=1"):
            got.append(chunk)
    assert b"".join(got).startswith(b"line\n")
