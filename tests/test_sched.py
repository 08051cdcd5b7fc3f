"""The Rust scheduler through _native.Scheduler: properties, fairness, priority, limits, errors."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agentnode._native import Scheduler
from agentnode.errors import SchedulerError

CLASSES = ["critical", "high", "normal", "low", "batch"]
BIG = 1 << 62

tasks_st = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(CLASSES)), max_size=200
)


@settings(max_examples=150, deadline=None)
@given(tasks=tasks_st)
def test_no_loss_no_duplication_and_class_order(tasks: list[tuple[str, str]]) -> None:
    s = Scheduler()
    s.push_many([(i, t, c, 1, 1) for i, (t, c) in enumerate(tasks)])
    out = s.pop_many(len(tasks) + 5, BIG, BIG)
    assert sorted(out) == list(range(len(tasks)))
    ranks = [CLASSES.index(tasks[i][1]) for i in out]
    assert ranks == sorted(ranks), "without aging, classes pop in strict priority order"
    assert s.queued == 0 and s.running == len(tasks)


@settings(max_examples=100, deadline=None)
@given(
    tasks=tasks_st,
    tenant_limit=st.integers(1, 4),
    class_limit=st.integers(1, 6),
    steps=st.integers(1, 50),
)
def test_caps_respected(
    tasks: list[tuple[str, str]], tenant_limit: int, class_limit: int, steps: int
) -> None:
    s = Scheduler(tenant_limit=tenant_limit, class_limits={"normal": class_limit}, aging=3)
    s.push_many([(i, t, c, 1, 1) for i, (t, c) in enumerate(tasks)])
    running: set[int] = set()
    done: list[int] = []
    for step in range(steps):
        for i in s.pop_many(3, BIG, BIG):
            assert i not in running and i not in done
            running.add(i)
        per_tenant = Counter(tasks[i][0] for i in running)
        assert max(per_tenant.values(), default=0) <= tenant_limit
        assert sum(1 for i in running if tasks[i][1] == "normal") <= class_limit
        if running and step % 2:
            i = min(running)
            s.complete(i)
            running.discard(i)
            done.append(i)
    assert s.running == len(running)


@settings(max_examples=60, deadline=None)
@given(wa=st.integers(1, 5), wb=st.integers(1, 5))
def test_weight_shares_within_tolerance(wa: int, wb: int) -> None:
    s = Scheduler()
    s.set_tenant("a", weight=wa)
    s.set_tenant("b", weight=wb)
    s.push_many([(i, "a", "normal", 1, 1) for i in range(2000)])
    s.push_many([(10_000 + i, "b", "normal", 1, 1) for i in range(2000)])
    got = s.pop_many(600, BIG, BIG)
    share = sum(1 for i in got if i < 10_000) / len(got)
    assert abs(share - wa / (wa + wb)) <= 0.02


def simulate(weight_a: int, weight_b: int) -> float:
    """Two tenants, b submits 100x more; 4 slots; returns a's share of completed slots."""
    s = Scheduler(aging=0)
    s.set_tenant("a", weight=weight_a)
    s.set_tenant("b", weight=weight_b)
    s.push_many([(i, "a", "normal", 1000, 1) for i in range(500)])
    s.push_many([(100_000 + i, "b", "normal", 1000, 1) for i in range(50_000)])
    running: list[int] = []
    completed: list[int] = []
    while len(completed) < 200:
        running += s.pop_many(4, (4 - len(running)) * 1000, BIG)
        finished = running.pop(0)
        s.complete(finished)
        completed.append(finished)
    return sum(1 for i in completed if i < 100_000) / len(completed)


@pytest.mark.parametrize(("wa", "wb", "want"), [(1, 1, 0.5), (3, 1, 0.75)])
def test_fairness_simulation(wa: int, wb: int, want: float) -> None:
    assert abs(simulate(wa, wb) - want) <= 0.05


def test_critical_behind_a_thousand_batch_pops_next() -> None:
    s = Scheduler(aging=8)
    s.push_many([(i, "bulk", "batch", 1, 1) for i in range(1000)])
    s.pop_many(5, BIG, BIG)
    s.push(99_999, "ops", "critical", 1, 1)
    assert s.pop(BIG, BIG) == 99_999


