"""The memory socket (`storage.memsocket`, `sdk.memsocket`): the same episodic operations as the
HTTP API, its tenancy, and what a bad or dying client can and cannot do to it."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from agentnode.errors import (
    AuthError,
    MemoryKeyError,
    NotFoundError,
    StorageError,
    ValueTooLargeError,
)
from agentnode.sdk import Memory
from agentnode.sdk.memsocket import HEADER, MAX_FRAME, MAX_TOKEN_LINE, SocketClient
from agentnode.storage import memsocket
from agentnode.storage.operations import episodic_operations
from agentnode.storage.tenancy import Principal, StaticTokens
from conftest import memory_stores, serve_memory_socket


def _frame(payload: Any, *, raw: bytes | None = None) -> bytes:
    body = raw if raw is not None else msgpack.packb(payload)
    return HEADER.pack(len(body)) + body


def _connect(door: Any, token: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(door.path))
    sock.sendall(token.encode() + b"\n")
    return sock


def _line(sock: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        got += chunk
    return got


def _answer(sock: socket.socket) -> list[Any]:
    head = _exact(sock, HEADER.size)
    answer: list[Any] = msgpack.unpackb(_exact(sock, HEADER.unpack(head)[0]))
    return answer


def _exact(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        assert chunk, f"closed after {len(got)} of {n} bytes"
        got += chunk
    return got


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_the_socket_serves_the_http_apis_records(memory_doors) -> None:  # type: ignore[no-untyped-def]
    """Every episodic operation over the socket: what one door writes the other reads."""
    url, door, tokens = memory_doors
    with Memory(url, tokens["a"]) as http, Memory(url, tokens["a"], socket=str(door.path)) as sock:
        assert sock.over_socket and not http.over_socket
        rid = sock.append("notes", "t1", {"n": 1}, sync=True)
        assert http.get("notes", "t1", rid)["value"] == {"n": 1}
        ids = http.append_many("notes", "t1", [{"value": i, "id": f"r{i}"} for i in range(5)])
        assert [r["id"] for r in sock.scan("notes", "t1", newest_first=False)] == [rid, *ids]
        assert sock.scan("notes", "t1", limit=2) == http.scan("notes", "t1", limit=2)
        assert sock.get("notes", "t1", "r3")["value"] == 3
        sock.delete("notes", "t1", "r3")
        with pytest.raises(NotFoundError, match="no record 'r3'"):
            http.get("notes", "t1", "r3")
        with pytest.raises(NotFoundError):
            sock.delete("notes", "t1", "r3")
        assert sock.tasks() == http.tasks() == [("notes", "t1")]
        assert sock.end_task("notes", "t1", ttl=60) > time.time() * 1000
        with pytest.raises(StorageError, match="has ended"):
            sock.append("notes", "t1", {"late": True})
        with pytest.raises(MemoryKeyError, match="limit=0 is out of range"):
            sock.scan("notes", "t1", limit=0)
        with pytest.raises(StorageError, match=r"cannot send episodic\.append"):
            sock.append("notes", "t2", {1 << 70: "too big a key"})
        # The client's Packer, reused from request to request, kept nothing of the failed one.
        sock.append("notes", "t2", {"after": "the refusal"}, id="r4")
        assert http.get("notes", "t2", "r4")["value"] == {"after": "the refusal"}


def test_objects_and_vectors_need_the_http_url(memory_doors) -> None:  # type: ignore[no-untyped-def]
    _, door, tokens = memory_doors
    with Memory(token=tokens["a"], socket=str(door.path)) as sock:
        sock.append("n", "t", 1)
        with pytest.raises(Exception, match="objects and vectors are not on the memory socket"):
            sock.objects()


def test_a_task_finds_the_socket_in_its_environment(  # type: ignore[no-untyped-def]
    memory_doors, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, door, tokens = memory_doors
    monkeypatch.setenv("AGENTNODE_URL", url)
    monkeypatch.setenv("AGENTNODE_TOKEN", tokens["a"])
    monkeypatch.setenv("AGENTNODE_MEMORY_SOCKET", str(door.path))
    with Memory() as mem:
        assert mem.over_socket
    with Memory(url) as mem:
        assert not mem.over_socket, "an explicit URL is the HTTP API"
    monkeypatch.delenv("AGENTNODE_MEMORY_SOCKET")
    with Memory() as mem:
        assert not mem.over_socket


def test_no_tenant_reaches_another_tenants_records(memory_doors) -> None:  # type: ignore[no-untyped-def]
    """Tenant b, over the socket, by every operation and with a tenant named in the request:
    nothing of tenant a's."""
    url, door, tokens = memory_doors
    with Memory(url, tokens["a"], socket=str(door.path)) as a:
        a.append("secret", "t1", {"pin": 1234}, id="r1")
    with Memory(url, tokens["b"], socket=str(door.path)) as b:
        with pytest.raises(NotFoundError):
            b.get("secret", "t1", "r1")
        with pytest.raises(NotFoundError):
            b.delete("secret", "t1", "r1")
        with pytest.raises(NotFoundError, match="unknown task 't1'"):
            b.scan("secret", "t1")
        assert b.tasks() == []
        b.append("secret", "t1", {"pin": 0}, id="r1")  # b's own record of the same name
    sock = _connect(door, tokens["b"])
    assert _line(sock) == b"ok\n"
    for args in ({"tenant": "a"}, {"tenant": "a", "who": ["a"]}):
        sock.sendall(_frame(["episodic.get", {"namespace": "secret", "task": "t1", "id": "r1",
                                              **args}]))  # fmt: skip
        status, answer = _answer(sock)
        assert status == 0 and answer["value"] == {"pin": 0}, "b's own, whatever it names"
    sock.close()
    with Memory(url, tokens["a"]) as a:
        assert a.get("secret", "t1", "r1")["value"] == {"pin": 1234}, "a's untouched"


