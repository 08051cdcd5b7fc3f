"""The durable task lifecycle: state machine, retries, tokens, store, caps, crash recovery."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import pytest
from rocksdict import Options, Rdict

from agentnode.compute import Gpu, gpus, inventory
from agentnode.errors import AgentnodeError, ConfigError, QueueFullError, TaskError
from agentnode.isolation import spec as sb
from agentnode.tasks import (
    CLASSES,
    TERMINAL,
    Limits,
    RetryPolicy,
    State,
    Task,
    TaskManager,
    TaskSpec,
    TaskStore,
    TokenKey,
)
from agentnode.tasks.model import AGENT_CPU_REQUEST, DEFAULT_CPUS, cpu_request, cpu_weight_for
from agentnode.tasks.store import decode, encode, queued_of
from agentnode.tasks.submission import BadField, spec_from_json

BIG = 1 << 62


def spec(tenant: str = "acme", cls: str = "normal", **kw: object) -> TaskSpec:
    return TaskSpec(tenant=tenant, command=("agent", "--run"), cls=cls, **kw)  # type: ignore[arg-type]


def test_state_machine_allows_only_legal_moves() -> None:
    t = Task(id="a1", seq=1, spec=spec())
    t = t.moved(State.STARTING, 1.0).moved(State.RUNNING, 2.0).moved(State.SUCCEEDED, 3.0)
    assert [s for s, _ in t.history] == ["starting", "running", "succeeded"]
    with pytest.raises(TaskError, match="cannot go from succeeded to queued"):
        t.moved(State.QUEUED, 4.0)
    with pytest.raises(TaskError, match="cannot go from queued to running"):
        Task(id="a2", seq=2, spec=spec()).moved(State.RUNNING, 1.0)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"tenant": "bad tenant"}, "invalid tenant"),
        ({"cls": "vip"}, "unknown priority class"),
        ({"sandbox": sb.Sandbox(limits=sb.Limits(cpus=4, memory=4 << 20))}, None),
        ({"heartbeat_s": -1.0}, "heartbeat"),
        ({"retries": 101}, "retries"),
    ],
)
def test_bad_spec(kw: dict[str, object], message: str | None) -> None:
    base: dict[str, object] = {"tenant": "acme", "command": ("x",)}
    if message is None:
        TaskSpec(**{**base, **kw})  # type: ignore[arg-type]
    else:
        with pytest.raises(AgentnodeError, match=message):
            TaskSpec(**{**base, **kw})  # type: ignore[arg-type]
    with pytest.raises(TaskError, match="command"):
        TaskSpec(tenant="acme", command=())


def test_spec_fills_the_node_defaults_it_reserves() -> None:
    s = spec()
    assert (s.cpu_millis, s.memory_bytes, s.timeout_s) == (1000, 512 << 20, 3600.0)
    s = spec(sandbox=sb.Sandbox(limits=sb.Limits(cpus=1.5, memory=3 << 30, timeout=12.5)))
    assert (s.cpu_millis, s.memory_bytes, s.timeout_s) == (1500, 3 << 30, 12.5)


def test_record_keeps_every_field() -> None:
    full = TaskSpec(
        tenant="acme.lab",
        command=("agent", "--run", "ü"),
        cls="critical",
        heartbeat_s=2.0,
        retries=3,
        sandbox=sb.Sandbox(
            limits=sb.Limits(
                cpus=1.5,
                memory=3 << 30,
                timeout=12.5,
                pids=64,
                cpu_weight=200,
                memory_high=1 << 30,
                swap=1,
                tmp_size=1 << 20,
                nofile=4096,
            ),
            env=(("A", "1"), ("B", "")),
            uid=1000,
            gid=1001,
            mounts=(sb.Mount("/data", "/in"), sb.Mount("/out", "/out", writable=True)),
            userns=True,
            caps=("CAP_NET_RAW",),
            rootfs="/srv/root",
            cwd="/work",
            hostname="box",
            network="host",
            allow=("203.0.113.0/24:443",),
            allow_hosts=("api.example.com:443",),
            egress_rate="1MiB/s",
            conn_rate=20,
        ),
    )
    t = Task(id="a1", seq=7, spec=full, attempt=2, not_before=5.5, reason="r", exit_code=-3)
    t = t.moved(State.STARTING, 1.0).moved(State.RUNNING, 2.0).moved(State.FAILED, 3.0)
    assert decode(encode(t)) == t
    with pytest.raises(TaskError, match="damaged"):
        decode(encode(t)[:-3])


def test_store_scan_reads_headers_in_submission_order(tmp_path: Path) -> None:
    store = TaskStore(tmp_path)
    tasks = [
        Task(id=f"t{i}", seq=store.next_seq(), spec=spec(f"tenant{i % 2}", CLASSES[i % 5]))
        for i in range(12)
    ]
    tasks[3] = tasks[3].moved(State.CANCELLED, 1.0)
    tasks[4] = tasks[4].moved(State.STARTING, 1.0)
    tasks[5] = replace(tasks[5], not_before=99.5)
    tasks[6] = tasks[6].moved(State.STARTING, 1.0).moved(State.RUNNING, 2.0)
    store.put_now(*reversed(tasks))
    store.close()
    store = TaskStore(tmp_path)
    found = store.load()
    ended = store.get("t3")
    store.close()
    # Ended tasks stay in the store only: memory holds the live ones.
    live = {t.id: t for t in tasks if t.state not in TERMINAL}
    assert {i: decode(raw) for i, raw in found.records.items()} == live
    assert ended is not None and decode(ended) == tasks[3]
    assert found.queued == [queued_of(t) for t in tasks if t.state is State.QUEUED]
    assert sorted(found.interrupted) == ["t4", "t6"]


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b'{"id":"abc","seq":1}', r"t/abc in .* is in the JSON of an earlier development"),
        (b"\x09" + bytes(40), r"t/abc in .* is in an unknown format \(first byte 09"),
        (b"\x01" + bytes(10), r"t/abc in .* is damaged \(11 bytes\)"),
        (b"\x01\x00\x00\x02" + bytes(32) + b"\xff\xff", r"t/abc in .* is damaged"),
        (b"", r"an unknown format \(first byte missing"),
    ],
)
def test_unknown_record_format_is_refused_clearly(
    tmp_path: Path, record: bytes, message: str
) -> None:
    TaskStore(tmp_path).close()
    db = Rdict(str(tmp_path / "db"), Options(raw_mode=True))
    db[b"t/abc"] = record
    db.close()
    with pytest.raises(TaskError, match=message):
        TaskManager(tmp_path)


def test_a_lost_attempt_runs_once_more_unless_its_spec_opts_out(tmp_path: Path) -> None:
    async def lose(m: TaskManager, task_id: str) -> Task:
        [started] = await m.next_tasks(1, free_cpu_millis=BIG, free_memory_bytes=BIG)
        assert started.id == task_id
        await m.mark_running(task_id, process=(1, 1))
        assert m.get(task_id).process == (1, 1) and m.get(task_id).deadline is not None
        return await m.finish(task_id, State.LOST, reason="the node agent stopped")

    async def main() -> None:
        m = TaskManager(tmp_path, retry=RetryPolicy(max_attempts=1, base_s=0, max_s=0))
        again, _ = await m.submit(spec("a"))
        first = await lose(m, again.id)
        assert (first.state, first.attempt, first.process) == (State.QUEUED, 2, None)
        second = await lose(m, again.id)
        assert second.state is State.LOST, "a second loss goes by the retry policy"
        once, _ = await m.submit(replace(spec("b"), retry_lost=False))
        assert (await lose(m, once.id)).state is State.LOST, "opted out: never twice"
        m.close()

    asyncio.run(main())
    with pytest.raises(TaskError, match="retry_lost must be true or false"):
        replace(spec("c"), retry_lost="yes")  # type: ignore[arg-type]


def test_recovered_tasks_decode_on_first_read(tmp_path: Path) -> None:
    async def main() -> None:
        m = TaskManager(tmp_path, retry=RetryPolicy(max_attempts=1))
        done, _ = await m.submit(spec("a"))
        [started] = await m.next_tasks(1, free_cpu_millis=BIG, free_memory_bytes=BIG)
        await m.mark_running(started.id)
        done = await m.finish(done.id, State.SUCCEEDED)
        running, _ = await m.submit(replace(spec("b"), retry_lost=False))
        [started] = await m.next_tasks(1, free_cpu_millis=BIG, free_memory_bytes=BIG)
        await m.mark_running(started.id)
        queued = [(await m.submit(spec("c", cls)))[0] for cls in ("low", "high", "low")]
        m.close()

        m = TaskManager(tmp_path, retry=RetryPolicy(max_attempts=1))
        assert m.recovered_lost == [running.id] and m.get(running.id).state is State.LOST
        assert m.queue_depth() == {("low", "c"): 2, ("high", "c"): 1}
        assert m.queued_count("c") == 3 and m.queued_count() == 3
        # Every task is listed, and reading them all decodes them as the iteration goes.
        assert {t.id: t for t in m.tasks.values()} == {
            t.id: t for t in (done, *queued, m.get(running.id))
        }
        assert m.get(done.id) == done
        got = await m.next_tasks(5, free_cpu_millis=BIG, free_memory_bytes=BIG)
        assert [t.id for t in got] == [queued[1].id, queued[0].id, queued[2].id]
        assert m.queue_depth() == {}
        m.close()

    asyncio.run(main())


def test_retry_policy_backoff_and_outcomes() -> None:
    p = RetryPolicy(max_attempts=4, base_s=1.0, max_s=5.0, jitter=0.5)
    rng = random.Random(7)
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (9, 5.0)]:
        d = p.delay(attempt, rng=rng)
        assert cap * 0.5 <= d <= cap
    assert p.should_retry(State.FAILED, 3) and not p.should_retry(State.FAILED, 4)
    assert not p.should_retry(State.CANCELLED, 1)
    assert not RetryPolicy(retry_on=frozenset({State.LOST})).should_retry(State.TIMED_OUT, 1)
    with pytest.raises(TaskError, match="only failed"):
        RetryPolicy(retry_on=frozenset({State.SUCCEEDED}))
    with pytest.raises(TaskError, match="max_attempts"):
        RetryPolicy(max_attempts=0)


def test_tokens(tmp_path: Path) -> None:
    key = TokenKey.load(tmp_path / "k")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    token = key.issue("abc", 2)
    assert key.verify(token) == ("abc", 2)
    assert TokenKey.load(tmp_path / "k").verify(token) == ("abc", 2), "the key survives restarts"
    # Digits int() takes but a seq is not made of ('²', Arabic-Indic), and too many of them.
    # And a header's bytes that are not UTF-8, which aiohttp gives as lone surrogates.
    odd = ("abc.\u00b2.x", "abc.\u0663." + token[6:], "abc." + "9" * 5000 + ".x", token + "\udcb2")
    for forged in (token + "x", "abc.3" + token[5:], "abc", "", "abc.x.y", ".", *odd):
        assert key.verify(forged) is None, forged
    assert TokenKey(b"another key").verify(token) is None


def test_token_checks_remembered_are_the_same_checks() -> None:
    key = TokenKey(b"k" * 32)
    tokens = [key.issue(f"t{i}", i % 3) for i in range(5000)]  # past what it remembers
    for _ in range(2):  # the second time from memory (those it still holds)
        for i, token in enumerate(tokens):
            assert key.verify(token) == (f"t{i}", i % 3)
            # One character off, forged attempts and another key's: never found.
            assert key.verify(token[:-1] + ("0" if token[-1] != "0" else "1")) is None
            assert key.verify(token.replace(f".{i % 3}.", f".{i % 3 + 1}.", 1)) is None
    assert all(TokenKey(b"j" * 32).verify(token) is None for token in tokens[-10:])
    assert 0 < len(key._genuine) <= 4096, "bounded"


def test_lifecycle_retry_checkpoint_and_tokens(tmp_path: Path) -> None:
    async def main() -> None:
        m = TaskManager(
            tmp_path, retry=RetryPolicy(max_attempts=2, base_s=0.0, max_s=0.0), sync=True
        )
        task, token = await m.submit(spec())
        with pytest.raises(TaskError, match="not started"):
            await m.finish(task.id, State.CANCELLED)
        assert m.task_of_token(token) is None, "a queued task's token is not live yet"
        assert m.task_of_token("nope") is None
        [started] = await m.next_tasks(4, free_cpu_millis=BIG, free_memory_bytes=BIG)
        assert started.state is State.STARTING
        assert m.task_of_token(token) == started
        running = await m.mark_running(task.id)
        assert m.task_of_token(token) == running
        m.store.write_checkpoint(task.id, b"step 40")
        m.store.write_checkpoint(task.id, b"step 41")
        assert m.store.read_checkpoint(task.id) == b"step 41"
        assert m.store.read_checkpoint("other") is None
        (m.store.checkpoints / "deadbeef1234.tmp").write_bytes(b"half")
        again = await m.finish(task.id, State.FAILED, reason="exit 1")
        assert again.state is State.QUEUED and again.attempt == 2
        assert m.task_of_token(token) is None, "a retry gets a new token; the old one is dead"
        assert m.token_for(again) != token
        assert m.task_of_token(m.token_for(again)) is None, "live once the retry starts"
        given = m.store.checkpoint_file(task.id)
        assert given is not None and given.read_bytes() == b"step 41"
        assert m.store.checkpoint_file("other") is None
        [second] = await m.next_tasks(4, free_cpu_millis=BIG, free_memory_bytes=BIG)
        await m.mark_running(second.id)
        assert m.task_of_token(m.token_for(again)) is not None
        final = await m.finish(task.id, State.FAILED)
        assert m.task_of_token(m.token_for(again)) is None, "revoked when its attempt ends"
        assert final.state is State.FAILED and final.attempt == 2, "attempts are capped"
        states = [s for s, _ in final.history]
        assert states == [
            "queued",
            "starting",
            "running",
            "failed",
            "queued",
            "starting",
            "running",
            "failed",
        ]
        with pytest.raises(TaskError, match="cannot go from failed to running"):
            await m.mark_running(task.id)
        with pytest.raises(TaskError, match="no task"):
            m.get("zzz")
        with pytest.raises(TaskError, match="invalid task id"):
            m.store.checkpoint_path("../etc")
        m.close()
        reopened = TaskManager(tmp_path)
        assert reopened.get(task.id) == final
        assert sorted(p.name for p in reopened.store.checkpoints.iterdir()) == [task.id]
        reopened.close()

    asyncio.run(main())


def test_a_checkpoint_survives_kill_9_of_its_writer(tmp_path: Path) -> None:
    """A checkpoint is as durable as the task records: once written it survives `kill -9` of
    the process that wrote it (sync store or not); one from a data dir of the earlier file
    layout is still read, and the retention sweep removes both kinds."""
    for sync in (False, True):
        root = tmp_path / str(sync)
        code = (
            "import os, signal, sys\n"
            "from pathlib import Path\n"
            "from agentnode.tasks.store import TaskStore\n"
            f"s = TaskStore(Path({str(root)!r}), sync={sync})\n"
            "s.write_checkpoint('t1', b'step 1')\n"
            "s.write_checkpoint('t1', b'step 2')\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n"
        )
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
        assert run.returncode == -signal.SIGKILL, run.stderr
        store = TaskStore(root, sync=sync)
        assert store.read_checkpoint("t1") == b"step 2"
        given = store.checkpoint_file("t1")
        assert given is not None and given.read_bytes() == b"step 2"
        assert not list(store.checkpoints.glob("*.tmp"))
        store.checkpoint_path("t2").write_bytes(b"old layout")
        assert store.read_checkpoint("t2") == b"old layout"
        store.remove([("t1", 1), ("t2", 2)])
        assert store.read_checkpoint("t1") is None and store.read_checkpoint("t2") is None
        store.close()


def test_capacity_gates_next_tasks_and_cancel(tmp_path: Path) -> None:
    async def main() -> None:
        m = TaskManager(tmp_path, sync=False)
        big, _ = await m.submit(spec(sandbox=sb.Sandbox(limits=sb.Limits(cpus=4))))
        small, _ = await m.submit(spec(cls="low", sandbox=sb.Sandbox(limits=sb.Limits(cpus=0.5))))
        got = await m.next_tasks(4, free_cpu_millis=1000, free_memory_bytes=BIG)
        assert [t.id for t in got] == [small.id]
        cancelled = await m.cancel(big.id)
        assert cancelled.state is State.CANCELLED
        assert await m.next_tasks(4, free_cpu_millis=BIG, free_memory_bytes=BIG) == []
        with pytest.raises(TaskError, match="not queued"):
            await m.cancel(small.id)
        m.close()

    asyncio.run(main())


def test_tenant_cap_and_batch_shedding(tmp_path: Path) -> None:
    async def main() -> None:
        m = TaskManager(tmp_path, limits=Limits(tenant_queue_cap=3, max_queued=4), sync=False)
        for _ in range(3):
            await m.submit(spec("a", "batch"))
        with pytest.raises(QueueFullError, match="tenant a has 3 queued"):
            await m.submit(spec("a", "batch"))
        await m.submit(spec("b", "batch"))
        with pytest.raises(QueueFullError, match="the node has 4 queued"):
            await m.submit(spec("c", "batch"))
        urgent, _ = await m.submit(spec("c", "critical"))
        shed = [t for t in m.tasks.values() if t.state is State.CANCELLED]
        assert len(shed) == 1 and shed[0].spec.tenant == "b", "the newest batch task is shed"
        assert shed[0].reason == "shed under queue pressure"
        got = await m.next_tasks(10, free_cpu_millis=BIG, free_memory_bytes=BIG)
        assert got[0].id == urgent.id and len(got) == 4
        m.close()

    asyncio.run(main())


def test_backoff_delays_retry_and_cancel_reaches_delayed(tmp_path: Path) -> None:
    async def main() -> None:
        m = TaskManager(
            tmp_path, retry=RetryPolicy(max_attempts=3, base_s=0.2, max_s=0.2, jitter=0)
        )
        a, _ = await m.submit(spec())
        b, _ = await m.submit(spec())
        for t in await m.next_tasks(2, free_cpu_millis=BIG, free_memory_bytes=BIG):
            await m.mark_running(t.id)
            await m.finish(t.id, State.TIMED_OUT)
        with pytest.raises(TaskError, match="not an outcome"):
            await m.finish(a.id, State.QUEUED)
        assert m.get(a.id).not_before > time.time()
        assert await m.next_tasks(2, free_cpu_millis=BIG, free_memory_bytes=BIG) == []
        await m.cancel(b.id)
        await asyncio.sleep(0.25)
        got = await m.next_tasks(2, free_cpu_millis=BIG, free_memory_bytes=BIG)
        assert [t.id for t in got] == [a.id] and got[0].attempt == 2
        assert m.queued_count() == 0
        m.close()

    asyncio.run(main())


def test_concurrent_calls_see_each_other(tmp_path: Path) -> None:
    async def main() -> None:
        m = TaskManager(tmp_path, limits=Limits(tenant_queue_cap=5))
        results = await asyncio.gather(
            *(m.submit(spec()) for _ in range(8)), return_exceptions=True
        )
        assert sum(isinstance(r, QueueFullError) for r in results) == 3
        assert m.queued_count("acme") == 5
        [a, *_] = [r[0] for r in results if isinstance(r, tuple)]
        race = await asyncio.gather(
            m.cancel(a.id),
            m.next_tasks(5, free_cpu_millis=BIG, free_memory_bytes=BIG),
            return_exceptions=True,
        )
        started = race[1]
        assert isinstance(started, list) and a.id not in {t.id for t in started}
        assert m.get(a.id).state is State.CANCELLED and len(started) == 4
        t = started[0]
        await m.mark_running(t.id)
        twice = await asyncio.gather(
            m.finish(t.id, State.SUCCEEDED), m.finish(t.id, State.SUCCEEDED), return_exceptions=True
        )
        assert sum(isinstance(r, TaskError) for r in twice) == 1
        assert m.scheduler.running == 3
        m.close()

    asyncio.run(main())


def test_cancel_while_a_retry_is_being_written(tmp_path: Path) -> None:
    """A retry is shown queued while its record is written (found by schemathesis: a cancel
    in that window crashed with KeyError and left the scheduler failing on a cancelled task)."""

    async def main() -> None:
        m = TaskManager(tmp_path, retry=RetryPolicy(max_attempts=3, base_s=0.0, max_s=0.0))
        for delayed in (False, True):
            m.retry = RetryPolicy(max_attempts=3, base_s=5.0 * delayed, max_s=5.0, jitter=0)
            a, _ = await m.submit(spec())
            [t] = await m.next_tasks(1, free_cpu_millis=BIG, free_memory_bytes=BIG)
            await m.mark_running(t.id)
            finish = asyncio.ensure_future(m.finish(a.id, State.FAILED))
            await asyncio.sleep(0)  # finish is in its write; the retry shows queued
            assert m.get(a.id).state is State.QUEUED
            cancelled = await m.cancel(a.id)
            assert (await finish).attempt == 2
            assert cancelled.state is State.CANCELLED and m.get(a.id).state is State.CANCELLED
            assert m.queued_count() == 0
            assert await m.next_tasks(1, free_cpu_millis=BIG, free_memory_bytes=BIG) == []
        m.close()

    asyncio.run(main())


def test_failed_write_acknowledges_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        m = TaskManager(tmp_path)
        a, _ = await m.submit(spec())

        def disk_full(tasks: object) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(m.store, "_commit", disk_full)
        with pytest.raises(TaskError, match="No space left"):
            await m.next_tasks(1, free_cpu_millis=BIG, free_memory_bytes=BIG)
        with pytest.raises(TaskError, match="No space left"):
            await m.submit(spec())
        assert m.get(a.id).state is State.QUEUED and m.queued_count() == 1
        monkeypatch.undo()
        [started] = await m.next_tasks(1, free_cpu_millis=BIG, free_memory_bytes=BIG)
        assert started.id == a.id
        m.close()
        with pytest.raises(TaskError, match="closed"):
            await m.store.put(started)

    asyncio.run(main())


def test_puts_in_one_turn_share_one_write(tmp_path: Path) -> None:
    async def main() -> None:
        store = TaskStore(tmp_path)
        batches: list[int] = []
        commit = store._commit

        def counted(records: Iterable[tuple[bytes, bytes]]) -> None:
            batch = list(records)
            batches.append(sum(k.startswith(b"t/") for k, _ in batch))  # records, not index
            commit(batch)

        store._commit = counted  # type: ignore[method-assign]
        tasks = [Task(id=f"t{i}", seq=store.next_seq(), spec=spec()) for i in range(20)]
        await asyncio.gather(*(store.put(t) for t in tasks[:10]), store.put(*tasks[10:]))
        assert batches == [20]
        raw = store._db.get(b"t/t3")
        assert isinstance(raw, bytes) and decode(raw) == tasks[3], "written when put returns"
        await store.put(tasks[0])
        assert batches == [20, 1]
        store.close()

    asyncio.run(main())


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from agentnode.tasks import TaskManager, TaskSpec

    async def main():
        m = TaskManager(Path(sys.argv[1]))
        i = 0
        while True:
            t, _ = await m.submit(TaskSpec(tenant="t%d" % (i % 3), command=("x",)))
            print("queued", t.id, flush=True)
            if i % 4 == 3:
                for s in await m.next_tasks(1, free_cpu_millis=1 << 40, free_memory_bytes=1 << 40):
                    await m.mark_running(s.id)
                    print("running", s.id, flush=True)
            i += 1

    asyncio.run(main())
    """
)


