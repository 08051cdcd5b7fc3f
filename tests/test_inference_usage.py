"""The ledger's usage sums: equal to the raw rows after kill -9 mid-burst, kept past the raw
rows' retention, built once for a ledger from before them, and carried over from a ledger
written before the 1 h cache-write bucket."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from rocksdict import Options, Rdict

from agentnode.inference.store import LedgerRow, Store

GROUPS = ("tenant", "task", "model", "deployment", "day")

BURST = """
import asyncio, random, sys, time
from pathlib import Path
from agentnode.inference.store import LedgerRow, Store

async def main() -> None:
    store = await Store.open(Path(sys.argv[1]))
    print("ready", flush=True)
    i = 0
    while True:
        for _ in range(50):
            i += 1
            store.record(LedgerRow(
                time=time.time() - random.choice((0, 86400)), tenant=random.choice("ab"),
                task=random.choice(("t1", "t2", None)), model=random.choice(("m1", "m2")),
                deployment="d", endpoint="chat", status=200, input=random.randint(0, 999),
                cached_input=random.randint(0, 999), cache_write=0, output=7, reasoning=0,
                cost=f"0.000{random.randint(1, 999)}", latency_ms=1.0, cache_hit=False,
                stream=False, saving=f"0.0000{random.randint(1, 99)}"))
        await asyncio.sleep(0.002)

