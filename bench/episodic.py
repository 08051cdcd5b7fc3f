"""Episodic store: puts/s (single and batched), get p50/p99 and range scans, against sqlite3 and raw
rocksdict in the same run.

Same durability everywhere: a write-ahead log without fsync per commit (ours: RocksDB WAL,
sync=False; sqlite3: journal_mode=WAL, synchronous=NORMAL; raw rocksdict: default WAL). Same
records: a msgpack value of ~100 bytes under a tenant/namespace/task/time-ordered key.
Goals: puts >= 2x sqlite3, >= 0.8x raw rocksdict.
"""

from __future__ import annotations

import itertools
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgpack
from rocksdict import Options, Rdict, WriteBatch

from _harness import Bench, percentile
from agentnode.storage.episodic import EpisodicStore, NewRecord

VALUE = {"role": "tool", "text": "x" * 64, "step": 1}
BATCH = 100
_SEQ = itertools.count()
# The raw peer packs as ours does (one reused Packer), so put_vs_raw is the cost of our layer.
_PACK = msgpack.Packer().pack


def peer_id() -> str:
    """The same time-ordered id for the peers, without our lock (in the peers' favour)."""
    return f"{time.time_ns():016x}{next(_SEQ) & 0xFFFFFF:06x}"


def rate(n: int, fn: Callable[[int], object]) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def rates(rounds: int, n: int, fns: list[Callable[[int], object]]) -> list[float]:
    """Median rate of each fn over rounds that rotate which goes first (the machine is shared)."""
    seen: list[list[float]] = [[] for _ in fns]
    for r in range(rounds):
        for k in range(len(fns)):
            j = (k + r) % len(fns)
            seen[j].append(rate(n, fns[j]))
    return [statistics.median(x) for x in seen]


def latencies(ids: Sequence[object], fn: Callable[[object], object]) -> list[float]:
    out = []
    for i in ids:
        t0 = time.perf_counter_ns()
        fn(i)
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def main() -> None:
    bench = Bench.from_args("episodic")
    n = 5_000 if bench.quick else 50_000
    tmp = Path(tempfile.mkdtemp(prefix="agentnode-bench-episodic-"))
    ours = EpisodicStore(tmp / "ours")
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    raw = Rdict(str(tmp / "raw"), opts)
    sql = sqlite3.connect(tmp / "sqlite.db", isolation_level=None)
    sql.execute("PRAGMA journal_mode=WAL")
    sql.execute("PRAGMA synchronous=NORMAL")
    sql.execute(
        "CREATE TABLE rec (tenant TEXT, ns TEXT, task TEXT, id TEXT, value BLOB,"
        " PRIMARY KEY (tenant, ns, task, id)) WITHOUT ROWID"
    )
    insert = "INSERT OR REPLACE INTO rec VALUES ('a', 'ns', 't', ?, ?)"

    def raw_put(i: int) -> None:
        raw.put(f"ra\x00ns\x00t\x00{peer_id()}".encode(), _PACK([0, 0, VALUE]))

    def sql_put(i: int) -> None:
        sql.execute("BEGIN")
        sql.execute(insert, (peer_id(), msgpack.packb(VALUE)))
        sql.execute("COMMIT")

    rounds = 3 if bench.quick else 7
    o, s, r = rates(
        rounds, n // rounds, [lambda i: ours.append("a", "ns", "t", VALUE), sql_put, raw_put]
    )
    bench.record("put", o, s, "puts/s", peer_name="sqlite3 WAL", higher_is_better=True)
    bench.record("put_vs_raw", o, r, "puts/s", peer_name="raw rocksdict", higher_is_better=True)

    records = [NewRecord(VALUE)] * BATCH

    def raw_batch(i: int) -> None:
        wb = WriteBatch(raw_mode=True)
        for _ in range(BATCH):
            wb.put(f"ra\x00ns\x00t\x00{peer_id()}".encode(), _PACK([0, 0, VALUE]))
        raw.write(wb)

    def sql_batch(i: int) -> None:
        sql.execute("BEGIN")
        sql.executemany(insert, [(peer_id(), msgpack.packb(VALUE)) for _ in range(BATCH)])
        sql.execute("COMMIT")

    o, s, r = (
        BATCH * x
        for x in rates(
            rounds,
            n // BATCH // rounds,
            [lambda i: ours.append_many("a", "ns", "b", records), sql_batch, raw_batch],
        )
    )
    bench.record("put_batched", o, s, "puts/s", peer_name="sqlite3 WAL", higher_is_better=True)
    bench.record(
        "put_batched_vs_raw", o, r, "puts/s", peer_name="raw rocksdict", higher_is_better=True
    )

    ids = [r.id for r in ours.scan("a", "ns", "t", limit=n)][: min(n, 5000)]
    ours_lat = latencies(ids, lambda i: ours.get("a", "ns", "t", str(i)))
    sql_lat = latencies(
        ids,
        lambda i: sql.execute(
            "SELECT value FROM rec WHERE tenant='a' AND ns='ns' AND task='t' AND id=?", (i,)
        ).fetchone(),
    )
    for q in (50, 99):
        bench.record(
            f"get_p{q}",
            percentile(ours_lat, q),
            percentile(sql_lat, q),
            "us",
            peer_name="sqlite3 WAL",
        )

    scans = 200 if bench.quick else 2000
    o, s = rates(
        rounds,
        scans // rounds,
        [
            lambda i: ours.scan("a", "ns", "t", limit=100),
            lambda i: [
                (rid, msgpack.unpackb(v))
                for rid, v in sql.execute(
                    "SELECT id, value FROM rec WHERE tenant='a' AND ns='ns' AND task='t'"
                    " ORDER BY id DESC LIMIT 100"
                )
            ],
        ],
    )
    bench.record("scan_newest_100", o, s, "scans/s", peer_name="sqlite3 WAL", higher_is_better=True)
    ours.close()
    raw.close()
    sql.close()
    shutil.rmtree(tmp)
    bench.save()


if __name__ == "__main__":
    main()