def test_a_credential_pinned_to_a_task_reaches_that_task_only(tmp_path: Path) -> None:
    pinned = {"tok-t1-0123456789": Principal("a", "t1")}
    with (
        memory_stores(tmp_path) as (episodic, _),
        serve_memory_socket(episodic_operations(episodic), _Tokens(pinned)) as door,
        Memory(token="tok-t1-0123456789", socket=str(door.path)) as mem,
    ):
        mem.append("n", "t1", 1)
        for call in (lambda: mem.append("n", "t2", 1), lambda: mem.get("n", "t2", "x"),
                     lambda: mem.scan("n", "t2"), lambda: mem.end_task("n", "t2", ttl=1)):  # fmt: skip
            with pytest.raises(AuthError, match="limited to task 't1'"):
                call()
        episodic.append("a", "n", "t2", {"other": True})
        assert mem.tasks() == [("n", "t1")], "the other task of its tenant is not listed"


class _Tokens:
    """An authenticator whose tokens can be revoked, as a task's are when its attempt ends."""

    def __init__(self, tokens: dict[str, Principal]) -> None:
        self.tokens = tokens

    def authenticate(self, token: str) -> Principal | None:
        return self.tokens.get(token)


def test_a_wrong_token_is_refused_with_a_line(memory_doors) -> None:  # type: ignore[no-untyped-def]
    url, door, _ = memory_doors
    for token in ("", "nope", "x" * 100, "tok-a\x00"):
        sock = _connect(door, token)
        assert _line(sock).startswith(b"error: missing or unknown task token")
        assert _closed(sock)
        sock.close()
    with (
        Memory(url, "not-a-token", socket=str(door.path)) as mem,
        pytest.raises(AuthError, match="refused the connection: missing or unknown"),
    ):
        mem.get("n", "t", "x")


def test_a_revoked_token_is_refused_at_its_next_request(tmp_path: Path) -> None:
    tokens = _Tokens({"tok-live-0123456789": Principal("a", "t1")})
    with (
        memory_stores(tmp_path) as (episodic, _),
        serve_memory_socket(episodic_operations(episodic), tokens) as door,
        Memory(token="tok-live-0123456789", socket=str(door.path)) as mem,
    ):
        mem.append("n", "t1", 1, id="r")
        del tokens.tokens["tok-live-0123456789"]  # its attempt ended
        with pytest.raises(AuthError, match="no longer valid"):
            mem.get("n", "t1", "r")