asyncio.run(main())
"""


def _row(t: float, **kw: Any) -> LedgerRow:
    base: dict[str, Any] = {
        "time": t,
        "tenant": "acme",
        "task": "t1",
        "model": "m",
        "deployment": "d",
        "endpoint": "chat",
        "status": 200,
        "input": 10,
        "cached_input": 5,
        "cache_write": 0,
        "output": 3,
        "reasoning": 0,
        "cost": "0.001",
        "latency_ms": 1.0,
        "cache_hit": False,
        "stream": False,
    }
    return LedgerRow(**(base | kw))


def _by_scan(rows: list[LedgerRow], group_by: tuple[str, ...]) -> dict[tuple[Any, ...], Any]:
    out: dict[tuple[Any, ...], Any] = {}
    for r in rows:
        day = time.strftime("%Y-%m-%d", time.gmtime(r.time))
        v = {"tenant": r.tenant, "task": r.task, "model": r.model, "deployment": r.deployment}
        k = tuple((v | {"day": day})[g] for g in group_by)
        a = out.setdefault(k, [0, 0, Decimal(0), Decimal(0)])
        a[0] += 1
        a[1] += r.input + r.cached_input
        a[2] += Decimal(r.cost)
        a[3] += Decimal(r.saving)
    return out


def _by_sums(groups: list[dict[str, Any]], group_by: tuple[str, ...]) -> dict[tuple[Any, ...], Any]:
    return {
        tuple(g[f] for f in group_by): [
            g["requests"],
            g["input"] + g["cached_input"],
            Decimal(g["cost"]),
            Decimal(g["saving"]),
        ]
        for g in groups
    }


def test_sums_equal_the_rows_after_kill_9_mid_burst(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for _ in range(2):  # twice: the second burst adds to sums loaded from the first
        p = subprocess.Popen(
            [sys.executable, "-c", BURST, str(state)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
            time.sleep(0.7)  # many group commits, then die in the middle of the next ones
            os.kill(p.pid, signal.SIGKILL)
        finally:
            p.wait(timeout=10)
            assert p.stdout is not None
            p.stdout.close()

    async def check() -> None:
        store = await Store.open(state)
        try:
            rows = await store.rows()
            assert len(rows) > 1000
            for group_by in (GROUPS, ("tenant",), ("task", "model"), ("day",), ()):
                got = _by_sums(await store.usage(group_by), group_by)
                assert got == _by_scan(rows, group_by), group_by
            spend = _by_scan(rows, ("tenant",))
            assert {t: store.tenant_spend[t] for t in "ab"} == {t: spend[(t,)][2] for t in "ab"}
            # One task's usage (a budgeted agent's question) from its own groups only.
            by_task, all_tenants = _by_scan(rows, ("tenant", "task")), _by_scan(rows, ("task",))
            for tenant in ("a", "b", None):
                for task in ("t1", "t2", "t3"):
                    got = _by_sums(
                        await store.usage(("task",), tenant=tenant, task=task), ("task",)
                    )
                    want = all_tenants if tenant is None else {
                        (ta,): v for (te, ta), v in by_task.items() if te == tenant}  # fmt: skip
                    assert got == ({(task,): want[(task,)]} if (task,) in want else {}), task
        finally:
            await store.close()

    asyncio.run(check())


def test_retention_drops_old_rows_and_keeps_their_sums(tmp_path: Path) -> None:
    now = time.time()

    async def run() -> None:
        store = await Store.open(tmp_path)
        for age_days in (10, 5, 0):
            store.record(_row(now - age_days * 86400))
        await store.close()
        store = await Store.open(tmp_path, retention_days=7)
        try:
            rows = await store.rows()
            assert [round((now - r.time) / 86400) for r in rows] == [5, 0]
            [total] = await store.usage(())
            assert total["requests"] == 3 and Decimal(total["cost"]) == Decimal("0.003")
            assert store.tenant_spend["acme"] == Decimal("0.003")  # budgets still count it
        finally:
            await store.close()

    asyncio.run(run())


def test_a_ledger_from_before_the_sums_gets_them_built_once(tmp_path: Path) -> None:
    # Rows as an earlier version wrote them: JSON under time keys, no saving, no sums.
    db = Rdict(str(tmp_path / "ledger"), options=Options(raw_mode=True))
    old = ("saving", "cache_write_1h")
    for i in range(3):
        fields = {f: getattr(_row(time.time()), f) for f in LedgerRow.__slots__ if f not in old}
        db.put(f"{time.time_ns():020d}-old{i}".encode(), json.dumps(fields).encode())
    db.close()

    async def run() -> None:
        store = await Store.open(tmp_path)
        try:
            [g] = await store.usage(("tenant",))
            assert (g["requests"], g["cost"], g["saving"]) == (3, "0.003", "0")
            assert len(await store.rows()) == 3
        finally:
            await store.close()

    asyncio.run(run())
    asyncio.run(run())  # and reopened: loaded, not counted twice


def test_a_ledger_from_before_the_1h_bucket_loads_and_sums_on(tmp_path: Path) -> None:
    now = time.time()
    buckets = ("input", "cached_input", "cache_write", "cache_write_1h", "output", "reasoning")

    async def write(rows: list[LedgerRow]) -> None:
        store = await Store.open(tmp_path)
        for r in rows:
            store.record(r)
        await store.close()

    asyncio.run(write([_row(now, cache_write=100), _row(now, task="t2", cache_write=50)]))
    # Make it what the version before the bucket wrote: no cache_write_1h in rows or sums.
    db = Rdict(str(tmp_path / "ledger"), options=Options(raw_mode=True))
    for k, v in list(db.items()):
        if cast(bytes, k).startswith(b"~meta"):
            continue
        value = json.loads(v)
        assert value.pop("cache_write_1h") == 0
        db.put(k, json.dumps(value).encode())
    db.close()
    new = [_row(now, cache_write_1h=4000, cost="0.024"), _row(now, task="t3", cache_write_1h=9)]

    async def check() -> None:
        await write(new)  # adds to the old sums, then reopened: loaded from disk
        store = await Store.open(tmp_path)
        try:
            rows = await store.rows()
            assert sorted(r.cache_write_1h for r in rows) == [0, 0, 9, 4000]
            for group_by in (GROUPS, ("task",), ()):
                for g in await store.usage(group_by):
                    mine = [r for r in rows if all(_field(r, f) == g[f] for f in group_by)]
                    assert g["requests"] == len(mine)
                    for b in buckets:
                        assert g[b] == sum(getattr(r, b) for r in mine), (group_by, b)
                    assert Decimal(g["cost"]) == sum(Decimal(r.cost) for r in mine)
            assert store.tenant_spend["acme"] == Decimal("0.027")
        finally:
            await store.close()

    asyncio.run(check())


def _field(r: LedgerRow, f: str) -> Any:
    return time.strftime("%Y-%m-%d", time.gmtime(r.time)) if f == "day" else getattr(r, f)
