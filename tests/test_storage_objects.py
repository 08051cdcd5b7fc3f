"""The object store on a real filesystem: streaming, dedup, reference counts, GC, quotas, crashes."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentnode.errors import MemoryKeyError, NotFoundError, QuotaExceededError
from agentnode.storage.objects import ObjectStore


def blobs(root: Path) -> list[Path]:
    return [p for p in (root / "blobs").rglob("*") if p.is_file()]


def test_streaming_put_get_dedup_gc(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    chunks = [os.urandom(1 << 16) for _ in range(20)]
    info = store.put("a", "model.bin", iter(chunks))
    assert info.digest == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert info.size == 20 << 16
    assert b"".join(store.read("a", "model.bin")) == b"".join(chunks)
    assert store.put("a", "copy.bin", chunks).digest == info.digest
    assert len(blobs(tmp_path)) == 1  # content-addressed: stored once
    assert store.usage("a") == 2 * info.size
    store.delete("a", "model.bin")
    assert store.gc() == 0  # copy.bin still refers to it
    store.delete("a", "copy.bin")
    assert store.gc() == 1
    assert blobs(tmp_path) == []
    assert store.usage("a") == 0
    with pytest.raises(NotFoundError):
        store.read("a", "copy.bin")
    store.close()


def test_replace_and_list(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    store.put("a", "x", [b"one"])
    store.put("a", "x", [b"two!"])
    assert [i.to_wire()["size"] for i in store.list("a")] == [4]
    assert store.usage("a") == 4
    assert store.gc() == 1  # "one" lost its only reference
    assert b"".join(store.read("a", "x")) == b"two!"
    with pytest.raises(MemoryKeyError, match="invalid object name"):
        store.put("a", "../etc/passwd", [b"x"])
    store.close()


def test_quota_stops_upload_and_leaves_nothing(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path, quotas={"a": 1000})
    store.put("a", "small", [b"x" * 600])
    with pytest.raises(QuotaExceededError, match="quota of 1000 bytes"):
        store.put("a", "big", [b"y" * 300, b"y" * 300])
    assert [i.name for i in store.list("a")] == ["small"]
    assert list((tmp_path / "tmp").iterdir()) == []
    assert store.usage("a") == 600
    with pytest.raises(QuotaExceededError):  # the very first chunk already too big
        store.put("a", "huge", [b"y" * 2000])
    store.put("a", "small", [b"z" * 1000])  # replacing frees the old size first
    store.put("b", "other", [b"x" * 5000])  # quotas are per tenant
    store.close()


def test_tenants_see_only_their_references(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    store.put("a", "secret", [b"a's data"])
    with pytest.raises(NotFoundError):
        store.read("b", "secret")
    with pytest.raises(NotFoundError):
        store.delete("b", "secret")
    assert store.list("b") == []
    store.close()


WRITER = """
import sys, itertools
from agentnode.storage.objects import ObjectStore
store = ObjectStore(sys.argv[1])
def chunks():
    for i in itertools.count():
        if i == 4:
            print("writing", flush=True)
        yield bytes([i % 256]) * 65536
store.put("a", "partial", chunks())
"""


def test_crash_mid_write_leaves_no_partial_object(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    store.put("a", "kept", [b"before the crash"])
    store.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
        time.sleep(0.1)
        assert list((tmp_path / "tmp").iterdir())  # an upload is in flight
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    store = ObjectStore(tmp_path)
    assert list((tmp_path / "tmp").iterdir()) == []
    with pytest.raises(NotFoundError):
        store.stat("a", "partial")
    assert [b.name for b in blobs(tmp_path)] == [hashlib.sha256(b"before the crash").hexdigest()]
    assert b"".join(store.read("a", "kept")) == b"before the crash"
    store.close()