def test_recovery_after_sigkill_mid_writes(tmp_path: Path) -> None:
    acked: list[tuple[str, str]] = []
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            while len(acked) < 300:
                line = proc.stdout.readline()
                assert line, "the writer died early"
                state, tid = line.split()
                acked.append((state, tid))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    async def check() -> None:
        m = TaskManager(tmp_path, retry=RetryPolicy(max_attempts=2, base_s=0.0, max_s=0.0))
        for _, tid in acked:
            assert tid in m.tasks, "an acknowledged task was lost"
        running = {tid for state, tid in acked if state == "running"}
        assert running <= set(m.recovered_lost)
        for tid in running:
            assert m.get(tid).state is State.QUEUED and m.get(tid).attempt == 2
        queued_order = [
            t.id
            for t in sorted(m.tasks.values(), key=lambda t: t.seq)
            if t.attempt == 1 and t.state is State.QUEUED
        ]
        acked_order = [
            tid for state, tid in acked if state == "queued" and tid in set(queued_order)
        ]
        assert queued_order[: len(acked_order)] == acked_order, "queued tasks keep submission order"
        popped = await m.next_tasks(10**6, free_cpu_millis=BIG, free_memory_bytes=BIG)
        assert len(popped) == len({t.id for t in popped}) == m.queued_count() + len(popped)
        per_tenant: dict[str, list[int]] = {}
        for t in popped:
            if t.attempt == 1:
                per_tenant.setdefault(t.spec.tenant, []).append(t.seq)
        assert all(seqs == sorted(seqs) for seqs in per_tenant.values())
        m.close()

    asyncio.run(check())


