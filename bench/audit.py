"""Audit log and exec tracing cost, each against a peer in the same run.

- batched appends (records/s): `AuditLog.extend` in batches of 1000 (hash chain, fsync, per-task
  index) vs plain JSON lines appended to a file (serialise + write, one fdatasync at the end) and
  vs sqlite `executemany` in one transaction per batch (goal: >= 100k records/s);
- fsync-grouped appends (records/s): 256 asyncio tasks each awaiting `AuditLog.commit` (every
  record durable before it returns, fsyncs shared) vs sqlite in WAL mode committing each group
  of 256 (goal: >= 20k records/s);
- paced appends (CPU per record): one record every 2 ms, an agent's pace (a step makes an LLM
  call's, a tool call's and a checkpoint's record), the caller's and the writer thread's CPU
  over a loop that only sleeps; ours (fsyncs grouped per `SYNC_INTERVAL`) vs the same log
  syncing every record as it comes (`SYNC_INTERVAL` 0: its own fsync, index write and writer
  wakeup each, as the log did before 2026-12-06);
- exec tracing: 1,000 fork+exec of /bin/true inside a sandboxed task with the tracer attached
  and writing to the audit log vs without it (goal: <= 1.05x). Needs root.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

import agentnode.audit.log as audit_log
from _harness import Bench
from agentnode.audit import AuditLog
from agentnode.audit.execs import ExecTrace
from agentnode.isolation import spawn


def _record(i: int) -> dict[str, Any]:
    return {
        "kind": "tool_call",
        "task": f"task-{i % 16:04d}",
        "tenant": "acme",
        "tool": "run_code",
        "args_sha256": "ab" * 32,
        "class": "ok",
        "duration_ms": 1.25,
    }


def batched(root: Path, n: int) -> tuple[float, float, float]:
    """Records/s: ours, plain JSON lines, sqlite."""
    records = [_record(i) for i in range(n)]
    log = AuditLog(root / "ours")
    t = time.perf_counter()
    for i in range(0, n, 1000):
        log.extend(records[i : i + 1000])
    log.flush()
    ours = n / (time.perf_counter() - t)
    log.close()

    t = time.perf_counter()
    with (root / "plain.jsonl").open("a") as f:
        for r in records:
            f.write(json.dumps({"time": time.time()} | r, separators=(",", ":")) + "\n")
        f.flush()
        os.fdatasync(f.fileno())
    plain = n / (time.perf_counter() - t)

    db = sqlite3.connect(root / "peer.db")
    db.execute("create table log (time real, task text, body text)")
    t = time.perf_counter()
    for i in range(0, n, 1000):
        with db:
            db.executemany(
                "insert into log values (?, ?, ?)",
                [(time.time(), r["task"], json.dumps(r)) for r in records[i : i + 1000]],
            )
    lite = n / (time.perf_counter() - t)
    db.close()
    return ours, plain, lite


def grouped(root: Path, n: int, writers: int = 256) -> tuple[float, float]:
    """Records/s with every record durable before its writer goes on: ours vs sqlite WAL."""
    log = AuditLog(root / "grouped")

    async def writer(k: int) -> None:
        for i in range(k, n, writers):
            await log.commit(_record(i))

    async def main() -> float:
        t = time.perf_counter()
        await asyncio.gather(*(writer(k) for k in range(writers)))
        return n / (time.perf_counter() - t)

    ours = uvloop.run(main())  # the node's loop
    log.close()

    db = sqlite3.connect(root / "grouped.db")
    db.execute("pragma journal_mode=wal")
    db.execute("pragma synchronous=full")
    db.execute("create table log (time real, task text, body text)")
    t = time.perf_counter()
    for i in range(0, n, writers):
        with db:
            db.executemany(
                "insert into log values (?, ?, ?)",
                [
                    (time.time(), f"t{j % 16}", json.dumps(_record(j)))
                    for j in range(i, i + writers)
                ],
            )
    lite = n / (time.perf_counter() - t)
    db.close()
    return ours, lite


def paced(root: Path, n: int, interval: float) -> float:
    """CPU µs per record appended every 2 ms (process CPU: the caller and the writer thread),
    less a loop that only sleeps, with fsyncs grouped per `interval` seconds."""
    kept, audit_log.SYNC_INTERVAL = audit_log.SYNC_INTERVAL, interval
    try:
        log = AuditLog(root / f"paced-{interval}")
        c = time.process_time()
        for i in range(n):
            log.append(_record(i))
            time.sleep(0.002)
        log.flush()
        used = time.process_time() - c
        log.close()
    finally:
        audit_log.SYNC_INTERVAL = kept
    c = time.process_time()
    for _ in range(n):
        time.sleep(0.002)
    return (used - (time.process_time() - c)) / n * 1e6


_EXECS = "i=0; while [ $i -lt 1000 ]; do /bin/true; i=$((i+1)); done"


def _run_task(trace: ExecTrace | None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the task's cgroup) of 1,000 execs."""
    t = time.perf_counter()
    task = spawn(["sh", "-c", _EXECS])
    if trace is not None and task.cgroup_dir is not None:
        trace.watch(task.cgroup_dir, task="bench", tenant="bench")
    result = task.wait(120)
    elapsed = time.perf_counter() - t
    assert result is not None and result.code == 0, result
    if trace is not None:
        trace.forget("bench")
    task.close()
    return elapsed, result.stats.cpu_user_s + result.stats.cpu_system_s