def test_fixed_tokens_are_checked_once_per_connection_for_their_own_caller(
    tmp_path: Path,
) -> None:
    checked: list[str] = []

    class Counted(_Tokens):
        def authenticate(self, token: str) -> Principal | None:
            checked.append(token)
            return super().authenticate(token)

    tokens = Counted({"tok-a-0123456789": Principal("a", "t1"), "tok-b-0123456789": Principal("b")})
    with (
        memory_stores(tmp_path) as (episodic, _),
        serve_memory_socket(episodic_operations(episodic), tokens, tokens_fixed=True) as door,
        Memory(token="tok-a-0123456789", socket=str(door.path)) as a,
        Memory(token="tok-b-0123456789", socket=str(door.path)) as b,
    ):
        for i in range(3):
            a.append("n", "t1", i, id=f"r{i}")
            b.append("n", "t1", -i, id=f"r{i}")
        assert sorted(checked) == ["tok-a-0123456789", "tok-b-0123456789"], "once each"
        # Each connection still acts for its own token's caller, pinned as it was.
        assert a.get("n", "t1", "r2")["value"] == 2 and b.get("n", "t1", "r2")["value"] == -2
        with pytest.raises(AuthError, match="limited to task 't1'"):
            a.get("n", "t2", "r2")
        sock = _connect(door, "tok-unknown-0123")
        assert _line(sock).startswith(b"error: missing or unknown task token"), "still checked"
        sock.close()


def test_bad_frames_get_an_error_and_the_connection_goes_on(memory_doors) -> None:  # type: ignore[no-untyped-def]
    _, door, tokens = memory_doors
    sock = _connect(door, tokens["a"])
    assert _line(sock) == b"ok\n"
    bad = {
        _frame(None, raw=b"\xc1"): "not valid msgpack",
        _frame(None, raw=b"\x92\xa1"): "not valid msgpack",
        _frame(None, raw=b"\x91\x01\x02"): "not valid msgpack",  # extra data
        _frame(None, raw=b"\xa3\xff\xfe\xfd"): "not valid msgpack",  # a str that is not UTF-8
        _frame(None, raw=b"\x81\x01\x02"): "not valid msgpack",  # a map keyed by an int
        _frame(None, raw=b"\x91" * 2000 + b"\xc0"): "nested too deeply",
        # Over 100,000 arrays or maps, three ways: each one byte, ~80 in the node.
        _frame(
            None, raw=b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x90" * (1 << 20)
        ): "over 100000 arrays and maps",
        _frame(
            None, raw=b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x80" * (1 << 20)
        ): "over 100000 arrays and maps",
        _frame(
            ["episodic.append", {"namespace": "n", "task": "t", "value": [[[]] * 3] * 40_000}]
        ): "over 100000 arrays",
        _frame("episodic.get"): "a request is [operation, {arguments}]",
        _frame(["episodic.get", ["n"]]): "a request is [operation, {arguments}]",
        _frame(["episodic.get", {}, 3]): "a request is [operation, {arguments}]",
        _frame(["rm -rf", {}]): "unknown operation 'rm -rf' (known: episodic.append",
        _frame([7, {}]): "unknown operation 7",
        _frame(["episodic.get", {"namespace": 1, "task": "t", "id": "x"}]): "'namespace' must",
        _frame(["episodic.get", {"namespace": "n", "task": "t"}]): "'id' must be a string",
        _frame(["episodic.get", {"namespace": "n:", "task": "t", "id": "x"}]): "namespace",
        _frame(["episodic.scan", {"namespace": "n", "task": "t", "limit": True}]): "'limit'",
        _frame(["episodic.append", {"namespace": "n", "task": "t"}]): "with a 'value'",
        _frame(["episodic.append", {"namespace": "n", "task": "t", "records": []}]): "non-empty",
        _frame(["episodic.append", {"namespace": "n", "task": "t", "value": 1, "id": 5}]): "id",
        _frame(["episodic.append", {"namespace": "n", "task": "t", "value": 1, "sync": 1}]): "sync",
        _frame(["episodic.end", {"namespace": "n", "task": "t", "ttl": "soon"}]): "'ttl'",
    }
    for frame, why in bad.items():
        sock.sendall(frame)
        status, answer = _answer(sock)
        assert status == 1 and why in answer["error"], (frame[:40], answer)
        assert "\n" not in answer["error"] and "Traceback" not in answer["error"]
    # Several at once, answered in order; the connection still serves.
    sock.sendall(_frame(["episodic.tasks", {}]) + _frame(None, raw=b"\xc1")
                 + _frame(["episodic.tasks", {"prefix": "n"}]))  # fmt: skip
    assert [_answer(sock)[0] for _ in range(3)] == [0, 1, 0]
    sock.close()