def test_aging_lets_batch_through() -> None:
    s = Scheduler(aging=10)
    s.push(0, "b", "batch")
    s.push_many([(i, "a", "high", 0, 0) for i in range(1, 100)])
    assert s.pop_many(100, BIG, BIG).index(0) == 10


def test_capacity_admission_and_backfill() -> None:
    s = Scheduler()
    s.push(1, "a", "high", 4000, 1 << 30)
    s.push(2, "a", "low", 500, 1 << 20)
    assert s.pop(1000, 1 << 31) == 2
    assert s.pop(1000, 1 << 31) is None
    assert s.pop(4000, 1 << 29) is None
    assert s.pop_many(5, 4000, 1 << 30) == [1]


def test_concurrent_threads_lose_nothing() -> None:
    s = Scheduler()
    popped: list[list[int]] = [[] for _ in range(4)]

    def worker(k: int) -> None:
        for j in range(2000):
            s.push(k * 10_000 + j, f"t{k}", CLASSES[j % 5], 1, 1)
            got = s.pop(BIG, BIG)
            if got is not None:
                popped[k].append(got)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rest = s.pop_many(10**6, BIG, BIG)
    everything = [i for p in popped for i in p] + rest
    assert len(everything) == len(set(everything)) == 8000


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda s: s.push(1, "a", "urgent"), "unknown priority class"),
        (lambda s: s.push(0, "a", "normal"), "already queued"),
        (lambda s: s.push(2, "", "normal"), "tenant name"),
        (lambda s: s.set_tenant("a", weight=0), "weight"),
        (lambda s: s.cancel(77), "not queued"),
        (lambda s: s.complete(0), "not running"),
        (lambda s: s.push_many([(5, "a", "low", 1, 1), (0, "a", "low", 1, 1)]), "already queued"),
        (lambda s: Scheduler(class_limits={"vip": 1}), "unknown priority class"),
    ],
)
def test_bad_input(call: object, message: str) -> None:
    s = Scheduler()
    s.push(0, "a", "normal")
    with pytest.raises(SchedulerError, match=message):
        call(s)  # type: ignore[operator]
    assert s.queued == 1, "a rejected call changes nothing"


def test_negative_id_is_rejected() -> None:
    with pytest.raises(OverflowError):
        Scheduler().push(-1, "a", "normal")


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ([(1, "a", "low", 1)], r"\(id, tenant, class, cpu, mem\) tuples, got \(1, 'a', 'low', 1\)"),
        ([[1, "a", "low", 1, 1]], "tuples, got"),
        ([(1, 7, "low", 1, 1)], "tenant must be a str, got 7"),
        ([(1, "a", None, 1, 1)], "class must be a str, got None"),
        ([(1, "a", "low", 1, 1), (2, "a", "vip", 1, 1)], "unknown priority class"),
        ([(1, "a", "low", 1, 1), (2, "", "low", 1, 1)], "tenant name"),
    ],
)
def test_push_many_bad_tuples_name_the_problem_and_change_nothing(
    batch: list[object], message: str
) -> None:
    s = Scheduler()
    with pytest.raises((TypeError, SchedulerError), match=message):
        s.push_many(batch)  # type: ignore[arg-type]
    assert s.queued == 0


def test_push_many_knows_tenants_by_name_not_by_object() -> None:
    """Equal names from different str objects (decoded records), more tenants than the batch
    remembers by identity, and a generator: every task lands with its own tenant."""
    s = Scheduler()
    s.set_tenant("t1", weight=3)
    names = [f"t{i % 40}" for i in range(4000)]  # 40 tenants, one str object per task
    s.push_many((i, "".join(name), "normal", 1, 1) for i, name in enumerate(names))
    assert s.queued == 4000
    # Fair share over 420 pops: 10 for each tenant of weight 1, 30 for t1 (weight 3).
    got = Counter(names[i] for i in s.pop_many(420, BIG, BIG))
    assert 29 <= got.pop("t1") <= 31
    assert len(got) == 39 and all(9 <= n <= 11 for n in got.values()), got


def test_cancelled_tasks_are_skipped_in_order() -> None:
    s = Scheduler()
    s.push_many([(i, "a", "normal", 1, 1) for i in range(6)])
    for i in (1, 2, 4):
        s.cancel(i)
    s.push(2, "a", "normal")  # a cancelled id queued again goes to the back
    assert s.pop_many(10, BIG, BIG) == [0, 3, 5, 2]