def exec_cost(root: Path, rounds: int) -> tuple[tuple[float, float], tuple[float, float], int]:
    """Median (wall, CPU) seconds of 1,000 fork+exec in a task, traced into an audit log and
    with no tracer attached (rounds alternate which goes first); and the exec records written.
    The task's CPU time holds the BPF program's cost (it runs in the exec'ing task) and is far
    less disturbed by other load on the host than its wall time."""
    log = AuditLog(root / "execs")
    on: list[tuple[float, float]] = []
    off: list[tuple[float, float]] = []
    _run_task(None)  # warm the page cache and the cgroup pools
    for r in range(rounds):
        for traced in (True, False) if r % 2 == 0 else (False, True):
            if traced:
                trace = ExecTrace.for_instance(sink=log.append)
                try:
                    on.append(_run_task(trace))
                finally:
                    trace.close()
            else:
                off.append(_run_task(None))
    log.close()
    execs = sum(1 for line in (root / "execs" / "audit.log").open() if '"kind":"exec"' in line)

    def med(xs: list[tuple[float, float]]) -> tuple[float, float]:
        return statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs)

    return med(on), med(off), execs


def main() -> None:
    bench = Bench.from_args("audit")
    n = 50_000 if bench.quick else 200_000
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ours, plain, lite = batched(root, n)
        bench.record("batched_append", ours, plain, "records/s", peer_name="plain JSON lines",
                     higher_is_better=True)  # fmt: skip
        bench.record("batched_append_vs_sqlite", ours, lite, "records/s",
                     peer_name="sqlite executemany", higher_is_better=True)  # fmt: skip
        ours, lite = grouped(root, n // 4)
        bench.record("fsync_grouped_append", ours, lite, "records/s",
                     peer_name="sqlite WAL, commit per group", higher_is_better=True)  # fmt: skip
        steps = 500 if bench.quick else 2000
        alone, grouped_cpu = [], []
        for _ in range(3):
            alone.append(paced(root, steps, 0.0))
            grouped_cpu.append(paced(root, steps, audit_log.SYNC_INTERVAL))
        bench.record("paced_append_cpu", statistics.median(grouped_cpu), statistics.median(alone),
                     "us CPU/record", peer_name="same log, an fsync per record")  # fmt: skip
        if os.geteuid() == 0:
            # An even number of rounds: each side goes first as often (3 let one go first twice).
            on, off, execs = exec_cost(root, 6 if bench.quick else 10)
            bench.record("exec_trace_1000_execs_cpu", on[1] * 1000, off[1] * 1000, "ms",
                         peer_name="same task, no tracer")  # fmt: skip
            bench.record("exec_trace_1000_execs_wall", on[0] * 1000, off[0] * 1000, "ms",
                         peer_name="same task, no tracer")  # fmt: skip
            print(f"audit.exec_trace: {execs} exec records written", flush=True)
        else:
            print("audit.exec_trace: skipped (needs root)", flush=True)
    bench.save()


if __name__ == "__main__":
    main()
