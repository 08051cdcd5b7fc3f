"""A full disk under each of the node's stores: every write refused with one line that says so
(StoreFullError, 507 over HTTP), nothing acknowledged lost, and writes taken again by
themselves once space is freed, without a restart. Each store runs on its own small tmpfs,
filled by a file until ENOSPC."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from agentnode.audit import log as audit_log
from agentnode.audit.chain import verify
from agentnode.audit.log import AuditLog
from agentnode.errors import AuditError, StoreFullError, StoreWriteError
from agentnode.inference import store as inference_store
from agentnode.inference.store import LedgerRow, Store
from agentnode.storage.episodic import EpisodicStore
from agentnode.storage.objects import ObjectStore
from agentnode.storage.rocks import Rocks
from agentnode.storage.tenancy import StaticTokens
from agentnode.storage.vectors import VectorStore
from agentnode.tools.keys import KeyStore
from conftest import memory_api

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root)")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs of its own."""
    where = tmp_path / "disk"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def full(disk: Path) -> Iterator[None]:
    """The disk filled to its last byte while inside; freed on leaving."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    with contextlib.suppress(OSError):
        for size in (1 << 20, 4096, 1):  # then whatever pages are left
            while True:
                os.write(fd, b"\0" * size)
    os.close(fd)
    try:
        yield
    finally:
        filler.unlink()


def refused(write: Callable[[int], object], start: int) -> tuple[int, StoreWriteError]:
    """Writes start, start+1, ... until one is refused (RocksDB's log may hold a page or a
    preallocated block): the index of the refused one, and the error."""
    for i in range(start, start + 20_000):
        try:
            write(i)
        except StoreWriteError as e:
            return i, e
    raise AssertionError("a full disk took 20,000 writes")


def assert_full(e: StoreWriteError, disk: Path) -> None:
    assert isinstance(e, StoreFullError) and e.status == 507, repr(e)
    message = str(e)
    assert "\n" not in message and str(disk) in message and "is full" in message, message
    assert "resume by themselves" in message, message


# -- each store ----------------------------------------------------------------------------------


class Kind:
    """One store under test: writes numbered records and reads them back."""

    store: Any

    def close(self) -> None:
        self.store.close()


class Episodic(Kind):
    def __init__(self, path: Path) -> None:
        self.store = EpisodicStore(path)

    def write(self, i: int) -> None:
        self.store.append("t", "ns", "task", {"i": i, "pad": "x" * 2000}, id=f"r{i}")

    def read(self, i: int) -> bool:
        return bool(self.store.get("t", "ns", "task", f"r{i}").value["i"] == i)


class Vectors(Kind):
    def __init__(self, path: Path) -> None:
        self.store = VectorStore(path)
        with contextlib.suppress(Exception):
            self.store.create_collection("c", dims=512)
        self.coll = self.store.collection("c")

    def write(self, i: int) -> None:
        self.coll.upsert(i, [float(i + 1)] * 512, tenant="t")

    def read(self, i: int) -> bool:
        return self.coll.get(i) is not None


class Objects(Kind):
    def __init__(self, path: Path) -> None:
        self.store = ObjectStore(path)

    def write(self, i: int) -> None:
        self.store.put("t", f"o{i}", [i.to_bytes(4, "big") * 4096])

    def read(self, i: int) -> bool:
        return bool(self.store.stat("t", f"o{i}").size == 16384)


class Keys(Kind):
    def __init__(self, path: Path) -> None:
        self.store = KeyStore(path / "keys")

    def write(self, i: int) -> None:
        self.store.start(("t", "tool", f"k{i}"), "d" * 64)
        self.store.finish(("t", "tool", f"k{i}"), "d" * 64, {"pad": "x" * 2000})

    def read(self, i: int) -> bool:
        return self.store.get(("t", "tool", f"k{i}")) is not None


class Raw(Kind):
    def __init__(self, path: Path) -> None:
        self.store = Rocks(path / "db")

    def write(self, i: int) -> None:
        self.store.put(i.to_bytes(4, "big"), b"x" * 2000)
        self.store.delete(b"gone")
        self.store.delete_range(b"a", b"b")

    def read(self, i: int) -> bool:
        return self.store.get(i.to_bytes(4, "big")) is not None


@pytest.mark.parametrize("kind", [Episodic, Vectors, Objects, Keys, Raw])
def test_a_store_on_a_full_disk_refuses_in_one_line_and_resumes_by_itself(
    disk: Path, kind: Callable[[Path], Any]
) -> None:
    store = kind(disk)
    try:
        for i in range(5):
            store.write(i)
        with full(disk):
            n, e = refused(store.write, 5)
            assert_full(e, disk)
            # Still refused, the same way, and reads go on meanwhile.
            with pytest.raises(StoreFullError, match="is full"):
                store.write(n)
            assert all(store.read(i) for i in range(n)), "a write taken is kept"
        # Space again: the next write is taken, with no restart.
        for i in range(n, n + 5):
            store.write(i)
        acknowledged = n + 5
    finally:
        store.close()
    again = kind(disk)
    try:
        assert all(again.read(i) for i in range(acknowledged)), "every write taken is kept"
    finally:
        again.close()


def test_the_memory_api_answers_507_on_a_full_disk_and_resumes(disk: Path) -> None:
    with memory_api(disk, StaticTokens({"tok": "acme"})) as url:

        def post(i: int) -> tuple[int, dict[str, Any]]:
            parts = urlsplit(url)
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
            body = json.dumps({"value": {"i": i, "pad": "x" * 4000}})
            conn.request("POST", "/v1/memory/episodic/ns/t", body,
                         {"Authorization": "Bearer tok", "Content-Type": "application/json"})  # fmt: skip
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            conn.close()
            return resp.status, answer

        assert post(0)[0] == 201
        with full(disk):
            for i in range(1, 5000):
                status, answer = post(i)
                if status != 201:
                    break
            assert status == 507, answer
            assert answer["kind"] == "StoreFullError" and "is full" in answer["error"], answer
            assert "\n" not in answer["error"]
        assert post(1)[0] == 201


# -- the proxy's ledger --------------------------------------------------------------------------


def _row(i: int) -> LedgerRow:
    return LedgerRow(
        time=time.time(), tenant="acme", task="t1", model="m", deployment=None, endpoint="chat",
        status=200, input=10, cached_input=0, cache_write=0, output=3, reasoning=0,
        cost="0.001", latency_ms=1.0, cache_hit=False, stream=False,
    )  # fmt: skip


def test_the_ledger_keeps_its_rows_while_the_disk_is_full(
    disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference_store, "RETRY_INTERVAL", 0.1)

    async def run() -> None:
        store = await Store.open(disk / "proxy")
        for i in range(3):
            store.record(_row(i))
        await store.flush()
        with full(disk):
            written = 3
            with pytest.raises(StoreWriteError, match="is full"):
                for _ in range(20_000):
                    for _ in range(20):
                        store.record(_row(written))
                        written += 1
                    await store.flush()
            # Rows recorded meanwhile wait with those of the failed write.
            for _ in range(10):
                store.record(_row(written))
                written += 1
            await asyncio.sleep(0.3)
        deadline = time.monotonic() + 10
        while len(await store.rows()) < written:
            assert time.monotonic() < deadline, "the ledger did not resume"
            await asyncio.sleep(0.1)
        await store.close()
        again = await Store.open(disk / "proxy")
        assert len(await again.rows()) == written
        [usage] = await again.usage(("tenant",))
        assert usage["requests"] == written
        assert Decimal(usage["cost"]) == Decimal("0.001") * written
        await again.close()

    asyncio.run(run())


# -- the audit log -------------------------------------------------------------------------------


def test_the_audit_log_holds_records_while_the_disk_is_full(
    disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_log, "RETRY_S", 0.05)
    log = AuditLog(disk / "audit")
    try:
        for i in range(3):
            log.append({"kind": "t", "task": "job", "i": i})
        log.flush()
        assert log.health() == "ok"
        with full(disk):
            i = _until_stuck(log, 3)
            assert log.health().startswith("failing: the audit log cannot be written")
            with pytest.raises(AuditError, match="cannot be written"):
                log.flush()
            for _ in range(20):  # held in memory, in order
                log.append({"kind": "t", "task": "job", "i": i})
                i += 1
            time.sleep(0.2)  # tries while full fail and keep them
        deadline = time.monotonic() + 10
        while log.health() != "ok":
            assert time.monotonic() < deadline, log.health()
            time.sleep(0.05)
        log.flush()
        records = list(log.task_records("job"))
    finally:
        log.close()
    assert [r["i"] for r in records] == list(range(i)), "every record, once, in order"
    checked = verify(disk / "audit")
    assert checked.records == i


def test_the_audit_log_counts_what_it_cannot_hold_and_the_chain_stays_whole(
    disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_log, "RETRY_S", 0.05)
    monkeypatch.setattr(audit_log, "BACKLOG_BYTES", 20_000)
    log = AuditLog(disk / "audit")
    try:
        with full(disk):
            i = _until_stuck(log, 0)
            seqs = [log.append({"kind": "t", "task": "job", "i": i + k, "pad": "y" * 1000})
                    for k in range(100)]  # fmt: skip
            assert 0 in seqs and seqs[0] != 0, "some held, the rest counted"
            lost = seqs.count(0)
        deadline = time.monotonic() + 10
        while log.health() != "ok":
            assert time.monotonic() < deadline, log.health()
            time.sleep(0.05)
        log.flush()
        kinds = [(r["kind"], r.get("records")) for r in _all(disk / "audit")]
    finally:
        log.close()
    assert ("audit_lost", lost) in kinds, kinds
    assert verify(disk / "audit").records == len(kinds)


def _until_stuck(log: AuditLog, i: int) -> int:
    """Appends records numbered from `i` until the log cannot write; the next number."""
    while log.health() == "ok":
        assert i < 50_000, "a full disk took every record"
        log.append({"kind": "t", "task": "job", "i": i, "pad": "x" * 500})
        i += 1
    return i


def _all(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / "audit.log").read_text().splitlines()]


@pytest.mark.parametrize("room", [0, 5000, 40_000])
def test_an_input_the_full_disk_cuts_short_is_taken_back_whole(disk: Path, room: int) -> None:
    """An input to a task's inbox that a full disk takes part of (or none): refused in one line
    (DiskFullError, 507 over the Agent Protocol) and taken back, so the agent never reads half
    of it or a later input glued to it; the same input goes whole once space is freed."""
    from agentnode.errors import DiskFullError
    from agentnode.runtime.inbox import Inbox
    from agentnode.tasks.store import TaskStore

    store = TaskStore(disk / "tasks")
    try:
        store.deliver("t1", json.dumps({"input": "first"}).encode())
        inbox = store.inbox_path("t1")
        before = inbox.read_bytes()
        big = json.dumps({"input": "x" * 60_000}).encode()
        filler = disk / "filler"  # leaves `room` bytes free: the disk takes part of the input
        with open(filler, "wb") as f:
            f.write(b"\0" * (_free(disk) - room))
        with pytest.raises(DiskFullError, match="full: the input to task t1 was not delivered"):
            store.deliver("t1", big)
        assert inbox.read_bytes() == before
        filler.unlink()
        store.deliver("t1", big)
        store.deliver("t1", json.dumps({"input": "third"}).encode())
        texts, _ = Inbox(str(inbox)).read(0)
        assert texts == ["first", "x" * 60_000, "third"]
    finally:
        store.close()


def _free(disk: Path) -> int:
    st = os.statvfs(disk)
    return st.f_bavail * st.f_frsize


def test_write_file_on_a_full_disk_is_a_resource_refusal(disk: Path) -> None:
    """The task's workspace on a full disk: write_file answers `resource` naming why (a
    limit it reached, not a bug of the tool), and writes again once space is freed."""
    import asyncio

    from agentnode.tools.files import file_tools
    from agentnode.tools.registry import Caller, Registry
    from agentnode.tools.sandboxed import owned_workspace
    from agentnode.tools.service import ToolService

    ws = owned_workspace(disk / "ws", "65534")
    svc = ToolService(Registry(file_tools()), on_record=lambda _: None)
    caller = Caller(task="t1", tenant="a", workspace=ws)

    def write(content: str) -> dict[str, Any]:
        args = {"path": "notes/big.txt", "content": content}
        return asyncio.run(svc.call("write_file", args, caller))

    with full(disk):
        for size in (1, 100_000):
            answer = write("x" * size)
            meta = answer["_meta"]["agentnode"]
            assert meta["class"] == "resource", answer
            assert "No space left on device" in answer["content"][0]["text"], answer
    ok = write("fits")
    assert ok["_meta"]["agentnode"]["class"] == "ok", ok
    assert (ws / "notes" / "big.txt").read_text() == "fits"


def test_no_tool_call_runs_while_the_audit_log_cannot_be_written(
    disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call's record would wait in memory, and a crash then would lose it: while the log is
    stuck a tool call (keyed or not, of any tool) is not run, `transient`; once the disk has
    room again calls run, and every record of the refusals is in the log."""
    import asyncio

    from agentnode.tools.registry import Caller, Registry, Tool
    from agentnode.tools.result import Outcome
    from agentnode.tools.service import ToolService

    monkeypatch.setattr(audit_log, "RETRY_S", 0.05)
    ran: list[str] = []

    async def act(args: dict[str, Any], caller: Caller) -> Outcome:
        ran.append(args["x"])
        return Outcome.text("done")

    tool = Tool(name="act", description="", input_schema={"type": "object"}, run=act)
    log = AuditLog(disk / "audit")
    svc = ToolService(Registry([tool]), on_record=log.append, held_back=lambda: log.stuck)
    caller = Caller(task="job", tenant="a")

    def call(x: str, key: str | None = None) -> dict[str, Any]:
        return asyncio.run(svc.call("act", {"x": x}, caller, idempotency_key=key))

    try:
        assert call("before")["_meta"]["agentnode"]["class"] == "ok"
        with full(disk):
            _until_stuck(log, 0)
            for x, key in (("plain", None), ("keyed", "k1")):
                refused = call(x, key)
                meta = refused["_meta"]["agentnode"]
                assert meta["class"] == "transient" and meta["retryable"], refused
                assert "the audit log cannot be written" in refused["content"][0]["text"]
        deadline = time.monotonic() + 10
        while log.stuck is not None:
            assert time.monotonic() < deadline, log.health()
            time.sleep(0.05)
        assert call("after", "k1")["_meta"]["agentnode"]["class"] == "ok"
        log.flush()
        calls = [r for r in _all(disk / "audit") if r["kind"] == "tool_call"]
    finally:
        log.close()
    assert ran == ["before", "after"], "nothing ran while the log was stuck"
    assert [r["class"] for r in calls] == ["ok", "transient", "transient", "ok"]
