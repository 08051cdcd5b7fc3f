"""Scheduler push+pop throughput (each push and each pop is one operation): the Rust scheduler
from Python, one call per task and in batches, against a Python heapq fair queue with the same
semantics (priority classes, per-tenant weighted virtual time, FIFO per tenant, capacity fit)."""

from __future__ import annotations

import heapq
import statistics
import time
from collections import deque
from collections.abc import Callable

from _harness import Bench
from agentnode._native import Scheduler

CLASSES = ("critical", "high", "normal", "low", "batch")
TENANTS = tuple(f"t{i}" for i in range(8))
SCALE = 1 << 32
BIG = 1 << 62


class HeapqFairQueue:
    """The peer: start-time fair queuing per class in pure Python, one heap of tenant heads each.

    It has no concurrency limits and no aging (the bench configures neither for ours either).
    """

    def __init__(self) -> None:
        self.ready: list[list[tuple[int, int, str]]] = [[] for _ in CLASSES]
        self.clock = [0] * len(CLASSES)
        self.lanes: dict[tuple[str, int], deque[tuple[int, int, int]]] = {}
        self.finish: dict[tuple[str, int], int] = {}
        self.weight: dict[str, int] = {}
        self.seq = 0
        # Like ours: reject duplicate ids and remember what runs, so `complete` could free it.
        self.index: dict[int, bool] = {}

    def push(self, tid: int, tenant: str, cls: str, cpu: int, mem: int) -> None:
        if tid in self.index:
            raise ValueError(f"task {tid} is already queued or running")
        self.index[tid] = False
        c = CLASSES.index(cls)
        self.seq += 1
        lane = self.lanes.setdefault((tenant, c), deque())
        lane.append((tid, cpu, mem))
        if len(lane) == 1:
            tag = max(self.clock[c], self.finish.get((tenant, c), 0))
            heapq.heappush(self.ready[c], (tag, self.seq, tenant))

    def pop(self, free_cpu: int, free_mem: int) -> int | None:
        for c, ready in enumerate(self.ready):
            skipped = []
            found = None
            while ready:
                key = heapq.heappop(ready)
                tid, cpu, mem = self.lanes[(key[2], c)][0]
                if cpu <= free_cpu and mem <= free_mem:
                    found = key
                    break
                skipped.append(key)
            for k in skipped:
                heapq.heappush(ready, k)
            if found is None:
                continue
            tag, _, tenant = found
            lane = self.lanes[(tenant, c)]
            tid, _, _ = lane.popleft()
            self.index[tid] = True
            self.clock[c] = max(self.clock[c], tag)
            self.finish[(tenant, c)] = tag + SCALE // self.weight.get(tenant, 1)
            if lane:
                self.seq += 1
                heapq.heappush(
                    ready, (max(self.clock[c], self.finish[(tenant, c)]), self.seq, tenant)
                )
            return tid
        return None


# A task as the scheduler takes it: (id, tenant, class, cpu, memory).
Task = tuple[int, str, str, int, int]


def workload(n: int) -> list[Task]:
    return [(i, TENANTS[i % 8], CLASSES[i % 5], 1, 1) for i in range(n)]


def single(
    push: Callable[..., None], pop: Callable[[int, int], int | None], tasks: list[Task]
) -> float:
    t0 = time.perf_counter()
    for t in tasks:
        push(*t)
    while pop(BIG, BIG) is not None:
        pass
    return 2 * len(tasks) / (time.perf_counter() - t0)


def batched(tasks: list[tuple[int, str, str, int, int]], size: int) -> float:
    s = Scheduler()
    t0 = time.perf_counter()
    for i in range(0, len(tasks), size):
        s.push_many(tasks[i : i + size])
        s.pop_many(size, BIG, BIG)
    return 2 * len(tasks) / (time.perf_counter() - t0)


def main() -> None:
    bench = Bench.from_args("sched")
    n = 50_000 if bench.quick else 200_000
    rounds = 3 if bench.quick else 7
    tasks = workload(n)
    ours_single, ours_batch, peer = [], [], []
    for _ in range(rounds):
        s = Scheduler()
        ours_single.append(single(s.push, s.pop, tasks))
        ours_batch.append(batched(tasks, 1024))
        q = HeapqFairQueue()
        peer.append(single(q.push, q.pop, tasks))
    p = statistics.median(peer)
    peer_name = "Python heapq fair queue"
    for figure, ours in (("single_push_pop", ours_single), ("batched_1024_push_pop", ours_batch)):
        bench.record(figure, statistics.median(ours), p, "ops/s", peer_name=peer_name,
                     higher_is_better=True)  # fmt: skip
    bench.save()


if __name__ == "__main__":
    main()