def test_inventory(tmp_path: Path) -> None:
    inv = inventory(reserve_cpu_millis=100, reserve_memory_bytes=1 << 20)
    assert inv.cpu_millis == len(os.sched_getaffinity(0)) * 1000
    assert inv.allocatable_cpu_millis == inv.cpu_millis - 100
    assert 0 < inv.allocatable_memory_bytes < inv.memory_bytes
    with pytest.raises(ConfigError, match="leaves nothing"):
        inventory(reserve_cpu_millis=10**9)
    with pytest.raises(ConfigError, match="negative"):
        inventory(reserve_memory_bytes=-1)
    fake = tmp_path / "gpus"
    (fake / "0000:01:00.0").mkdir(parents=True)
    (fake / "0000:01:00.0" / "information").write_text("Model: \t NVIDIA A100\nIRQ: 1\n")
    if not os.environ.get("PATH", "") or not any(
        Path(d, "nvidia-smi").exists() for d in os.environ["PATH"].split(":")
    ):
        assert gpus(proc=fake) == (Gpu(0, "NVIDIA A100", 0),)
    assert gpus(proc=tmp_path / "none") == () or Path("/proc/driver/nvidia").exists()


# -- CPU reservation and limit ------------------------------------------------------------------


def test_cpu_request_is_reserved_and_cpus_is_a_limit() -> None:
    plain = spec(sandbox=sb.Sandbox(limits=sb.Limits(cpus=2)))
    assert plain.cpu_request is None and plain.cpu_millis == 2000, "a command reserves its limit"
    assert spec().cpu_millis == round(DEFAULT_CPUS * 1000)
    agent = spec(agent="python")
    assert agent.sandbox.limits.cpus == DEFAULT_CPUS, "an agent's limit is the default"
    assert agent.cpu_millis == round(AGENT_CPU_REQUEST * 1000), "it reserves less than its limit"
    tiny = spec(agent="langgraph", sandbox=sb.Sandbox(limits=sb.Limits(cpus=0.05)))
    assert tiny.cpu_millis == 50, "never more than its limit"
    for kind in ("", "python", "openclaw"):
        given = spec(agent=kind, cpu_request=0.25)
        assert (given.cpu_request, given.cpu_millis) == (0.25, 250)
    assert spec(cpu_request=1).cpu_request == 1.0 and spec(cpu_request=0.01).cpu_millis == 10
    # A spec made from another keeps what was given, and an agent kind set later (as
    # `agents.kinds.prepare` does) changes the default, not a given reservation.
    assert replace(spec(), agent="python").cpu_millis == 100
    assert replace(spec(cpu_request=0.5), agent="python").cpu_millis == 500


