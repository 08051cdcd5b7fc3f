"""The memory HTTP API on loopback, through the SDK and raw HTTP: codecs, errors, tenancy."""

from __future__ import annotations

import http.client
import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

import msgpack
import pytest

from agentnode.errors import (
    AuthError,
    CollectionExistsError,
    ConfigError,
    MemoryKeyError,
    NotFoundError,
    QuotaExceededError,
    TaskEndedError,
    ValueTooLargeError,
)
from agentnode.sdk import Memory, WorkingMemory
from agentnode.storage.tenancy import Principal
from conftest import memory_api


def raw(
    url: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    parts = urlsplit(url)
    assert parts.hostname is not None, url
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
        # Not numbers, or numbers no expiry time can hold: 400 naming ttl, never a 500.
        ("POST", "/v1/memory/episodic/ns/t", b'{"value": 1, "ttl": Infinity}', 400, "Infinity"),
        ("POST", "/v1/memory/episodic/ns/t", b'{"value": 1, "ttl": NaN}', 400, "NaN"),
        ("POST", "/v1/memory/episodic/ns/t", b'{"value": 1, "ttl": 1e308}', 400, "invalid ttl"),
        ("POST", "/v1/memory/episodic/ns/t", b'{"value": 1, "ttl": 0}', 400, "invalid ttl"),
        ("POST", "/v1/memory/episodic/ns/t", b'{"value": 1, "ttl": true}', 400, "invalid ttl"),
        ("POST", "/v1/memory/episodic/ns/t/end", b'{"ttl": 1e308}', 400, "invalid ttl"),
        ("POST", "/v1/memory/episodic/ns/t/end", b'{"ttl": -1}', 400, "invalid ttl"),
        ("POST", "/v1/memory/episodic/ns/t/end", b'{"ttl": -Infinity}', 400, "Infinity"),
        ("POST", "/v1/memory/episodic/ns/t", b"[" * 100_000, 400, "nested too deeply"),
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


class PerTask:
    """What the daemon plugs in: one token per task, pinned to it (tasks t1, t2 of tenant a)."""

    def authenticate(self, token: str) -> Principal | None:
        return {"tok-t1": Principal("a", "t1"), "tok-t2": Principal("a", "t2")}.get(token)


def test_task_scoped_credential(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with (
        memory_api(tmp_path, PerTask()) as url,
        Memory(url, "tok-t1") as t1,
        Memory(url, "tok-t2") as t2,
    ):
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


# -- vectors ------------------------------------------------------------------------------------

V = "/v1/memory/vectors"


def call(
    url: str, token: str, method: str, path: str, body: object = None, *, codec: str = "json"
) -> tuple[int, Any]:
    """One request in JSON or msgpack (body and answer); errors are always JSON."""
    mime = "application/msgpack" if codec == "msgpack" else "application/json"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": mime, "Accept": mime}
    data = (
        None
        if body is None
        else (msgpack.packb(body) if codec == "msgpack" else json.dumps(body).encode())
    )
    status, ctype, answer = raw(url, method, path, data, headers)
    if not answer:
        return status, None
    return status, msgpack.unpackb(answer) if ctype == "application/msgpack" else json.loads(answer)


@pytest.mark.parametrize("codec", ["json", "msgpack"])
def test_vectors_round_trip(memory_server, codec) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server

    def c(method: str, path: str, body: object = None) -> tuple[int, Any]:
        return call(url, tokens["a"], method, path, body, codec=codec)

    config = {"dims": 3, "metric": "l2", "dtype": "f32"}
    assert c("PUT", f"{V}/docs", config) == (201, {"name": "docs", **config})
    assert c("PUT", f"{V}/docs", config) == (200, {"name": "docs", **config}), "idempotent"
    status, answer = c("PUT", f"{V}/docs", {"dims": 4})
    assert status == 409 and "dims=3, metric='l2'" in answer["error"]
    items = [
        {"key": 1, "vector": [1, 0, 0], "metadata": {"title": "x"}, "namespace": "kb"},
        {"key": 2, "vector": [0, 1, 0], "namespace": "kb", "task": "t9"},
        {"key": 2**64 - 2, "vector": [0.0, 0.0, 1.0]},
    ]
    assert c("POST", f"{V}/docs/upsert", {"items": items}) == (200, {"upserted": 3})
    status, answer = c(
        "POST", f"{V}/docs/search", {"vector": [0.9, 0.1, 0], "k": 2, "with_metadata": True}
    )
    assert status == 200
    assert [(h["key"], h.get("metadata")) for h in answer["matches"]] == [
        (1, {"title": "x"}),
        (2, {}),
    ]
    assert answer["matches"][0]["distance"] == pytest.approx(0.02, abs=1e-5)
    assert c("GET", f"{V}/docs/{2**64 - 2}") == (
        200,
        {"key": 2**64 - 2, "vector": [0.0, 0.0, 1.0], "namespace": "", "task": "", "metadata": {}},
    )
    assert c("GET", f"{V}/") == (200, {"collections": ["docs"]})
    assert c("DELETE", f"{V}/docs/1") == (204, None)
    assert c("GET", f"{V}/docs/1")[0] == 404
    assert c("DELETE", f"{V}/docs/1")[0] == 404
    assert c("DELETE", f"{V}/docs") == (204, None)
    assert c("GET", f"{V}/") == (200, {"collections": []})
    status, answer = c("POST", f"{V}/docs/search", {"vector": [1, 0, 0]})
    assert status == 404 and f"PUT {V}/docs" in answer["error"]


def test_vector_batches_and_filters_through_sdk(memory_server) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    from agentnode.errors import CollectionExistsError, UnknownCollectionError

    url, tokens = memory_server
    with Memory(url, tokens["a"]) as mem:
        assert mem.create_collection("kb", dims=4, dtype="f16")["dtype"] == "f16"
        with pytest.raises(CollectionExistsError, match="dims=4"):
            mem.create_collection("kb", dims=8)
        rows = np.eye(4, dtype=np.float32)
        items = [
            {
                "key": k,
                "vector": rows[k],
                "namespace": f"ns{k % 2}",
                "task": f"t{k}",
                "metadata": {"k": k},
            }
            for k in range(4)
        ]
        assert mem.upsert("kb", items) == 4
        assert {h["key"] for h in mem.search("kb", rows[0], 4, namespace="ns1")} == {1, 3}
        assert [h["key"] for h in mem.search("kb", rows[0], 4, task="t2")] == [2]
        assert {h["key"] for h in mem.search("kb", rows[0], 4, keys=[0, 3])} == {0, 3}
        found = mem.search_batch("kb", rows, 1, with_metadata=True)
        assert [[(h["key"], h["metadata"]) for h in hits] for hits in found] == [
            [(k, {"k": k})] for k in range(4)
        ]
        assert [len(h) for h in mem.search_batch("kb", rows[:2], 4, namespace="ns0")] == [2, 2]
        got = mem.get_vector("kb", 3)
        assert (got["vector"], got["task"], got["metadata"]) == (
            [0.0, 0.0, 0.0, 1.0],
            "t3",
            {"k": 3},
        )
        mem.delete_vector("kb", 3)
        with pytest.raises(NotFoundError, match="key 3"):
            mem.get_vector("kb", 3)
        assert mem.collections() == ["kb"]
        mem.drop_collection("kb")
        with pytest.raises(UnknownCollectionError, match="create it"):
            mem.search("kb", rows[0])


def test_vector_collections_are_per_tenant(memory_server) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    a, b = tokens["a"], tokens["b"]
    assert call(url, a, "PUT", f"{V}/docs", {"dims": 2})[0] == 201
    item = {"key": 7, "vector": [1, 0], "metadata": {"secret": "a's"}}
    assert call(url, a, "POST", f"{V}/docs/upsert", {"items": [item]})[0] == 200
    assert call(url, b, "GET", f"{V}/") == (200, {"collections": []})
    for method, path, body in [
        ("POST", f"{V}/docs/search", {"vector": [1, 0]}),
        ("POST", f"{V}/docs/search", {"vectors": [[1, 0]]}),
        ("POST", f"{V}/docs/upsert", {"items": [{**item, "metadata": {"secret": "b's"}}]}),
        ("GET", f"{V}/docs/7", None),
        ("DELETE", f"{V}/docs/7", None),
        ("DELETE", f"{V}/docs", None),
    ]:
        status, answer = call(url, b, method, path, body)
        assert status == 404 and "no vector collection 'docs'" in answer["error"], (method, path)
    # b's own "docs" is another collection: other dims, and a's vectors stay out of its results.
    assert call(url, b, "PUT", f"{V}/docs", {"dims": 3})[0] == 201
    assert call(url, b, "POST", f"{V}/docs/search", {"vector": [1, 0, 0]}) == (200, {"matches": []})
    assert call(url, b, "GET", f"{V}/") == (200, {"collections": ["docs"]})
    status, answer = call(url, a, "GET", f"{V}/docs/7")
    assert status == 200 and answer["metadata"] == {"secret": "a's"}
    assert call(url, a, "GET", f"{V}/") == (200, {"collections": ["docs"]})
    status, answer = call(
        url, a, "POST", f"{V}/docs/search", {"vector": [1, 0], "filter": {"tenant": "b"}}
    )
    assert status == 400 and "'tenant'" in answer["error"]


def test_vector_writes_of_a_task_token(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with (
        memory_api(tmp_path, PerTask()) as url,
        Memory(url, "tok-t1") as t1,
        Memory(url, "tok-t2") as t2,
    ):
        t1.create_collection("shared", dims=2)
        t1.upsert("shared", [{"key": 1, "vector": [1, 0]}])
        assert t1.get_vector("shared", 1)["task"] == "t1", "labelled with its own task"
        # Reads span the tenant; writes touch only the task's own records.
        assert [h["key"] for h in t2.search("shared", [1, 0])] == [1]
        assert t2.get_vector("shared", 1)["vector"] == [1.0, 0.0]
        with pytest.raises(AuthError, match=r"items\[0\].task: this credential is limited"):
            t2.upsert("shared", [{"key": 2, "vector": [0, 1], "task": "t1"}])
        with pytest.raises(AuthError, match="key 1 holds a record of task 't1'"):
            t2.upsert("shared", [{"key": 2, "vector": [0, 1]}, {"key": 1, "vector": [0, 1]}])
        with pytest.raises(AuthError, match="key 1 holds"):
            t2.delete_vector("shared", 1)
        assert 2 not in {h["key"] for h in t1.search("shared", [0, 1])}, "nothing written"
        assert t1.get_vector("shared", 1)["vector"] == [1.0, 0.0]
        t2.upsert("shared", [{"key": 2, "vector": [0, 1]}])
        t2.delete_vector("shared", 2)
        # A collection holds every task's records: no task's token deletes it, its maker's
        # neither (nor makes it anew otherwise).
        for t in (t1, t2):
            with pytest.raises(AuthError, match=r"limited to task 't\d': it cannot delete"):
                t.drop_collection("shared")
        with pytest.raises(CollectionExistsError, match="exists with dims=2"):
            t2.create_collection("shared", dims=3)
        assert t2.get_vector("shared", 1)["task"] == "t1"
        t1.delete_vector("shared", 1)


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/bad%20name", {"dims": 2}, "bad collection name"),
        (f"/{'x' * 40}", {"dims": 2}, "bad collection name"),
        ("/new", {}, "dims is missing"),
        ("/new", {"dims": 0}, "dims must be an integer from 1 to 65536"),
        ("/new", {"dims": "2"}, "dims must be an integer from 1 to 65536"),
        ("/new", {"dims": 2, "metric": "cosine"}, "unknown metric"),
        ("/new", {"dims": 2, "metric": None}, "metric must be a string"),
        ("/new", {"dims": 2, "dtype": "f64"}, "unknown dtype"),
        ("/new", {"dims": 2, "metric": "l2", "dtype": "i8+f32"}, "i8+f32 needs metric cos"),
        ("/new", {"dims": 2, "size": 9}, "unknown fields 'size'"),
        ("/c/upsert", {"items": []}, "items must be a non-empty list"),
        ("/c/upsert", {"items": [{"key": -1, "vector": [1, 0]}]}, "items[0].key: bad key -1"),
        ("/c/upsert", {"items": [{"vector": [1, 0]}]}, "items[0].key: bad key None"),
        (
            "/c/upsert",
            {"items": [{"key": 1, "vector": [1, 0]}, {"key": 2, "vector": [1, 0, 0]}]},
            "items[1].vector has 3 dimensions but the collection has 2",
        ),
        (
            "/c/upsert",
            {"items": [{"key": 1, "vector": ["a", 0]}]},
            "items[0].vector must be a list",
        ),
        (
            "/c/upsert",
            {"items": [{"key": 1, "vector": [1e40, 0]}]},
            "items: vector for key 1 has a NaN",
        ),
        ("/c/upsert", {"items": [{"key": 1, "vector": [1, 0]}] * 2}, "items: batch repeats a key"),
        (
            "/c/upsert",
            {"items": [{"key": 1, "vector": [1, 0], "metadata": [1]}]},
            "items[0].metadata must be an object",
        ),
        (
            "/c/upsert",
            {"items": [{"key": 1, "vector": [1, 0], "namespace": 5}]},
            "items[0].namespace must be a string",
        ),
        (
            "/c/upsert",
            {"items": [{"key": 1, "vector": [1, 0], "ttl": 5}]},
            "items[0] has unknown fields 'ttl'",
        ),
        ("/c/search", {"vector": [1, 0, 0]}, "vector has 3 dimensions"),
        ("/c/search", {"vector": "1,0"}, "vector must be a list of 2 numbers"),
        ("/c/search", {"vectors": [[1, 0], [1]]}, "vectors[1] has 1 dimensions"),
        ("/c/search", {"vector": [1, 0], "vectors": [[1, 0]]}, "either vector"),
        ("/c/search", {}, "either vector"),
        ("/c/search", {"vector": [1, 0], "k": 0}, "k must be an integer from 1"),
        ("/c/search", {"vector": [1, 0], "k": True}, "k must be an integer from 1"),
        ("/c/search", {"vector": [1, 0], "with_metadata": "yes"}, "with_metadata must be"),
        ("/c/search", {"vector": [1, 0], "filter": {"keys": [-5]}}, "filter.keys: bad key -5"),
        ("/c/search", {"vector": [1, 0], "filter": {"task": 3}}, "filter.task must be a string"),
        (
            "/c/search",
            {"vectors": [[1, 0]], "filter": {"keys": [1]}},
            "filter.keys works with vector only",
        ),
        ("/c/search", [1, 0], "body must be an object"),
        ("/d", {"dims": 2**66}, "dims must be an integer from 1 to 65536"),
        ("/d", {"dims": 2**64 - 1}, "dims must be an integer from 1 to 65536"),
        ("/d", {"dims": 1e308}, "dims must be an integer"),
        ("/d", {"dims": -1}, "dims must be an integer"),
    ],
)
def test_vector_bad_input_names_the_field(memory_server, path, body, says) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    assert call(url, tokens["a"], "PUT", f"{V}/c", {"dims": 2})[0] in (200, 201)
    method = "PUT" if path.count("/") == 1 else "POST"
    status, answer = call(url, tokens["a"], method, V + path, body)
    assert status == 400 and says in answer["error"], answer
    assert call(url, tokens["a"], "POST", f"{V}/c/search", {"vector": [1, 0]}) == (
        200,
        {"matches": []},
    )


def test_vector_bad_key_and_msgpack_metadata(memory_server) -> None:  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    a = tokens["a"]
    call(url, a, "PUT", f"{V}/c", {"dims": 2})
    for key in ("abc", "-1", str(2**64)):
        status, answer = call(url, a, "GET", f"{V}/c/{key}")
        assert status == 400 and answer["error"].startswith("key: "), key
    item = {"key": 1, "vector": [1, 0], "metadata": {"blob": b"\x00"}}  # bytes have no JSON form
    status, answer = call(url, a, "POST", f"{V}/c/upsert", {"items": [item]}, codec="msgpack")
    assert status == 400 and "metadata of key 1 cannot be stored as JSON" in answer["error"]
    assert call(url, a, "GET", f"{V}/c/1")[0] == 404