def test_an_oversized_frame_is_refused_and_the_connection_closed(tmp_path: Path) -> None:
    auth = StaticTokens({"tok-a-0123456789": "a"})
    with (
        memory_stores(tmp_path) as (episodic, _),
        serve_memory_socket(episodic_operations(episodic), auth, max_frame=1 << 16) as door,
    ):
        sock = _connect(door, "tok-a-0123456789")
        assert _line(sock) == b"ok\n"
        sock.sendall(HEADER.pack(1 << 30) + b"\x00" * 100)  # says 1 GiB: never buffered
        status, answer = _answer(sock)
        assert status == 1 and answer["kind"] == "ValueTooLargeError"
        assert (
            "request of 1073741824 bytes is over the memory socket's 65536-byte limit"
            in (answer["error"])
        )
        assert _closed(sock)
        sock.close()
        line = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        line.settimeout(10)
        line.connect(str(door.path))
        line.sendall(b"t" * (MAX_TOKEN_LINE + 10))  # a token line without its end
        assert _line(line).startswith(b"error: token line longer than 4096 bytes")
        assert _closed(line)
        line.close()
        with Memory(token="tok-a-0123456789", socket=str(door.path)) as mem:
            with pytest.raises(ValueTooLargeError, match="over the memory socket's"):
                mem.append("n", "t", "x" * MAX_FRAME)
            assert mem.tasks() == [], "refused before it was sent: the connection goes on"


def test_a_silent_connection_is_closed_after_the_handshake_time(  # type: ignore[no-untyped-def]
    memory_doors, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memsocket, "HANDSHAKE_S", 0.2)
    _, door, _ = memory_doors
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(door.path))
    assert _line(sock) == b"error: no token line within 0.2 s\n"
    assert _closed(sock)
    sock.close()
    deadline = time.monotonic() + 5
    while door.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert door.connections == 0


def test_a_caller_has_a_bounded_number_of_connections(tmp_path: Path) -> None:
    auth = StaticTokens({"tok-a-0123456789": "a", "tok-b-0123456789": "b"})
    with (
        memory_stores(tmp_path) as (episodic, _),
        serve_memory_socket(episodic_operations(episodic), auth, max_per_caller=3) as door,
    ):
        held = [_connect(door, "tok-a-0123456789") for _ in range(3)]
        assert all(_line(s) == b"ok\n" for s in held)
        extra = _connect(door, "tok-a-0123456789")
        assert _line(extra) == (
            b"error: tenant a has 3 memory socket connections open already (close one first)\n"
        )
        extra.close()
        other = _connect(door, "tok-b-0123456789")
        assert _line(other) == b"ok\n", "another tenant is not held up by a's connections"
        other.close()
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:
            again = _connect(door, "tok-a-0123456789")
            if _line(again) == b"ok\n":
                break
            again.close()
            assert time.monotonic() < deadline, "a closed connection frees its place"
            time.sleep(0.02)
        for s in (*held, again):
            s.close()


