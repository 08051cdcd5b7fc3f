"""The memory HTTP API on loopback, through the SDK and raw HTTP: codecs, errors, tenancy."""

from __future__ import annotations

import http.client
import json
import os
import time
from urllib.parse import urlsplit

import msgpack
import pytest

from agentnode.errors import (
    AuthError,
    ConfigError,
    MemoryKeyError,
    NotFoundError,
    QuotaExceededError,
    TaskEndedError,
    ValueTooLargeError,
)
from agentnode.sdk import Memory, WorkingMemory


def raw(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, path, body, headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def test_sdk_episodic_roundtrip(memory_server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    monkeypatch.setenv("AGENTNODE_URL", url)
    monkeypatch.setenv("AGENTNODE_TOKEN", tokens["a"])
    with Memory() as mem:
        first = mem.append("notes", "t1", {"text": "hello"}, sync=True)
        ids = mem.append_many("notes", "t1", [{"value": i} for i in range(3)])
        assert [r["id"] for r in mem.scan("notes", "t1")] == [*reversed(ids), first]
        assert mem.get("notes", "t1", first)["value"] == {"text": "hello"}
        assert mem.tasks() == [("notes", "t1")]
        mem.delete("notes", "t1", first)
        with pytest.raises(NotFoundError):
            mem.get("notes", "t1", first)
        mem.end_task("notes", "t1", ttl=0.05)
        with pytest.raises(TaskEndedError):
            mem.append("notes", "t1", 1)
        time.sleep(0.1)
        with pytest.raises(NotFoundError, match="unknown task"):
            mem.scan("notes", "t1")


def test_sdk_objects_stream(memory_server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    data = os.urandom(300_000)  # over max_body: objects stream, they are not bodies
    (tmp_path / "f").write_bytes(data)
    with Memory(url, tokens["a"]) as mem, open(tmp_path / "f", "rb") as f:
        info = mem.put_object("weights.bin", f)
        assert info["size"] == len(data)
        assert b"".join(mem.get_object("weights.bin")) == data
        assert [o["name"] for o in mem.objects()] == ["weights.bin"]
        with pytest.raises(QuotaExceededError, match="quota"):
            mem.put_object("huge.bin", iter([b"x" * (1 << 19)] * 3))
        assert [o["name"] for o in mem.objects()] == ["weights.bin"]
        mem.delete_object("weights.bin")
        with pytest.raises(NotFoundError):
            mem.get_object("weights.bin")


def test_json_and_msgpack_codecs(memory_server) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    auth = {"Authorization": f"Bearer {tokens['a']}"}
    status, ctype, body = raw(
        url,
        "POST",
        "/v1/memory/episodic/ns/t",
        json.dumps({"value": [1, 2]}).encode(),
        {**auth, "Content-Type": "application/json"},
    )
    assert status == 201 and ctype.startswith("application/json")
    rid = json.loads(body)["ids"][0]
    status, ctype, body = raw(
        url,
        "GET",
        f"/v1/memory/episodic/ns/t/{rid}",
        headers={**auth, "Accept": "application/msgpack"},
    )
    assert status == 200 and ctype == "application/msgpack"
    assert msgpack.unpackb(body)["value"] == [1, 2]
    status, _, body = raw(
        url,
        "POST",
        "/v1/memory/episodic/ns/t",
        msgpack.packb({"value": b"\x00bin"}),
        {**auth, "Content-Type": "application/msgpack"},
    )
    assert status == 201


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("POST", "/v1/memory/episodic/ns/t", b"{not json", 400, "not valid JSON"),
        ("POST", "/v1/memory/episodic/ns/t", b'{"nope": 1}', 400, "'value'"),
        ("POST", "/v1/memory/episodic/bad%20ns/t", b'{"value": 1}', 400, "invalid namespace"),
        (
            "POST",
            "/v1/memory/episodic/ns/t",
            json.dumps({"value": "x" * 300_000}).encode(),
            413,
            "limit",
        ),
        ("GET", "/v1/memory/episodic/ns/t/nosuchid", None, 404, "no record"),
        ("GET", "/v1/memory/episodic/ns/t?limit=abc", None, 400, "not an integer"),
        ("POST", "/v1/memory/episodic/ns/t", b'{"value": 1, "sync": "no"}', 400, "'sync'"),
        ("POST", "/v1/memory/episodic/ns/t", b'{"value": 1, "ttl": "1h"}', 400, "invalid ttl"),
        ("POST", "/v1/memory/episodic/ns/t", b'{"records": []}', 400, "non-empty list"),
        ("GET", "/v1/objects/missing", None, 404, "no object"),
        ("GET", "/v1/memory/episodic/unknown-ns/t", None, 404, "unknown task"),
    ],
)
def test_bad_input_answers_json_error(memory_server, method, path, body, status, says) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    headers = {"Authorization": f"Bearer {tokens['a']}", "Content-Type": "application/json"}
    got, ctype, answer = raw(url, method, path, body, headers)
    assert got == status and ctype.startswith("application/json")
    assert says in json.loads(answer)["error"]


def test_value_over_record_limit_is_413(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from agentnode.storage.episodic import EpisodicStore

    with EpisodicStore(tmp_path / "db", max_value_bytes=10) as s, pytest.raises(ValueTooLargeError):
        s.append("a", "ns", "t", "more than ten bytes")


def test_tenancy_isolation(memory_server) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    with Memory(url, tokens["a"]) as a, Memory(url, tokens["b"]) as b:
        rid = a.append("shared-name", "t", "a's secret")
        a.put_object("doc", b"a's object")
        # Same namespace, task, id and object name: b reaches none of a's data.
        with pytest.raises(NotFoundError):
            b.get("shared-name", "t", rid)
        with pytest.raises(NotFoundError):
            b.scan("shared-name", "t")
        assert b.tasks() == []
        with pytest.raises(NotFoundError):
            b.delete("shared-name", "t", rid)
        with pytest.raises(NotFoundError):
            b.get_object("doc")
        with pytest.raises(NotFoundError):
            b.delete_object("doc")
        assert b.objects() == []
        b.append("shared-name", "t", "b's own", id=rid)  # writes land in b's space only
        b.put_object("doc", b"b's object")
        assert a.get("shared-name", "t", rid)["value"] == "a's secret"
        assert b"".join(a.get_object("doc")) == b"a's object"
    for token in ("", "Bearer wrong", "Basic " + tokens["a"], tokens["a"]):
        status, _, answer = raw(url, "GET", "/v1/memory/episodic", headers={"Authorization": token})
        assert status == 401 and "bearer token" in json.loads(answer)["error"]
    with Memory(url, "wrong") as bad, pytest.raises(AuthError):
        bad.tasks()


def test_sdk_config_errors(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("AGENTNODE_URL", raising=False)
    monkeypatch.delenv("AGENTNODE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="AGENTNODE_URL"):
        Memory()
    with pytest.raises(ConfigError, match="not an http"):
        Memory("ftp://x", "t")
    with Memory("http://127.0.0.1:9", "t") as mem, pytest.raises(Exception, match="unreachable"):
        mem.tasks()
    with pytest.raises(MemoryKeyError):
        from agentnode.storage.keys import check_name

        check_name("task", "a/b")


def test_working_memory_is_lru() -> None:
    wm = WorkingMemory(maxsize=2)
    wm.put("a", 1)
    wm.put("b", 2)
    assert wm.get("a") == 1  # a is now most recent
    wm.put("c", 3)
    assert "b" not in wm and wm.get("a") == 1 and len(wm) == 2
    with pytest.raises(ValueError):
        WorkingMemory(maxsize=0)


def test_cli_memory_serve(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import signal
    import subprocess
    import sys

    tenants = tmp_path / "tenants.json"
    token = f"cli-token-{os.getpid()}-0123456789"
    tenants.write_text(json.dumps({"a": {"token": token, "quota": 100}}))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentnode",
            "memory",
            "serve",
            "--data-dir",
            str(tmp_path / "d"),
            "--tenants",
            str(tenants),
            "--listen",
            "127.0.0.1:0",
            "--sweep-interval",
            "0.1",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("agentnode memory: listening on http://127.0.0.1:")
        with Memory(line.split()[-1], token) as mem:
            rid = mem.append("ns", "t", {"ok": True}, sync=True)
            assert mem.get("ns", "t", rid)["value"] == {"ok": True}
            with pytest.raises(QuotaExceededError):
                mem.put_object("big", b"x" * 101)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout is not None
        proc.stdout.close()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("{", "not valid JSON"),
        ("{}", "non-empty JSON object"),
        ('{"a": {"token": "short"}}', "at least 16 characters"),
        ('{"bad tenant": {"token": "0123456789abcdef"}}', "invalid tenant"),
        (
            '{"a": {"token": "0123456789abcdef"}, "b": {"token": "0123456789abcdef"}}',
            "share a token",
        ),
    ],
)
def test_cli_memory_serve_bad_config(tmp_path, content, says) -> None:  # type: ignore[no-untyped-def]
    from conftest import run_cli

    (tmp_path / "t.json").write_text(content)
    r = run_cli(
        ["memory", "serve", "--data-dir", str(tmp_path), "--tenants", str(tmp_path / "t.json")]
    )
    assert r.returncode == 1 and r.stderr.startswith("agentnode: error: ") and says in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli(
        ["memory", "serve", "--data-dir", str(tmp_path), "--tenants", "x", "--listen", "nope"]
    )
    assert r.returncode == 2 and "HOST:PORT" in r.stderr


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/memory/episodic/ns/t/abc%00def", 400),  # NUL would split the key
        ("GET", "/v1/memory/episodic/ns/t%00b/x", 400),
        ("GET", "/v1/memory/episodic/b%00ns/t/x", 400),  # a tenant boundary smuggled in
        ("GET", "/v1/objects/..%2F..%2Fetc%2Fpasswd", 400),
        ("PUT", "/v1/objects/..%2Fescape", 400),
        ("GET", "/v1/memory/episodic?prefix=%00", 200),  # a prefix only narrows a's own listing
    ],
)
def test_key_smuggling_is_refused(memory_server, method, path, status) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    with Memory(url, tokens["b"]) as b:
        b.append("ns", "t", "b's")
    got, _, body = raw(url, method, path, b"x", {"Authorization": f"Bearer {tokens['a']}"})
    assert got == status, body
    if got == 200:
        assert json.loads(body) == {"tasks": []}


def test_task_scoped_credential(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from agentnode.storage.api import make_app
    from agentnode.storage.tenancy import Principal
    from conftest import memory_stores, serve_app

    class PerTask:
        """What the layer 7 daemon will plug in: one token per task."""

        def authenticate(self, token: str) -> Principal | None:
            return {"tok-t1": Principal("a", "t1"), "tok-t2": Principal("a", "t2")}.get(token)

    with memory_stores(tmp_path) as (episodic, objects):
        app = make_app(episodic=episodic, objects=objects, auth=PerTask())
        with serve_app(app) as url, Memory(url, "tok-t1") as t1, Memory(url, "tok-t2") as t2:
            rid = t1.append("ns", "t1", "mine")
            t2.append("ns", "t2", "theirs")
            assert t1.get("ns", "t1", rid)["value"] == "mine"
            with pytest.raises(AuthError, match="limited to task 't2'"):
                t2.get("ns", "t1", rid)
            with pytest.raises(AuthError):
                t2.append("ns", "t1", "intrusion")
            with pytest.raises(AuthError):
                t2.end_task("ns", "t1", ttl=0)
            assert t1.tasks() == [("ns", "t1")]
            status, _, _ = raw(
                url,
                "GET",
                f"/v1/memory/episodic/ns/t1/{rid}",
                headers={"Authorization": "Bearer tok-t2"},
            )
            assert status == 403


def test_bad_record_in_batch_writes_nothing(memory_server) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    with Memory(url, tokens["a"]) as mem:
        with pytest.raises(MemoryKeyError, match="invalid record id"):
            mem.append_many("ns", "t", [{"value": 1}, {"value": 2, "id": "bad id"}])
        with pytest.raises(NotFoundError, match="unknown task"):
            mem.scan("ns", "t")
