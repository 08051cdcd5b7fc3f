"""RocksDB state of the proxy: the ledger (one row per request) and the response cache.

RocksDB calls block, so every one runs on a single dedicated thread: the event loop never
waits on disk, and one writer thread keeps the ledger's append order. rocksdict holds the GIL
while it writes, so ledger rows are group-committed: gathered on the loop for FLUSH_INTERVAL,
then written as one batch. Each row is serialised to JSON when it is recorded, not in the
writer thread: the thread holds the GIL for all the Python it runs, and serialising a batch
there (~6 µs a row, 150 rows a flush at 3000 requests/s) stalled the event loop ~1 ms at every
flush, which every request in flight at that moment waited out. Spend per tenant and per task
is kept in memory (rebuilt from the ledger at open) so budget checks cost nothing and never
wait for a flush.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from rocksdict import Options, Rdict, WriteBatch

__all__ = ["FLUSH_INTERVAL", "LedgerRow", "Store"]

_GROUPS = ("tenant", "task", "model", "day", "deployment")
#: Seconds ledger rows wait to be written with those that follow: the most a crash can lose.
FLUSH_INTERVAL = 0.05
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


_FIELDS = LedgerRow.__slots__
#: Bytes a database's memtable holds before RocksDB flushes it to a table file.
_WRITE_BUFFER = 1 << 20


def _options() -> Options:
    """Small memtables: RocksDB's default 64 MiB write buffer would hold ~200k ledger rows in
    memory before its first flush, growing the proxy by tens of MiB under steady traffic."""
    opts = Options(raw_mode=True)
    opts.set_write_buffer_size(_WRITE_BUFFER)
    return opts


class Store:
    """The ledger and cache databases under `state_dir`. Use `await Store.open(dir)`."""

    def __init__(self, state_dir: Path) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentnode-ledger")
        state_dir.mkdir(parents=True, exist_ok=True)
        self._ledger = Rdict(str(state_dir / "ledger"), options=_options())
        self._cache = Rdict(str(state_dir / "cache"), options=_options())
        self.tenant_spend: dict[str, Decimal] = defaultdict(Decimal)
        self.task_spend: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        # Keys are time, then this store's random prefix and a counter: unique across restarts
        # and processes without a uuid per row, and in append order within one process.
        self._key_prefix = os.urandom(4).hex()
        self._seq = 0
        #: (key, serialised row) pairs waiting for the next group commit.
        self._pending: list[tuple[bytes, bytes]] = []
        self._timer: asyncio.TimerHandle | None = None

    @classmethod
    async def open(cls, state_dir: Path) -> Store:
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(None, cls, state_dir)
        for row in await store._run(store._scan):
            store._account(row)
        return store

    async def close(self) -> None:
        await self.flush()
        await self._run(self._close)
        self._pool.shutdown(wait=True)

    def _close(self) -> None:
        self._ledger.close()
        self._cache.close()

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _account(self, row: LedgerRow) -> None:
        c = Decimal(row.cost)
        self.tenant_spend[row.tenant] += c
        if row.task is not None:
            self.task_spend[(row.tenant, row.task)] += c

    def record(self, row: LedgerRow) -> None:
        """Counts the row against the budgets now; it is written within FLUSH_INTERVAL."""
        self._account(row)
        self._seq += 1
        key = f"{time.time_ns():020d}-{self._key_prefix}{self._seq:08x}".encode()
        self._pending.append((key, json.dumps({f: getattr(row, f) for f in _FIELDS}).encode()))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_INTERVAL, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        fut = self._submit()
        fut.add_done_callback(_log_write_failure)

    def _submit(self) -> asyncio.Future[None]:
        batch, self._pending = self._pending, []
        return asyncio.get_running_loop().run_in_executor(self._pool, self._write, batch)

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
        wb = WriteBatch(raw_mode=True)
        for key, value in batch:
            wb.put(key, value)
        self._ledger.write(wb)

    def _scan(self) -> list[LedgerRow]:
        return [LedgerRow(**json.loads(v)) for _, v in self._ledger.items()]

    async def rows(self) -> list[LedgerRow]:
        """Every ledger row, oldest first, including those recorded but not yet flushed."""
        await self.flush()
        rows: list[LedgerRow] = await self._run(self._scan)
        return rows

    async def usage(
        self, group_by: tuple[str, ...], *, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Sums of tokens and cost per distinct value of `group_by` (of one tenant if given)."""
        for g in group_by:
            if g not in _GROUPS:
                raise ValueError(f"cannot group by {g!r} (use {', '.join(_GROUPS)})")
        agg: dict[tuple[Any, ...], dict[str, Any]] = {}
        for r in await self.rows():
            if tenant is not None and r.tenant != tenant:
                continue
            values = {
                "tenant": r.tenant,
                "task": r.task,
                "model": r.model,
                "deployment": r.deployment,
                "day": time.strftime("%Y-%m-%d", time.gmtime(r.time)),
            }
            k = tuple(values[g] for g in group_by)
            a = agg.setdefault(
                k,
                {g: values[g] for g in group_by}
                | {"requests": 0, "cache_hits": 0, "cost": Decimal(0), "saving": Decimal(0)}
                | dict.fromkeys(("input", "cached_input", "cache_write", "output", "reasoning"), 0),
            )
            a["requests"] += 1
            a["cache_hits"] += int(r.cache_hit)
            a["cost"] += Decimal(r.cost)
            a["saving"] += Decimal(r.saving)
            for b in ("input", "cached_input", "cache_write", "output", "reasoning"):
                a[b] += getattr(r, b)
        return [a | {"cost": str(a["cost"]), "saving": str(a["saving"])} for a in agg.values()]

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


def _log_write_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and (e := fut.exception()) is not None:
        log.error("proxy state write failed (ledger rows or a cache entry lost): %s", e)