@pytest.mark.parametrize(
    "value", [0, 0.001, -1, 1.5, 2000, float("nan"), float("inf"), True, "0.5", [0.5]]
)
def test_a_bad_cpu_request_is_refused_naming_it(value: object) -> None:
    with pytest.raises(TaskError, match=r"^cpu_request .*(out of range|must be a number)"):
        spec(cpu_request=value)  # the limit is the default, 1 CPU


def test_cpu_weight_follows_the_reservation() -> None:
    assert [cpu_weight_for(c) for c in (0.1, 0.5, 1.0, 2.5)] == [10, 50, 100, 250]
    assert cpu_weight_for(0.001) == 1 and cpu_weight_for(1000) == 10000, "the kernel's bounds"
    assert cpu_request(cpus=4.0, given=None, agent="") == 4.0
    assert cpu_request(cpus=4.0, given=None, agent="python") == AGENT_CPU_REQUEST
    assert cpu_request(cpus=4.0, given=3.0, agent="python") == 3.0


def test_cpu_request_survives_the_record_and_a_reopen(tmp_path: Path) -> None:
    given = Task(id="t1", seq=1, spec=spec(agent="python", cpu_request=0.3))
    assert decode(encode(given)) == given
    default = Task(id="t2", seq=2, spec=spec(agent="python"))
    assert decode(encode(default)).spec.cpu_request is None, "the default is not frozen in"
    assert queued_of(given)[3] == 300 and queued_of(default)[3] == 100

    async def main() -> None:
        m = TaskManager(tmp_path, sync=False)
        for _ in range(4):
            await m.submit(spec(agent="python", cpu_request=0.3))
        m.close()
        m = TaskManager(tmp_path, sync=False)  # the queue re-read from the records' headers
        got = await m.next_tasks(10, free_cpu_millis=1000, free_memory_bytes=BIG)
        assert len(got) == 3, "three 0.3-CPU reservations fit in 1 CPU"
        m.close()

    asyncio.run(main())


