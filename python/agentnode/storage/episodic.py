"""The episodic store: an append log of msgpack records per tenant, namespace and task, in RocksDB.

Key layout (raw bytes, one RocksDB; NUL separates names, which never contain NUL):

    r <tenant> 0 <namespace> 0 <task> 0 <id>      -> msgpack [created_ms, expires_ms, value]
    t <tenant> 0 <namespace> 0 <task>             -> msgpack expires_ms   (the task has ended)
    x <bucket:8 bytes big-endian> <r… or t… key>  -> b""                  (expiry schedule)

Generated ids are `<time_ns:16 hex><sequence:6 hex>`, so the keys of a task sort by time and a
time range is a key range. Expiry is part of the layout: a record with a TTL, and a task that has
ended (all its records expire `ttl` after the end), are entered in the `x` bucket their expiry
falls in. Reads check the expiry of the record and of its task, so an expired record is never
returned; `sweep()` reclaims every bucket that is wholly in the past: an ended task's records go
with one `delete_range` over the task's key range, and the bucket's index entries go with one
`delete_range` over the bucket range.

Durability: writes go to the WAL without fsync by default (they survive a process crash, not a
power cut). `sync=True` fsyncs before returning; concurrent synced writes are group-committed: one
writer thread merges everything queued into one WriteBatch and one fsync. rocksdict holds the GIL
while it writes, so async code must call the `a`-prefixed methods, which run off the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
from rocksdict import ReadOptions, WriteOptions

from agentnode.errors import MemoryKeyError, NotFoundError, TaskEndedError, ValueTooLargeError
from agentnode.storage.keys import check_id, check_name, check_namespace
from agentnode.storage.rocks import Batch, Op, Rocks

__all__ = ["EpisodicStore", "NewRecord", "Record"]

_log = logging.getLogger(__name__)
_SEP = b"\x00"
_END = b"\x01"  # sorts right after _SEP: `prefix + _SEP` .. `prefix + _END` is one subtree


class Record(NamedTuple):
    """One stored record. `expires_ms` is 0 when it has no TTL of its own."""

    id: str
    namespace: str
    task: str
    value: Any
    created_ms: int
    expires_ms: int

    def to_wire(self) -> dict[str, Any]:
        """The record as the HTTP API and SDK exchange it."""
        return {
            "id": self.id,
            "namespace": self.namespace,
            "task": self.task,
            "value": self.value,
            "created_ms": self.created_ms,
            "expires_ms": self.expires_ms,
        }


# A NamedTuple, not a frozen dataclass: a request makes one per record, and a frozen
# dataclass's __init__ (a setattr per field) costs several times a tuple's.
class NewRecord(NamedTuple):
    """A record to append: `id=None` generates a time-ordered id; `ttl` is in seconds."""

    value: Any
    id: str | None = None
    ttl: float | None = None


def _enc(*names: str) -> bytes:
    return _SEP.join(n.encode() for n in names)


_packers = threading.local()


def _packer() -> msgpack.Packer:
    # One Packer per thread: packb builds a new one per call, which costs as much as the packing.
    try:
        p: msgpack.Packer = _packers.p
    except AttributeError:
        p = _packers.p = msgpack.Packer()
    return p


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class EpisodicStore:
    """Episodic memory in the RocksDB at `path` (created if missing). Close it when done."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_value_bytes: int = 1 << 20,
        bucket_ms: int = 60_000,
    ) -> None:
        self.path = Path(path)
        self.max_value_bytes = max_value_bytes
        self.bucket_ms = bucket_ms
        self._db = Rocks(self.path)
        self._nosync = WriteOptions()
        self._sync = WriteOptions()
        self._sync.sync = True
        self._seq = itertools.count()
        self._last_ns = 0
        self._id_lock = threading.Lock()
        self._task_keys: dict[tuple[str, str, str], bytes] = {}
        # Ended tasks, cached so that a read costs one RocksDB lookup; the `t` keys are the truth.
        self._ended: dict[bytes, int] = {}
        for key, value in self._db.items(from_key=b"t"):
            if not key.startswith(b"t"):
                break
            self._ended[key[1:]] = msgpack.unpackb(value)
        self._commits: queue.SimpleQueue[tuple[list[Op], Future[None]] | None] = queue.SimpleQueue()
        self._committer = threading.Thread(
            target=self._group_commit, name="agentnode-episodic-commit", daemon=True
        )
        self._committer.start()
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False

    # -- writes ---------------------------------------------------------------------------------

    def new_id(self) -> str:
        """A fresh time-ordered record id."""
        return self._id_at(self._stamp())

    def _stamp(self) -> int:
        """Now in ns, never behind an earlier stamp: ids and created_ms both come from it."""
        with self._id_lock:
            return self._tick()

    def _id_at(self, now_ns: int) -> str:
        # 11 big-endian bytes in hex are the 16 + 6 hex digits, at half an f-string's cost.
        return (now_ns << 24 | next(self._seq) & 0xFFFFFF).to_bytes(11, "big").hex()

    def _tick(self) -> int:
        # The clock may step back; ids must not, or a scan would misorder them.
        now = max(time.time_ns(), self._last_ns)
        self._last_ns = now
        return now

    def append(
        self,
        tenant: str,
        namespace: str,
        task: str,
        value: Any,
        *,
        id: str | None = None,
        ttl: float | None = None,
        sync: bool = False,
    ) -> str:
        """Stores one record and returns its id (an existing id is overwritten)."""
        if ttl is not None or sync:
            return self.append_many(
                tenant, namespace, task, [NewRecord(value, id, ttl)], sync=sync
            )[0]
        # The common case, without the batch machinery: one record, no TTL, WAL without fsync.
        task_key = self._task_key(tenant, namespace, task)
        if task_key in self._ended:
            raise TaskEndedError(
                f"task {task!r} in namespace {namespace!r} has ended (append to a new task)"
            )
        now_ns = self._stamp()
        rid = self._id_at(now_ns) if id is None else check_id(id)
        blob = self._pack(now_ns // 1_000_000, 0, value)
        self._db.put(b"r" + task_key + _SEP + rid.encode(), blob)  # default: WAL, no fsync
        return rid

    def _pack(self, now: int, expires: int, value: Any) -> bytes:
        try:
            blob: bytes = _packer().pack([now, expires, value])
        except (TypeError, ValueError) as e:
            raise MemoryKeyError(
                f"record value cannot be stored ({e}; use JSON-like values)"
            ) from e
        if len(blob) > self.max_value_bytes:
            raise ValueTooLargeError(
                f"record value is {len(blob)} bytes, over the {self.max_value_bytes}-byte "
                "limit (store large data in the object store and keep its digest)"
            )
        return blob

    def append_many(
        self,
        tenant: str,
        namespace: str,
        task: str,
        records: Sequence[NewRecord],
        *,
        sync: bool = False,
    ) -> list[str]:
        """Stores records in one atomic WriteBatch and returns their ids, in order."""
        task_key = self._task_key(tenant, namespace, task)
        if task_key in self._ended:
            raise TaskEndedError(
                f"task {task!r} in namespace {namespace!r} has ended (append to a new task)"
            )
        now_ns = self._stamp()
        now = now_ns // 1_000_000
        ops: list[Op] = []
        ids: list[str] = []
        prefix = b"r" + task_key + _SEP
        for rec in records:
            rid = self._id_at(now_ns) if rec.id is None else check_id(rec.id)
            ids.append(rid)
            expires = 0
            if rec.ttl is not None:
                expires = now + _ttl_ms(rec.ttl, zero=False)
            key = prefix + rid.encode()
            ops.append(("put", key, self._pack(now, expires, rec.value)))
            if expires:
                ops.append(("put", self._bucket_key(expires) + key, b""))
        self._commit(ops, sync=sync)
        return ids

    def delete(
        self, tenant: str, namespace: str, task: str, id: str, *, sync: bool = False
    ) -> None:
        """Deletes one record; a missing record raises NotFoundError."""
        self.get(tenant, namespace, task, id)
        key = b"r" + self._task_key(tenant, namespace, task) + _SEP + check_id(id).encode()
        self._commit([("delete", key, b"")], sync=sync)

    def end_task(
        self, tenant: str, namespace: str, task: str, *, ttl: float, sync: bool = True
    ) -> int:
        """Marks a task ended: its records expire `ttl` seconds from now. Returns the expiry (ms)."""
        ttl_ms = _ttl_ms(ttl, zero=True)
        task_key = self._task_key(tenant, namespace, task)
        expires = _now_ms() + ttl_ms
        expires = min(expires, self._ended.get(task_key, expires))
        t_key = b"t" + task_key
        self._commit(
            [
                ("put", t_key, msgpack.packb(expires)),
                ("put", self._bucket_key(expires) + t_key, b""),
            ],
            sync=sync,
        )
        self._ended[task_key] = expires
        return expires

    def _commit(self, ops: list[Op], *, sync: bool) -> None:
        if not sync:
            self._db.write(Batch(ops), self._nosync)
            return
        done: Future[None] = Future()
        self._commits.put((ops, done))
        done.result()

    def _group_commit(self) -> None:
        while True:
            item = self._commits.get()
            if item is None:
                return
            pending = [item]
            while True:
                try:
                    nxt = self._commits.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._commits.put(None)
                    break
                pending.append(nxt)
            try:
                self._db.write(Batch([op for ops, _ in pending for op in ops]), self._sync)
            except Exception as e:
                for _, fut in pending:
                    fut.set_exception(e)
            else:
                for _, fut in pending:
                    fut.set_result(None)

    # -- reads ----------------------------------------------------------------------------------

    def get(self, tenant: str, namespace: str, task: str, id: str) -> Record:
        """The record, or NotFoundError if it does not exist or has expired."""
        task_key = self._task_key(tenant, namespace, task)
        blob = self._db.get(b"r" + task_key + _SEP + check_id(id).encode())
        now = _now_ms()
        if blob is None or not self._task_alive(task_key, now):
            raise NotFoundError(f"no record {id!r} in task {task!r} of namespace {namespace!r}")
        created, expires, value = msgpack.unpackb(blob)
        if expires and expires <= now:
            raise NotFoundError(f"no record {id!r} in task {task!r} of namespace {namespace!r}")
        return Record(id, namespace, task, value, created, expires)

    def scan(
        self,
        tenant: str,
        namespace: str,
        task: str,
        *,
        since_ns: int | None = None,
        until_ns: int | None = None,
        limit: int = 100,
        newest_first: bool = True,
    ) -> list[Record]:
        """Up to `limit` live records of a task with generated ids in [since_ns, until_ns).

        A task with no live records at all (never written, deleted, expired) raises
        NotFoundError; a known task with nothing in the range gives [].
        """
        task_key = self._task_key(tenant, namespace, task)
        now = _now_ms()
        base = b"r" + task_key + _SEP
        end = b"r" + task_key + _END
        lower = base + (f"{since_ns:016x}".encode() if since_ns is not None else b"")
        upper = base + f"{until_ns:016x}".encode() if until_ns is not None else end
        if self._task_alive(task_key, now):
            found = list(
                itertools.islice(
                    self._live(lower, upper, namespace, task, now, newest_first=newest_first),
                    limit,
                )
            )
            anywhere = self._live(base, end, namespace, task, now, newest_first=False)
            if found or any(True for _ in itertools.islice(anywhere, 1)):
                return found
        raise NotFoundError(
            f"unknown task {task!r} in namespace {namespace!r} (no live records; "
            "list tasks with GET /v1/memory/episodic)"
        )

    def _live(
        self,
        lower: bytes,
        upper: bytes,
        namespace: str,
        task: str,
        now: int,
        *,
        newest_first: bool,
    ) -> Iterator[Record]:
        # Only the upper bound goes to RocksDB: rocksdict 0.3.29's set_iterate_lower_bound sets
        # the upper bound instead, so the lower bound is a seek going forward, a stop going back.
        ro = ReadOptions()
        ro.set_iterate_upper_bound(upper)
        start = upper if newest_first else lower
        skip = len(lower) - (len(lower) - lower.rindex(_SEP) - 1)
        for key, blob in self._db.items(backwards=newest_first, from_key=start, read_opt=ro):
            if key < lower:
                return
            if newest_first and key >= upper:
                continue
            created, expires, value = msgpack.unpackb(blob)
            if not expires or expires > now:
                yield Record(key[skip:].decode(), namespace, task, value, created, expires)

    def list_tasks(self, tenant: str, namespace_prefix: str = "") -> list[tuple[str, str]]:
        """The (namespace, task) pairs of a tenant whose namespace starts with the prefix."""
        base = b"r" + check_name("tenant", tenant).encode() + _SEP
        ro = ReadOptions()
        ro.set_iterate_upper_bound(b"r" + tenant.encode() + _END)
        it = self._db.iter(ro)
        it.seek(base + namespace_prefix.encode())
        now = _now_ms()
        found: list[tuple[str, str]] = []
        while it.valid():
            namespace, task, _ = it.key()[len(base) :].split(_SEP, 2)
            if not namespace.startswith(namespace_prefix.encode()):
                break
            task_key = base[1:] + namespace + _SEP + task
            if self._task_alive(task_key, now):
                found.append((namespace.decode(), task.decode()))
            it.seek(b"r" + task_key + _END)  # skip the rest of this task
        return found

    def _task_alive(self, task_key: bytes, now: int) -> bool:
        ended = self._ended.get(task_key)
        return ended is None or ended > now

    def _task_key(self, tenant: str, namespace: str, task: str) -> bytes:
        # Validated keys are cached: agents write many records to few tasks.
        cached = self._task_keys.get((tenant, namespace, task))
        if cached is not None:
            return cached
        key = _enc(
            check_name("tenant", tenant), check_namespace(namespace), check_name("task", task)
        )
        if len(self._task_keys) >= 4096:
            self._task_keys.clear()
        self._task_keys[(tenant, namespace, task)] = key
        return key

    def _bucket_key(self, expires_ms: int) -> bytes:
        return b"x" + (expires_ms // self.bucket_ms + 1).to_bytes(8, "big")

    # -- expiry ---------------------------------------------------------------------------------

    def sweep(self) -> int:
        """Deletes everything in expiry buckets wholly in the past. Returns how many entries."""
        # Bucket k holds expiries before k * bucket_ms, so every bucket <= now // bucket_ms is past.
        past = (_now_ms() // self.bucket_ms + 1).to_bytes(8, "big")
        ro = ReadOptions()
        ro.set_iterate_upper_bound(b"x" + past)
        ops: list[Op] = []
        ended: list[bytes] = []
        last = b""
        for key, _ in self._db.items(from_key=b"x", read_opt=ro):
            target = key[9:]
            if target[:1] == b"t":
                ops.append(("delete_range", b"r" + target[1:] + _SEP, b"r" + target[1:] + _END))
                ops.append(("delete", target, b""))
                ended.append(target[1:])
            else:
                ops.append(("delete", target, b""))
            last = key
        if not ops:
            return 0
        ops.append(("delete_range", b"x", last + _SEP))
        self._commit(ops, sync=False)
        for task_key in ended:
            self._ended.pop(task_key, None)
        return len(ops) - 1

    def start_sweeper(self, interval: float = 30.0) -> None:
        """Runs `sweep()` every `interval` seconds on a background thread until `close()`."""
        if self._sweeper is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.sweep()
                except Exception:  # a failed sweep is retried next interval; reads stay correct
                    _log.exception("episodic expiry sweep failed in %s", self.path)

        self._sweeper = threading.Thread(target=loop, name="agentnode-episodic-sweep", daemon=True)
        self._sweeper.start()

    # -- async wrappers (rocksdict holds the GIL while it writes: keep it off the event loop) ---

    async def aappend_many(
        self, tenant: str, namespace: str, task: str, records: Sequence[NewRecord], *, sync: bool
    ) -> list[str]:
        """`append_many`, on a worker thread when it waits for an fsync. Without one it is a
        write to the WAL in the kernel: done on the loop, which it would block just the same
        from a thread (rocksdict holds the GIL), without two thread hand-offs (a LangGraph
        checkpoint a super-step, an agent's memory write a step)."""
        if not sync:
            return self.append_many(tenant, namespace, task, records, sync=False)
        return await asyncio.to_thread(
            self.append_many, tenant, namespace, task, records, sync=sync
        )

    def close(self) -> None:
        """Stops the background threads, flushes and closes the database. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join()
        self._commits.put(None)
        self._committer.join()
        self._db.close()

    def __enter__(self) -> EpisodicStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A century: longer is "forever" to any caller, and keeps expiry times within int64 ms.
_MAX_TTL_S = 100 * 365 * 86400


def _ttl_ms(ttl: object, *, zero: bool) -> int:
    """`ttl` seconds in ms; `MemoryKeyError` unless a finite number in range (0 only if `zero`)."""
    if (
        isinstance(ttl, bool)
        or not isinstance(ttl, int | float)
        or not 0 <= ttl <= _MAX_TTL_S  # also false for NaN
        or (ttl == 0 and not zero)
    ):
        low = ">= 0" if zero else "> 0"
        raise MemoryKeyError(
            f"invalid ttl {ttl!r} (use a number of seconds {low}, at most {_MAX_TTL_S})"
        )
    return int(ttl * 1000)
