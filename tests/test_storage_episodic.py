"""The episodic store on a real RocksDB: writes, reads, scans, expiry and the sweep."""

from __future__ import annotations

import time

import pytest

from agentnode.errors import MemoryKeyError, NotFoundError, TaskEndedError, ValueTooLargeError
from agentnode.storage.episodic import EpisodicStore, NewRecord


def stored_keys(store: EpisodicStore, prefix: bytes) -> list[bytes]:
    """Every raw key under `prefix`: proof that the sweep reclaimed space, not just hid it."""
    return [k for k, _ in store._db.items() if isinstance(k, bytes) and k.startswith(prefix)]


@pytest.fixture
def store(tmp_path):  # type: ignore[no-untyped-def]
    s = EpisodicStore(tmp_path / "db", bucket_ms=50, max_value_bytes=4096)
    yield s
    s.close()


def test_append_get_scan_delete(store: EpisodicStore) -> None:
    ids = [store.append("t", "ns:a", "task1", {"i": i}) for i in range(5)]
    assert ids == sorted(ids)
    assert store.get("t", "ns:a", "task1", ids[2]).value == {"i": 2}
    newest = store.scan("t", "ns:a", "task1")
    assert [r.value["i"] for r in newest] == [4, 3, 2, 1, 0]
    oldest = store.scan("t", "ns:a", "task1", newest_first=False, limit=2)
    assert [r.value["i"] for r in oldest] == [0, 1]
    store.delete("t", "ns:a", "task1", ids[0])
    with pytest.raises(NotFoundError):
        store.get("t", "ns:a", "task1", ids[0])
    with pytest.raises(NotFoundError):
        store.delete("t", "ns:a", "task1", ids[0])


def test_ids_are_time_ordered_hex_even_when_the_clock_steps_back(
    store: EpisodicStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = store.append("t", "ns", "task", 1)
    real = time.time_ns()
    monkeypatch.setattr(time, "time_ns", lambda: real - 10**12)  # the clock steps back 1000 s
    later = [
        store.append("t", "ns", "task", 2),
        *store.append_many("t", "ns", "task", [NewRecord(3)] * 3),
    ]
    ids = [first, *later]
    assert all(len(i) == 22 and int(i, 16) >= 0 and i == i.lower() for i in ids)
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # created_ms comes from the same stamp as the id: the id's 16 leading digits are its ns.
    rec = store.get("t", "ns", "task", first)
    assert rec.created_ms == int(first[:16], 16) // 1_000_000


def test_time_range_scan(store: EpisodicStore) -> None:
    first = store.append("t", "ns", "task", 1)
    middle_ns = time.time_ns()
    second = store.append("t", "ns", "task", 2)
    assert [r.id for r in store.scan("t", "ns", "task", since_ns=middle_ns)] == [second]
    assert [r.id for r in store.scan("t", "ns", "task", until_ns=middle_ns)] == [first]
    assert store.scan("t", "ns", "task", since_ns=time.time_ns()) == []  # known task, empty range


def test_batch_is_atomic_and_validated_first(store: EpisodicStore) -> None:
    ids = store.append_many("t", "ns", "task", [NewRecord(i) for i in range(100)], sync=True)
    assert len(store.scan("t", "ns", "task", limit=1000)) == len(ids) == 100
    with pytest.raises(ValueTooLargeError, match="4096-byte limit"):
        store.append_many("t", "ns", "task2", [NewRecord(1), NewRecord("x" * 5000)])
    with pytest.raises(NotFoundError):  # nothing half-written
        store.scan("t", "ns", "task2")


def test_prefix_listing_and_tenant_separation(store: EpisodicStore) -> None:
    store.append("t", "users:alice", "x", 1)
    store.append("t", "users:bob", "y", 1)
    store.append("t", "other", "z", 1)
    store.append("u", "users:carol", "w", 1)
    assert store.list_tasks("t", "users:") == [("users:alice", "x"), ("users:bob", "y")]
    assert store.list_tasks("u") == [("users:carol", "w")]


@pytest.mark.parametrize(
    ("tenant", "namespace", "task", "rid"),
    [
        ("", "ns", "t", "i"),
        ("a\x00b", "ns", "t", "i"),
        ("a", "n s", "t", "i"),
        ("a", "ns", "t/../x", "i"),
        ("a", "ns", "t", "id with space"),
        ("a", "ns:", "t", "i"),
    ],
)
def test_bad_keys_are_refused(
    store: EpisodicStore, tenant: str, namespace: str, task: str, rid: str
) -> None:
    with pytest.raises(MemoryKeyError, match="invalid"):
        store.append(tenant, namespace, task, 1, id=rid)


def test_expired_records_never_returned_and_swept(store: EpisodicStore) -> None:
    keep = store.append("t", "ns", "task", "keep")
    gone = store.append("t", "ns", "task", "gone", ttl=0.05)
    time.sleep(0.12)
    with pytest.raises(NotFoundError):
        store.get("t", "ns", "task", gone)
    assert [r.id for r in store.scan("t", "ns", "task")] == [keep]
    assert store.sweep() == 1
    assert store.sweep() == 0
    assert stored_keys(store, b"x") == []


def test_ended_task_expires_whole_range(store: EpisodicStore) -> None:
    store.append_many("t", "ns", "done", [NewRecord(i) for i in range(50)])
    other = store.append("t", "ns", "live", "stays")
    store.end_task("t", "ns", "done", ttl=0.05)
    with pytest.raises(TaskEndedError):
        store.append("t", "ns", "done", 1)
    assert len(store.scan("t", "ns", "done", limit=100)) == 50  # still within its TTL
    time.sleep(0.12)
    with pytest.raises(NotFoundError):
        store.scan("t", "ns", "done")
    assert ("ns", "done") not in store.list_tasks("t")
    store.sweep()
    assert [k for k in stored_keys(store, b"") if b"done" in k] == []
    assert store.get("t", "ns", "live", other).value == "stays"


def test_background_sweeper_and_reopen(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with EpisodicStore(tmp_path / "db", bucket_ms=20) as s:
        s.append("t", "ns", "task", 1, ttl=0.02)
        s.end_task("t", "ns", "ended", ttl=60)
        s.start_sweeper(interval=0.02)
        deadline = time.monotonic() + 5
        while stored_keys(s, b"r") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stored_keys(s, b"r") == []
    # The ended task survives a restart.
    with EpisodicStore(tmp_path / "db") as s, pytest.raises(TaskEndedError):
        s.append("t", "ns", "ended", 1)


def test_concurrent_synced_writes_group_commit(store: EpisodicStore) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: store.append("t", "ns", "task", i, sync=True), range(200)))
    assert len(set(ids)) == 200
    assert len(store.scan("t", "ns", "task", limit=1000)) == 200