def test_a_client_dying_mid_request_leaves_the_socket_serving(  # type: ignore[no-untyped-def]
    memory_doors, caplog: pytest.LogCaptureFixture
) -> None:
    """Half a frame, a whole request not waited for, an fsynced write not waited for, a
    connection reset with answers unread: the requests sent whole are applied, nothing is
    logged as an error, and the socket serves on."""
    url, door, tokens = memory_doors
    put = ["episodic.append", {"namespace": "n", "task": "t", "value": "v", "id": "whole"}]
    synced = ["episodic.append", {"namespace": "n", "task": "t", "value": "s", "id": "synced",
                                  "sync": True}]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        half = _connect(door, tokens["a"])
        half.sendall(_frame(put)[:10])
        half.close()
        for request in (put, synced):
            gone = _connect(door, tokens["a"])
            gone.sendall(_frame(request))
            gone.close()
        reset = _connect(door, tokens["a"])
        reset.sendall(_frame(["episodic.scan", {"namespace": "n", "task": "t"}]) * 50)
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        reset.close()
        with Memory(url, tokens["a"], socket=str(door.path)) as mem:
            deadline = time.monotonic() + 5
            while {r["id"] for r in mem.scan("n", "t")} != {"whole", "synced"}:
                assert time.monotonic() < deadline, mem.scan("n", "t")
                time.sleep(0.02)
        deadline = time.monotonic() + 5
        while door.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert door.connections == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_pipelined_requests_are_answered_in_order(memory_doors) -> None:  # type: ignore[no-untyped-def]
    _, door, tokens = memory_doors
    client = SocketClient(str(door.path), tokens["a"])
    calls: list[tuple[str, dict[str, Any]]] = []
    for i in range(200):
        calls.append(("episodic.append", {"namespace": "p", "task": "t", "value": i,
                                          "id": f"r{i:03}"}))  # fmt: skip
        calls.append(("episodic.get", {"namespace": "p", "task": "t", "id": f"r{i:03}"}))
    calls.append(("episodic.get", {"namespace": "p", "task": "t", "id": "missing"}))
    answers = client.pipeline(calls)
    assert [a["value"] for a in answers[1:-1:2]] == list(range(200))
    assert isinstance(answers[-1], NotFoundError)
    # Large requests with large answers, far more than the socket's buffers hold: the client
    # reads answers while it sends, so neither side waits on the other for good.
    big = [("episodic.append", {"namespace": "p", "task": "t", "value": "x" * 100_000,
                                "id": f"big{i}"}) for i in range(150)]  # fmt: skip
    reads = [("episodic.get", {"namespace": "p", "task": "t", "id": f"big{i}"}) for i in range(150)]
    answers = client.pipeline([c for pair in zip(big, reads, strict=True) for c in pair])
    assert [len(a["value"]) for a in answers[1::2]] == [100_000] * 150
    client.close()


def test_a_client_not_reading_its_answers_is_paused_not_buffered(memory_doors) -> None:  # type: ignore[no-untyped-def]
    """Many requests for large answers sent before reading any: the node stops reading the
    connection while its answers wait, and every answer arrives, in order, once read."""
    url, door, tokens = memory_doors
    with Memory(url, tokens["a"], socket=str(door.path)) as mem:
        mem.append("big", "t", "x" * 200_000, id="r")
    sock = _connect(door, tokens["a"])
    assert _line(sock) == b"ok\n"
    requests = [_frame(["episodic.get", {"namespace": "big", "task": "t", "id": "r",
                                         "n": i}]) for i in range(400)]  # fmt: skip
    sender = threading.Thread(target=sock.sendall, args=(b"".join(requests),), daemon=True)
    sender.start()
    time.sleep(0.5)
    (conn,) = door.open
    queued = conn._transport.get_write_buffer_size()
    assert queued < 2 << 20, f"{queued} bytes of answers queued, of 80 MB asked for"
    for _ in requests:
        status, answer = _answer(sock)
        assert status == 0 and len(answer["value"]) == 200_000
    sender.join(10)
    sock.close()


