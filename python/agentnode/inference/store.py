"""RocksDB state of the proxy: the ledger (one row per request) and the response cache.

RocksDB calls block, so every one runs on a single dedicated thread: the event loop never
waits on disk, and one writer thread keeps the ledger's append order. rocksdict holds the GIL
while it writes, so ledger rows are group-committed: gathered on the loop for FLUSH_INTERVAL,
then written as one batch. Each row is serialised to JSON when it is recorded, not in the
writer thread: the thread holds the GIL for all the Python it runs, and serialising a batch
there (~6 µs a row, 150 rows a flush at 3000 requests/s) stalled the event loop ~1 ms at every
flush, which every request in flight at that moment waited out.

Usage is also kept summed per (tenant, task, model, deployment, day), in memory and in the
ledger database under `~agg/` keys, each group commit writing the groups its rows changed in
the same atomic batch as the rows: a crash keeps both or neither, so the sums always equal
the rows written, and `usage()` and the budgets' spend cost O(groups), never a scan. Raw rows
older than the retention are deleted; the sums stay.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from rocksdict import Options

from agentnode.storage.rocks import Batch, Rocks

__all__ = ["FLUSH_INTERVAL", "LedgerRow", "Store"]

#: One group's sums: requests, cache_hits, the buckets (int) and cost, saving (Decimal).
Sums = dict[str, Any]

_GROUPS = ("tenant", "task", "model", "day", "deployment")
_KEY_FIELDS = ("tenant", "task", "model", "deployment", "day")
_COARSE_FIELDS = ("tenant", "model", "deployment", "day")
_BUCKETS = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning")
# Ledger keys: rows under their time (digits), the sums after them under this prefix.
_AGG = b"~agg/"
_AGG_DONE = b"~meta/aggregates"
_DAY = 86400
#: Seconds between deletions of raw rows past the retention.
RETENTION_INTERVAL = 3600.0
#: Seconds ledger rows wait to be written with those that follow: the most a crash can lose.
FLUSH_INTERVAL = 0.05
#: Seconds between tries of a ledger write that failed.
RETRY_INTERVAL = 1.0
log = logging.getLogger("agentnode.inference")


@dataclass(slots=True)
class LedgerRow:
    """What one request cost and how it went."""

    time: float
    tenant: str
    task: str | None
    model: str
    deployment: str | None
    endpoint: str
    status: int
    input: int
    cached_input: int
    cache_write: int
    output: int
    reasoning: int
    cost: str
    latency_ms: float
    cache_hit: bool
    stream: bool
    #: USD the provider's prompt cache saved (see pricing.saving); rows before it have "0".
    saving: str = "0"
    #: Prompt-cache writes with the 1 h TTL (`cache_write` holds the 5 min ones); rows and
    #: sums from before it have 0.
    cache_write_1h: int = 0


_FIELDS = LedgerRow.__slots__
#: Bytes a database's memtable holds before RocksDB flushes it to a table file.
_WRITE_BUFFER = 1 << 20


def _options() -> Options:
    """Small memtables: RocksDB's default 64 MiB write buffer would hold ~200k ledger rows in
    memory before its first flush, growing the proxy by tens of MiB under steady traffic."""
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_write_buffer_size(_WRITE_BUFFER)
    return opts


class Store:
    """The ledger and cache databases under `state_dir`. Use `await Store.open(dir)`."""

    def __init__(self, state_dir: Path, *, retention_days: float = 0.0) -> None:
        self.retention_days = retention_days
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentnode-ledger")
        state_dir.mkdir(parents=True, exist_ok=True)
        self._ledger = Rocks(state_dir / "ledger", _options())
        self._cache = Rocks(state_dir / "cache", _options())
        self.tenant_spend: dict[str, Decimal] = defaultdict(Decimal)
        self.task_spend: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        # Keys are time, then this store's random prefix and a counter: unique across restarts
        # and processes without a uuid per row, and in append order within one process.
        self._key_prefix = os.urandom(4).hex()
        self._seq = 0
        #: (key, serialised row) pairs waiting for the next group commit.
        self._pending: list[tuple[bytes, bytes]] = []
        self._timer: asyncio.TimerHandle | None = None
        #: A write failed and none succeeded since (logged once).
        self._failing = False
        #: Called with each row as it is recorded (the node's audit log).
        self.on_record: Callable[[LedgerRow], object] | None = None
        #: (tenant, task, model, deployment, day) → sums, and the groups changed since the
        #: last group commit.
        self._sums: dict[tuple[Any, ...], Sums] = {}
        #: The same without the task: most queries do not group by it, and tasks are many.
        self._coarse: dict[tuple[Any, ...], Sums] = {}
        self._dirty: set[tuple[Any, ...]] = set()
        #: (tenant, task) → the keys of its groups in `_sums`: one task's usage (what a
        #: budgeted agent asks every step) costs its own groups, not every task's.
        self._task_groups: dict[tuple[str, str | None], list[tuple[Any, ...]]] = {}
        self._days: dict[int, str] = {}
        self._retention: asyncio.TimerHandle | None = None

    @classmethod
    async def open(cls, state_dir: Path, *, retention_days: float = 0.0) -> Store:
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(
            None, lambda: cls(state_dir, retention_days=retention_days)
        )
        sums = await store._run(store._load_sums)
        if sums is None:
            # A ledger from before the sums: build them once from its rows.
            for row in await store._run(store._scan):
                store._sum(row)
            await store.flush()
            await store._run(store._ledger.put, _AGG_DONE, b"1")
        else:
            store._sums = sums
            for k, a in sums.items():
                store._task_groups.setdefault((k[0], k[1]), []).append(k)
                b = store._coarse.setdefault(_coarse(k), _zero())
                for f, v in a.items():
                    b[f] += v
        for k, a in store._sums.items():
            store.tenant_spend[k[0]] += a["cost"]
            if k[1] is not None:
                store.task_spend[(k[0], k[1])] += a["cost"]
        if retention_days > 0:
            await store._run(store._expire)
            store._retention = loop.call_later(RETENTION_INTERVAL, store._expire_soon)
        return store

    async def close(self) -> None:
        if self._retention is not None:
            self._retention.cancel()
        await self.flush()
        await self._run(self._close)
        self._pool.shutdown(wait=True)

    def _close(self) -> None:
        self._ledger.close()
        self._cache.close()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _sum(self, row: LedgerRow) -> Decimal:
        """Adds the row to its group's sums (written with the next group commit); its cost."""
        d = int(row.time // _DAY)
        day = self._days.get(d)
        if day is None:
            day = self._days[d] = time.strftime("%Y-%m-%d", time.gmtime(d * _DAY))
        k = (row.tenant, row.task, row.model, row.deployment, day)
        c, saved = Decimal(row.cost), Decimal(row.saving)
        a = self._sums.get(k)
        if a is None:
            a = self._sums[k] = _zero()
            self._task_groups.setdefault((row.tenant, row.task), []).append(k)
        coarse = _coarse(k)
        b = self._coarse.get(coarse)
        if b is None:
            b = self._coarse[coarse] = _zero()
        for sums in (a, b):
            sums["requests"] += 1
            sums["cache_hits"] += int(row.cache_hit)
            sums["cost"] += c
            sums["saving"] += saved
            for bucket in _BUCKETS:
                sums[bucket] += getattr(row, bucket)
        self._dirty.add(k)
        return c

    def record(self, row: LedgerRow) -> None:
        """Counts the row against the budgets now; it is written within FLUSH_INTERVAL."""
        c = self._sum(row)
        self.tenant_spend[row.tenant] += c
        if row.task is not None:
            self.task_spend[(row.tenant, row.task)] += c
        if self.on_record is not None:
            self.on_record(row)
        self._seq += 1
        # Keyed by the row's own time, so the retention deletes by it.
        key = f"{int(row.time * 1e9):020d}-{self._key_prefix}{self._seq:08x}".encode()
        self._pending.append((key, json.dumps({f: getattr(row, f) for f in _FIELDS}).encode()))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        self._submit()

    def _submit(self) -> asyncio.Future[None]:
        rows, self._pending = self._pending, []
        dirty, self._dirty = self._dirty, set()
        # The sums as they stand include every row in this batch and before: written in the
        # same batch, a crash cannot leave them out of step with the rows.
        batch = rows + [(_AGG + _dumps(list(k)), _dumps(_encode(self._sums[k]))) for k in dirty]
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._write, batch)
        fut.add_done_callback(lambda f: self._written(f, rows, dirty))
        return fut

    def _written(
        self, fut: asyncio.Future[None], rows: list[tuple[bytes, bytes]], dirty: set[Any]
    ) -> None:
        """After a failed write (a full disk, say), its rows and sums go with the next one,
        tried again in `RETRY_INTERVAL`: the ledger loses nothing while the node runs."""
        if fut.cancelled() or (e := fut.exception()) is None:
            return
        if not self._failing:
            log.error("ledger write failed (%d rows wait in memory and are written once it "
                      "can be): %s", len(rows), e)  # fmt: skip
        self._failing = True
        self._pending[:0] = rows
        self._dirty |= dirty
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(RETRY_INTERVAL, self._flush_soon)

    async def flush(self) -> None:
        """Returns once every row recorded so far is written; a failed write raises here."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # One writer thread runs jobs in order: when this batch is done, so are earlier ones.
        await self._submit()

    def _write(self, batch: list[tuple[bytes, bytes]]) -> None:
        if not batch:
            return
        wb = Batch()
        for key, value in batch:
            wb.put(key, value)
        self._ledger.write(wb)
        if self._failing:
            self._failing = False
            log.warning("ledger writes resumed")

    def _scan(self) -> list[LedgerRow]:
        rows = []
        for k, v in self._ledger.items():
            if k.startswith(b"~"):
                break  # The sums sort after every row.
            rows.append(LedgerRow(**json.loads(v)))
        return rows

    def _load_sums(self) -> dict[tuple[Any, ...], Sums] | None:
        if self._ledger.get(_AGG_DONE) is None:
            return None
        sums = {}
        for key, v in self._ledger.items(from_key=_AGG):
            if not key.startswith(_AGG):
                break
            sums[tuple(json.loads(key[len(_AGG) :]))] = _decode(json.loads(v))
        return sums

    def _expire(self) -> None:
        """Deletes raw rows older than the retention (their sums stay)."""
        cutoff = time.time() - self.retention_days * _DAY
        self._ledger.delete_range(b"0", f"{int(cutoff * 1e9):020d}".encode())

    def _expire_soon(self) -> None:
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._expire)
        fut.add_done_callback(_log_write_failure)
        self._retention = asyncio.get_running_loop().call_later(
            RETENTION_INTERVAL, self._expire_soon
        )

    async def rows(self) -> list[LedgerRow]:
        """Every ledger row, oldest first, including those recorded but not yet flushed."""
        await self.flush()
        rows: list[LedgerRow] = await self._run(self._scan)
        return rows

    async def usage(
        self, group_by: tuple[str, ...], *, tenant: str | None = None, task: str | None = None
    ) -> list[dict[str, Any]]:
        """Sums of tokens, cost and saving per distinct value of `group_by` (of one tenant and
        one task if given), from the kept sums: the cost is in the number of groups, not of
        rows (with a tenant and a task: in the number of that task's groups)."""
        for g in group_by:
            if g not in _GROUPS:
                raise ValueError(f"cannot group by {g!r} (use {', '.join(_GROUPS)})")
        fields: tuple[str, ...] = _KEY_FIELDS
        source: Any = self._sums.items()
        if task is not None:
            keys = (
                self._task_groups.get((tenant, task), ())
                if tenant is not None
                else [k for k in self._sums if k[1] == task]
            )
            source = [(k, self._sums[k]) for k in keys]
        elif "task" not in group_by:
            fields, source = _COARSE_FIELDS, self._coarse.items()
        where = [fields.index(g) for g in group_by]
        agg: dict[tuple[Any, ...], Sums] = {}
        for k, s in source:
            if tenant is not None and k[0] != tenant:
                continue
            out = tuple(k[i] for i in where)
            a = agg.get(out)
            if a is None:
                a = agg[out] = _zero()
            for f, v in s.items():
                a[f] += v
        return [
            dict(zip(group_by, k, strict=True)) | _encode(a) | {"requests": a["requests"]}
            for k, a in agg.items()
        ]

    async def cache_get(self, key: bytes) -> tuple[dict[str, Any], bytes] | None:
        """A live cache entry: (metadata, body), or None when absent or expired."""
        raw: bytes | None = await self._run(self._cache.get, key)
        if raw is None:
            return None
        head, _, body = raw.partition(b"\n")
        meta: dict[str, Any] = json.loads(head)
        if meta["expires"] < time.time():
            await self._run(self._cache.delete, key)
            return None
        return meta, body

    def cache_put(self, key: bytes, meta: dict[str, Any], body: bytes, ttl: float) -> None:
        """Queues the entry's write. Nobody awaits it, so a client that hangs up the moment its
        answer is complete (OpenAI's SDK does, at [DONE]) cannot cancel it."""
        meta = meta | {"expires": time.time() + ttl}
        value = json.dumps(meta).encode() + b"\n" + body
        fut = asyncio.get_running_loop().run_in_executor(self._pool, self._cache.put, key, value)
        fut.add_done_callback(_log_write_failure)


def _coarse(key: tuple[Any, ...]) -> tuple[Any, ...]:
    return (key[0], *key[2:])


def _zero() -> Sums:
    return {
        "requests": 0,
        "cache_hits": 0,
        "cost": Decimal(0),
        "saving": Decimal(0),
    } | dict.fromkeys(_BUCKETS, 0)


def _encode(a: Sums) -> dict[str, Any]:
    """Sums as JSON can hold them exactly: the Decimals as strings."""
    return a | {"cost": str(a["cost"]), "saving": str(a["saving"])}


def _decode(a: dict[str, Any]) -> Sums:
    # Sums written before a bucket existed lack it: zero, as their rows are.
    return _zero() | a | {"cost": Decimal(a["cost"]), "saving": Decimal(a["saving"])}


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _log_write_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and (e := fut.exception()) is not None:
        log.error("proxy state write failed (a cache entry or a retention pass): %s", e)
