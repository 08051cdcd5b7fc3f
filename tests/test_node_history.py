"""A node's cost does not grow with its history: ended tasks leave memory, lists page, and
retention removes old tasks' records, logs and workspaces (real daemon, real RocksDB)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from agentnode.tasks import State, Task, TaskSpec, TaskStore
from conftest import run_cli
from support.node_daemon import Daemon, daemon
from test_node import call

pytestmark = [pytest.mark.root, pytest.mark.slow]

HOUR = 3600.0


def ended(
    store: TaskStore,
    *,
    tenant: str = "hist",
    outcome: State = State.SUCCEEDED,
    submitted: float | None = None,
    took: float = 1.0,
) -> Task:
    """An ended task as the node would have recorded it."""
    at = time.time() - 60 if submitted is None else submitted
    t = Task(
        id=uuid.uuid4().hex,
        seq=store.next_seq(),
        spec=TaskSpec(tenant=tenant, command=("true",)),
        history=((State.QUEUED.value, at),),
    )
    t = t.moved(State.STARTING, at).moved(State.RUNNING, at)
    return t.moved(outcome, at + took, exit_code=0 if outcome is State.SUCCEEDED else 1)


@contextlib.contextmanager
def history(root: Path) -> Iterator[TaskStore]:
    """The task store of a daemon not running yet at `root`, to write a history into."""
    store = TaskStore(root / "data" / "tasks")
    store.load()
    try:
        yield store
    finally:
        store.close()


def put(store: TaskStore, tasks: list[Task]) -> None:
    for i in range(0, len(tasks), 1000):
        store.put_now(*tasks[i : i + 1000])


def make_history(root: Path, n: int, **kw: Any) -> list[Task]:
    with history(root) as store:
        tasks = [ended(store, **kw) for _ in range(n)]
        put(store, tasks)
    return tasks


def rss(d: Daemon) -> int:
    return int(psutil.Process(d.pid).memory_info().rss)


def live_latency(d: Daemon, rounds: int = 20) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        d.client.call("GET", "/v1/tasks")
        best = min(best, time.perf_counter() - t0)
    return best


def walk(d: Daemon, query: str, *, limit: int = 100) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        extra = f"&cursor={cursor}" if cursor else ""
        page = d.client.call("GET", f"/v1/tasks?{query}&limit={limit}{extra}")
        assert len(page["tasks"]) <= limit
        out += page["tasks"]
        cursor = page["next_cursor"]
        if cursor is None:
            return out


def test_ended_tasks_leave_memory_and_the_live_list(tmp_path: Path) -> None:
    with daemon(tmp_path / "empty") as d:
        d.wait(d.submit(["true"])["id"])
        base_rss, base_list = rss(d), live_latency(d)
    make_history(tmp_path / "full", 20_000)
    with daemon(tmp_path / "full") as d:
        real = [d.submit(["true"])["id"] for _ in range(5)]
        for tid in real:
            d.wait(tid)
        gate = d.submit(["sleep", "30"])
        d.wait(gate["id"], states=("running",))
        live = d.client.call("GET", "/v1/tasks")
        assert [t["id"] for t in live] == [gate["id"]], "the live list holds live tasks only"
        full_rss, full_list = rss(d), live_latency(d)
        # Ended tasks are read back from the store when asked for.
        assert d.task(real[0])["state"] == "succeeded"
        assert d.client.call("GET", "/v1/tasks?all=1&limit=1")["tasks"][0]["state"] == "succeeded"
    # 20,000 ended tasks held in memory cost ~120 MiB before; now the daemon's size is its own.
    assert full_rss < base_rss * 1.2 + (8 << 20), (base_rss >> 20, full_rss >> 20)
    assert full_list < max(base_list * 1.5, 0.01), (base_list, full_list)


def test_paging_walks_every_task_once_while_tasks_arrive(tmp_path: Path) -> None:
    old = make_history(tmp_path, 2500)
    with daemon(tmp_path) as d:
        seen: list[str] = []
        arrived: list[str] = []
        cursor = None
        while True:
            extra = f"&cursor={cursor}" if cursor else ""
            page = d.client.call("GET", f"/v1/tasks?all=1&limit=100{extra}")
            seen += [t["id"] for t in page["tasks"]]
            if len(arrived) < 8:  # new tasks during the walk come after the cursor
                arrived.append(d.submit(["true"])["id"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert len(seen) == len(set(seen)), "no task twice"
        assert set(seen) == {t.id for t in old} | set(arrived), "every task once"
        assert seen[: len(old)] == [t.id for t in old], "in submission order"
        # The bare form (no paging params) is the first 1000 and says where the rest starts.
        status, bare = call(d, "GET", "/v1/tasks?all=1")
        assert status == 200 and len(bare) == 1000
        cursor = d.client.call("GET", "/v1/tasks?all=1&limit=1000")["next_cursor"]
        rest = d.client.call("GET", f"/v1/tasks?all=1&limit=1000&cursor={cursor}")
        assert rest["tasks"][0]["id"] == old[1000].id
        # A page of 100 from the history is quick.
        t0 = time.perf_counter()
        for _ in range(10):
            d.client.call("GET", f"/v1/tasks?all=1&limit=100&cursor={cursor}")
        assert (time.perf_counter() - t0) / 10 < 0.05
        # The CLI pages through all of them, or stops at --limit.
        sock = ["--socket", str(d.socket)]
        r = run_cli(["ps", "--all", *sock])
        assert r.returncode == 0 and len(r.stdout.splitlines()) == 1 + len(seen), r.stderr
        r = run_cli(["ps", "--all", "--limit", "1500", *sock])
        assert len(r.stdout.splitlines()) == 1 + 1500
        assert old[1499].id[:12] in r.stdout and old[1500].id[:12] not in r.stdout


def test_filters_by_tenant_state_and_time(tmp_path: Path) -> None:
    now = time.time()
    with history(tmp_path) as store:
        tasks = [
            ended(
                store,
                tenant=("a", "b")[i % 2],
                outcome=(State.SUCCEEDED, State.FAILED, State.CANCELLED)[i % 3],
                submitted=now - 1000 + i,
            )
            for i in range(600)
        ]
        put(store, tasks)
    with daemon(tmp_path) as d:
        live = d.submit(["sleep", "30"], tenant="a")
        d.wait(live["id"], states=("running",))

        def ids(query: str, *, limit: int = 100) -> list[str]:
            return [t["id"] for t in walk(d, query, limit=limit)]

        def want(keep: Any) -> list[str]:
            return [t.id for t in tasks if keep(t)]

        assert ids("all=1&tenant=b") == want(lambda t: t.spec.tenant == "b")
        assert ids("state=failed", limit=7) == want(lambda t: t.state is State.FAILED)
        assert ids("all=1&tenant=a&state=cancelled") == want(
            lambda t: t.spec.tenant == "a" and t.state is State.CANCELLED
        )
        since, until = now - 1000 + 100, now - 1000 + 250
        assert ids(f"all=1&since={since}&until={until}") == want(
            lambda t: since <= t.history[0][1] < until
        )
        # Live filters come from memory: the running task, and none of the history.
        assert ids("tenant=a") == [live["id"]]
        assert ids("state=running") == [live["id"]]
        assert ids("tenant=b") == []
        everything = ids("all=1&tenant=a")
        assert everything[-1] == live["id"] and len(everything) == 301


def test_bad_paging_input_is_a_400_naming_the_field(tmp_path: Path) -> None:
    make_history(tmp_path, 10)
    with daemon(tmp_path) as d:
        for query, field in [
            ("limit=0", "limit"),
            ("limit=-1", "limit"),
            ("limit=abc", "limit"),
            ("limit=1001", "limit"),
            ("limit=1e3", "limit"),
            ("all=1&cursor=garbage", "cursor"),
            ("cursor=YzEuLTE", "cursor"),  # "c1.-1"
            ("cursor=", "cursor"),
            ("all=1&since=yesterday", "since"),
            ("until=nan", "until"),
            ("since=-5", "since"),
            ("all=maybe", "all"),
            ("state=done", "state"),
        ]:
            status, err = call(d, "GET", f"/v1/tasks?{query}")
            assert status == 400 and err["field"] == field, (query, status, err)
            assert field in err["error"] or err["field"] == field
        # A cursor from one filter may be reused with another: it is a position, not a query.
        first = d.client.call("GET", "/v1/tasks?all=1&limit=3")
        more = d.client.call("GET", f"/v1/tasks?all=1&limit=100&cursor={first['next_cursor']}")
        assert len(first["tasks"]) + len(more["tasks"]) == 10 and more["next_cursor"] is None


def test_retention_removes_old_tasks_and_keeps_recent_and_running(tmp_path: Path) -> None:
    now = time.time()
    with history(tmp_path) as store:
        old_ok = [ended(store, submitted=now - 3 * HOUR) for _ in range(300)]
        old_failed = [
            ended(store, outcome=State.FAILED, submitted=now - 3 * HOUR) for _ in range(5)
        ]
        recent = [ended(store, submitted=now - 60) for _ in range(5)]
        put(store, [*old_ok, *old_failed, *recent])
    data = tmp_path / "data"
    for t in [*old_ok, *old_failed, *recent]:
        (data / "workspaces" / t.id / "sub").mkdir(parents=True)
        (data / "workspaces" / t.id / "sub" / "out.txt").write_text("x")
        (data / "logs").mkdir(exist_ok=True)
        (data / "logs" / f"{t.id}.1.log").write_text("log")
        (data / "logs" / f"{t.id}.1.log.1").write_text("rotated")
    (data / "tasks" / "checkpoints" / old_ok[0].id).write_bytes(b"state")
    config = '[retention]\nended = "1h"\nfailed = "1d"\ninterval = "1h"\n'
    with daemon(tmp_path, config) as d:
        running = d.submit(["sleep", "30"])
        d.wait(running["id"], states=("running",))
        fresh = d.submit(["true"])
        d.wait(fresh["id"])
        r = run_cli(["gc", "--socket", str(d.socket)])
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == "removed 300 ended tasks (records, logs and workspaces)"
        for t in old_ok:
            assert not (data / "workspaces" / t.id).exists()
            assert not list((data / "logs").glob(f"{t.id}.*"))
            status, err = call(d, "GET", f"/v1/tasks/{t.id}")
            assert status == 404, err
        assert not (data / "tasks" / "checkpoints" / old_ok[0].id).exists()
        kept = [*old_failed, *recent]
        for t in kept:
            assert (data / "workspaces" / t.id / "sub" / "out.txt").exists()
            assert (data / "logs" / f"{t.id}.1.log").exists()
            assert d.task(t.id)["state"] == t.state.value
        assert d.task(running["id"])["state"] == "running"
        assert (data / "workspaces" / fresh["id"]).is_dir()
        listed = {t["id"] for t in walk(d, "all=1")}
        assert listed == {t.id for t in kept} | {running["id"], fresh["id"]}
    # A restart after gc finds a consistent store; a second gc has nothing to do.
    with daemon(tmp_path, config) as d:
        assert d.task(fresh["id"])["state"] == "succeeded"
        listed2 = {t["id"] for t in walk(d, "all=1")}
        assert listed2 == listed
        assert call(d, "POST", "/v1/gc") == (200, {"removed": 0})


def test_retention_config_is_checked(tmp_path: Path) -> None:
    for text, problem in [
        ('[retention]\nended = "soon"\n', "retention.ended"),
        ("[retention]\nfailed = -1\n", "retention.failed"),
        ('[retention]\nkeep = "1d"\n', "retention.keep"),
    ]:
        (tmp_path / "bad.toml").write_text(text)
        r = run_cli(["run", "--config", str(tmp_path / "bad.toml"), "--data-dir",
                     str(tmp_path / "d"), "--socket", str(tmp_path / "s.sock")])  # fmt: skip
        assert r.returncode == 1 and problem in r.stderr, (text, r.returncode, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


def test_the_background_sweep_runs_by_itself_while_tasks_start(tmp_path: Path) -> None:
    old = make_history(tmp_path, 1500, submitted=time.time() - 3 * HOUR)
    config = '[retention]\nended = "1h"\ninterval = "1s"\n'
    with daemon(tmp_path, config) as d:
        started = [d.submit(["true"])["id"] for _ in range(10)]
        for tid in started:
            assert d.wait(tid)["state"] == "succeeded"
        deadline = time.monotonic() + 30
        while call(d, "GET", f"/v1/tasks/{old[-1].id}")[0] != 404:
            assert time.monotonic() < deadline, "the background sweep did not run"
            time.sleep(0.2)
        assert {t["id"] for t in walk(d, "all=1")} == set(started), "recent ones kept"
        assert all(call(d, "GET", f"/v1/tasks/{t.id}")[0] == 404 for t in old[:20])