def test_the_client_reconnects_when_the_node_restarts(tmp_path: Path) -> None:
    """The door stopped and started again at the same path (a node restart): the client's next
    request goes out on a new connection; while there is no node it says so."""
    auth = StaticTokens({"tok-a-0123456789": "a"})
    with memory_stores(tmp_path) as (episodic, _):
        with serve_memory_socket(episodic_operations(episodic), auth) as door:
            mem = Memory(token="tok-a-0123456789", socket=str(door.path))
            mem.append("n", "t", 1, id="before")
            _restart(door)
            assert mem.get("n", "t", "before")["value"] == 1
            mem.append("n", "t", 2, id="after")
            _restart(door)
            client = SocketClient(str(door.path), "tok-a-0123456789")
            assert client.pipeline([("episodic.tasks", {})] * 3) == [{"tasks": [["n", "t"]]}] * 3
            _restart(door)
            assert client.call("episodic.get", {"namespace": "n", "task": "t", "id": "after"})
            client.close()
        with pytest.raises(StorageError, match=r"unreachable .*is the node running"):
            mem.get("n", "t", "before")
        mem.close()


def _restart(door: Any) -> None:
    """Stops and starts `door` on its loop: its connections close, its path stays."""
    import asyncio

    loop = door._server.get_loop()
    asyncio.run_coroutine_threadsafe(door.stop(), loop).result(10)
    asyncio.run_coroutine_threadsafe(door.start(), loop).result(10)


#: Appends records over the memory socket, printing each id once its put returned, until the
#: node goes away.
WRITER = """
import os
from agentnode.sdk import Memory
mem, me, i = Memory(), os.environ["AGENTNODE_TASK_ID"], 0
print("socket", mem.over_socket, flush=True)
while True:
    try:
        mem.append_many("dur", me, [{"id": f"r{i:05}", "value": {"i": i, "pad": "x" * 2000}}])
    except Exception as e:
        print("stopped:", type(e).__name__, str(e).split(" (")[0], flush=True)
        break
    print(f"r{i:05}", flush=True)
    i += 1
"""


@pytest.mark.root
def test_a_returned_put_survives_kill_9_of_the_node(tmp_path: Path) -> None:
    """A task writing over the memory socket while the daemon is SIGKILLed: after the restart
    every record whose put had returned is there."""
    import json
    import signal
    import sys

    from agentnode.node.paths import ADMIN_MEMORY
    from agentnode.sdk.transport import UnixHTTPConnection
    from support.node_daemon import Daemon

    repo = Path(__file__).resolve().parents[1]
    d = Daemon(tmp_path)
    d.start()
    try:
        task = d.submit([sys.executable, "-c", WRITER], user="0", memory="128M", cpus=0.5,
                        ro=[str(repo)], env={"PYTHONPATH": str(repo / "python")})  # fmt: skip
        log = d.data / "logs" / f"{task['id']}.1.log"
        deadline = time.monotonic() + 60
        while not log.exists() or log.read_text().count("\nr") < 200:
            assert time.monotonic() < deadline, d.task(task["id"])
            time.sleep(0.05)
        d.stop(signal.SIGKILL)
        d.start()
        d.wait(task["id"], timeout=60)
        lines = log.read_text().splitlines()
        assert lines[0] == "socket True", lines[:3]
        assert lines[-1].startswith("stopped: StorageError memory socket"), lines[-3:]
        acknowledged = [line for line in lines if line.startswith("r")]
        conn = UnixHTTPConnection(str(d.socket), timeout=30)
        conn.request("GET", f"{ADMIN_MEMORY}/v1/memory/episodic/dur/{task['id']}?limit=10000"
                     "&order=oldest", headers={"Authorization": "Bearer tenant:default"})  # fmt: skip
        stored = [r["id"] for r in json.loads(conn.getresponse().read())["records"]]
        conn.close()
        assert len(acknowledged) >= 200 and stored[: len(acknowledged)] == acknowledged
    finally:
        if d.proc is not None:
            d.stop()