def test_admission_counts_reservations_not_limits(tmp_path: Path) -> None:
    async def main() -> None:
        m = TaskManager(tmp_path, sync=False)
        agents = [(await m.submit(spec(agent="python")))[0] for _ in range(12)]
        plain = [(await m.submit(spec(cls="low")))[0] for _ in range(2)]
        got = await m.next_tasks(20, free_cpu_millis=1000, free_memory_bytes=BIG)
        assert [t.id for t in got] == [t.id for t in agents[:10]], "ten 0.1-CPU reservations fit"
        got = await m.next_tasks(20, free_cpu_millis=1000, free_memory_bytes=BIG)
        assert [t.id for t in got] == [t.id for t in agents[10:]], "a 1-CPU one does not fit after"
        got = await m.next_tasks(20, free_cpu_millis=1000, free_memory_bytes=BIG)
        assert [t.id for t in got] == [plain[0].id]
        m.close()

    asyncio.run(main())


def test_submission_reads_cpu_request() -> None:
    body = {"command": ["true"], "cpus": 2, "cpu_request": 0.5}
    assert spec_from_json(body).cpu_millis == 500
    for bad in ("half", 3, 0, False):
        with pytest.raises(BadField) as e:
            spec_from_json({**body, "cpu_request": bad})
        assert e.value.field == "cpu_request", bad
