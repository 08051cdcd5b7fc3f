"""The task lifecycle: durable submit, scheduling, transitions, retries, caps and recovery.

Every transition is written to the store before the call returns, so whatever a caller
acknowledges survives a crash. The in-memory state changes before the write is awaited (and is
rolled back if it fails), so concurrent calls on one event loop see each other's moves and a
second cancel, start or finish of the same task is refused rather than applied twice. Queued
tasks are fed to the Rust scheduler by their submission sequence number; a retried task waits in
a delay heap until its backoff has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from operator import attrgetter
from pathlib import Path
from typing import Any

from agentnode._native import Scheduler
from agentnode.errors import QueueFullError, TaskError
from agentnode.tasks.model import CLASSES, TERMINAL, State, Task, TaskSpec
from agentnode.tasks.retry import RetryPolicy
from agentnode.tasks.store import (
    Queued,
    SubmitKey,
    TaskStore,
    body,
    body_of,
    decode,
    lane_of,
    queued_of,
    seq_of,
    state_of,
)
from agentnode.tasks.tokens import TokenKey

__all__ = [
    "KEY_TTL_S",
    "LOST_REASON",
    "SCAN",
    "Limits",
    "Resolve",
    "TaskManager",
    "TaskTable",
    "lost_at_restart",
]

#: How many stored tasks one `TaskManager.page` call looks at, at most.
SCAN = 2_000

#: The outcomes kept for `failed` retention rather than `ended`.
_FAILED = frozenset({State.FAILED, State.TIMED_OUT, State.LOST})

#: How long a submit's idempotency key keeps returning the task it made (as Stripe's do).
KEY_TTL_S = 24 * 3600.0

log = logging.getLogger("agentnode.tasks")

#: Why a task found started at recovery, and not re-adopted, is lost.
LOST_REASON = "the node agent restarted while it ran"

#: How recovery settles a task it finds starting or running: None keeps it running (the node
#: re-adopted its process), else (outcome, reason, exit code) is recorded for it.
Resolve = Callable[[Task], "tuple[State, str, int | None] | None"]


def lost_at_restart(task: Task) -> tuple[State, str, int | None]:
    """The default `Resolve`: every task found started is lost."""
    return State.LOST, LOST_REASON, None


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Queue caps and scheduler limits (0: unlimited)."""

    tenant_queue_cap: int = 1000
    max_queued: int = 10_000
    tenant_running: int = 0
    class_running: tuple[tuple[str, int], ...] = ()
    aging: int = 64


class TaskTable(Mapping[str, Task]):
    """Every task by id. Live tasks (not ended) are held in memory; ended ones leave it once
    their last record is durable and are read from the store when asked for, so the daemon's
    memory and `live()` cost follow the live tasks, not the node's history. Records recovered
    from the store stay encoded until first read, so a restart with a long queue builds only
    the tasks that are used (started, shown, cancelled)."""

    def __init__(self, store: TaskStore, decode: Callable[[bytes], Task]) -> None:
        self._store = store
        self._decode = decode
        self._live: dict[str, Task | bytes] = {}

    def __getitem__(self, task_id: str) -> Task:
        t = self._live.get(task_id)
        if t is None:
            raw = self._store.get(task_id)
            if raw is None:
                raise KeyError(task_id)
            return self._decode(raw)
        if isinstance(t, bytes):
            # Replacing a present key's value keeps running iterations over the table valid.
            t = self._live[task_id] = self._decode(t)
        return t

    def __setitem__(self, task_id: str, task: Task) -> None:
        self._live[task_id] = task

    def settled(self, task: Task) -> None:
        """Lets `task` leave memory if it has ended and is still the version held (call once
        its record is durable)."""
        if task.state in TERMINAL and self._live.get(task.id) is task:
            del self._live[task.id]

    def raw(self, task_id: str) -> bytes | None:
        """The record of a live task not decoded yet (None once decoded)."""
        t = self._live.get(task_id)
        return t if isinstance(t, bytes) else None

    def add_encoded(self, records: dict[str, bytes]) -> None:
        """Adds live tasks by id as records to decode when first read."""
        self._live.update(records)

    def live(self) -> list[str]:
        """The ids of the tasks in memory: every live task (and ended ones whose last write is
        still in flight)."""
        return list(self._live)

    def is_live(self, task_id: str) -> bool:
        return task_id in self._live

    def __iter__(self) -> Iterator[str]:
        """Every task's id, the stored ended ones too (a walk of the store: for tests and
        tools, not for serving requests; `live` is what is cheap)."""
        live = set(self._live)
        yield from live
        after: int | None = 0
        while after is not None:
            page = self._store.page(after=after, limit=1024, match=_any, scan=1024)
            yield from (task_id for task_id, _ in page.records if task_id not in live)
            after = page.after

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, task_id: object) -> bool:
        return isinstance(task_id, str) and (
            task_id in self._live or self._store.get(task_id) is not None
        )


def _any(raw: bytes, submitted: float) -> bool:
    return True


def _readable(tasks: Mapping[str, Task], ids: Iterable[str]) -> Iterator[Task]:
    """The tasks of `ids` whose records can be read (the live version of a live one): one
    damaged record must not hide all the others (it is named on its own when asked for by
    id), and one removed meanwhile is skipped."""
    for task_id in ids:
        with contextlib.suppress(TaskError, KeyError):
            yield tasks[task_id]


class TaskManager:
    """Owns the store, the scheduler and every task's state. Use from one event loop."""

    def __init__(
        self,
        root: Path,
        *,
        limits: Limits | None = None,
        retry: RetryPolicy | None = None,
        sync: bool = False,
        resolve: Resolve = lost_at_restart,
    ) -> None:
        """Opens the store under `root` and recovers its tasks (see `_recover`); `resolve`
        settles each task found started (by default: lost)."""
        limits = limits or Limits()
        self.limits = limits
        self.retry = retry or RetryPolicy()
        self.store = TaskStore(root, sync=sync)
        self.tokens = TokenKey.load(root / "token.key")
        self.scheduler = Scheduler(
            tenant_limit=limits.tenant_running,
            class_limits=dict(limits.class_running),
            aging=limits.aging,
        )
        self.tasks = TaskTable(self.store, decode)
        self._by_seq: dict[int, str] = {}
        # Queued batch tasks' seqs: the candidates for shedding, found without reading tasks.
        self._batch: set[int] = set()
        self._depth: Counter[tuple[str, str]] = Counter()
        self._delayed: list[tuple[float, int]] = []
        self.recovered_lost: list[str] = []
        #: The tasks found running whose processes the node re-adopted (`resolve` kept them).
        self.adopted: list[str] = []
        self._resolve = resolve
        self._keys = self.store.load_keys(time.time() - KEY_TTL_S)
        # Keys whose submit is being written: a second submit with one waits for the first.
        self._keys_writing: dict[str, asyncio.Event] = {}
        # Tasks whose retry is being written: shown queued, but in the queue only once durable.
        self._requeueing: dict[str, asyncio.Event] = {}
        #: Queued tasks whose records could not be read when their turn came, with the error.
        self.unreadable: dict[str, str] = {}
        self._recover()

    def _recover(self) -> None:
        """Reloads every task. Queued ones re-enter the scheduler in submission order; ones that
        were starting or running when the last process died are settled by `resolve`: kept
        running (re-adopted), or ended (lost, by default, and may retry)."""
        # Recovery allocates a few objects per record and frees none: the cyclic collector
        # would rescan the growing heap again and again for nothing.
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._recover_records()
        finally:
            if was_enabled:
                gc.enable()

    def _recover_records(self) -> None:
        found = self.store.load()
        self.tasks.add_encoded(found.records)
        readable = []
        for i in found.interrupted:
            try:
                readable.append(self.tasks[i])
            except TaskError as e:
                # Not run again, and never a reason for the node not to start.
                self.unreadable[i] = str(e)
                log.error("task %s cannot be recovered: %s", i, e)
        interrupted = sorted(readable, key=attrgetter("seq"))
        now = time.time()
        writes, again, kept = [], [], []
        for t in interrupted:
            settled = self._resolve(t) if t.state is State.RUNNING else lost_at_restart(t)
            if settled is None:
                kept.append(t)
                continue
            outcome, reason, code = settled
            done = t.moved(outcome, now, reason=reason, exit_code=code, process=None)
            if outcome is State.LOST:
                self.recovered_lost.append(t.id)
            retry = self._retry_of(done, now)
            writes.append(done)
            if retry is not None:
                writes.append(retry)
                again.append(retry)
            self._set(retry or done)
        self._hold_running(kept)
        self._enqueue_entries(found.queued)
        if writes:
            self.store.put_now(*writes)
            self._settled(*writes)
        self._enqueue(*again)

    def _hold_running(self, tasks: list[Task]) -> None:
        """Counts re-adopted tasks as running in the scheduler (tenant and class limits), before
        any queued task is in it: each is queued and popped at once."""
        if not tasks:
            return
        self.scheduler.push_many([queued_of(t)[:5] for t in tasks])
        popped = set(self.scheduler.pop_many(len(tasks), 2**63, 2**63))
        for t in tasks:
            self.adopted.append(t.id)
            if t.seq not in popped:
                # Over a running limit lowered meanwhile: it runs on, uncounted.
                self.scheduler.cancel(t.seq)

    def _settled(self, *tasks: Task) -> None:
        for t in tasks:
            self.tasks.settled(t)

    def _set(self, t: Task) -> None:
        self.tasks[t.id] = t

    def _enqueue(self, *tasks: Task) -> None:
        self._enqueue_entries([queued_of(t) for t in tasks])

    def _enqueue_entries(self, entries: list[Queued]) -> None:
        now = time.time()
        ready = []
        for e in entries:
            seq, tenant, cls, _, _, task_id, not_before = e
            self._by_seq[seq] = task_id
            self._depth[cls, tenant] += 1
            if cls == "batch":
                self._batch.add(seq)
            if not_before > now:
                heapq.heappush(self._delayed, (not_before, seq))
            else:
                ready.append(e[:5])
        self.scheduler.push_many(ready)

    def _dequeued(self, t: Task) -> None:
        self._depth[t.spec.cls, t.spec.tenant] -= 1
        del self._by_seq[t.seq]
        self._batch.discard(t.seq)

    def get(self, task_id: str) -> Task:
        try:
            return self.tasks[task_id]
        except KeyError:
            raise TaskError(f"no task {task_id!r} (list tasks to see valid ids)") from None

    def page(
        self,
        *,
        after: int = 0,
        limit: int = 100,
        ended: bool = False,
        tenant: str | None = None,
        state: State | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> tuple[list[dict[str, Any]], int | None]:
        """Up to `limit` tasks after seq `after` in submission order that match the filters
        (`since`/`until`: submitted at or after / before), as their records' bodies
        (`agentnode.tasks.store.body_of`), and the seq to continue after (None: no more).
        Without `ended` (and with no ended `state`), only live tasks are looked at, from
        memory; otherwise the store is walked, `SCAN` tasks at most per call, so a page may be
        short (even empty) while a cursor still follows. Stored bodies are not built into
        tasks: a page of history costs a read and an unpack per task."""

        def keep(t: Task) -> bool:
            submitted = t.history[0][1] if t.history else 0.0
            return (
                (tenant is None or t.spec.tenant == tenant)
                and (state is None or t.state is state)
                and (since is None or submitted >= since)
                and (until is None or submitted < until)
            )

        if not ended and (state is None or state not in TERMINAL):
            live = sorted(
                (t for t in _readable(self.tasks, self.tasks.live()) if t.seq > after),
                key=attrgetter("seq"),
            )
            found = [t for t in live if t.state not in TERMINAL and keep(t)]
            more = len(found) > limit
            return [body_of(t) for t in found[:limit]], found[limit - 1].seq if more else None

        def match(raw: bytes, submitted: float) -> bool:
            return (
                (tenant is None or lane_of(raw)[1] == tenant)
                and (state is None or state_of(raw) is state)
                and (since is None or submitted >= since)
                and (until is None or submitted < until)
            )

        page = self.store.page(after=after, limit=limit, match=match, scan=SCAN)
        out = []
        for task_id, raw in page.records:
            # A damaged record must not hide the others (it is named when asked for by id).
            with contextlib.suppress(TaskError):
                # The live version of a live task: its last write may be in flight.
                out.append(
                    body_of(self.tasks[task_id]) if self.tasks.is_live(task_id) else body(raw)
                )
        return out, page.after

    async def sweep(
        self,
        *,
        ended_s: float,
        failed_s: float,
        remove_files: Callable[[list[str]], None],
        stop: Callable[[], bool] = lambda: False,
        batch: int = 256,
    ) -> int:
        """Removes the tasks that ended more than `failed_s` (failed, timed out, lost) or
        `ended_s` (succeeded, cancelled) ago: `remove_files` with their ids (called on a
        thread) first, then their records and checkpoints. Returns how many. The store is
        walked `batch` tasks at a time on a thread, so starts and API calls go on between
        batches; `stop()` is asked before each batch."""
        now = time.time()
        horizon = now - min(ended_s, failed_s)
        removed = 0
        after: int | None = 0

        def expired(raw: bytes, submitted: float) -> bool:
            # A task ends after it was submitted: a recent submission cannot have expired.
            if submitted >= horizon or state_of(raw) not in TERMINAL:
                return False
            try:
                t = decode(raw)
            except TaskError:
                return False  # a damaged record is kept for someone to look at
            keep = failed_s if t.state in _FAILED else ended_s
            return t.history[-1][1] < now - keep

        while after is not None and not stop():
            page = await asyncio.to_thread(
                self.store.page, after=after, limit=batch, match=expired, scan=batch
            )
            after = page.after
            # An ended task is never live again; this guards one whose last write is in flight.
            gone = [(i, seq_of(raw)) for i, raw in page.records if not self.tasks.is_live(i)]
            if gone:
                await asyncio.to_thread(remove_files, [i for i, _ in gone])
                self.store.remove(gone)
                removed += len(gone)
        return removed

    def queued_count(self, tenant: str | None = None) -> int:
        if tenant is None:
            return sum(self._depth.values())
        return sum(self._depth[cls, tenant] for cls in CLASSES)

    def queue_depth(self) -> dict[tuple[str, str], int]:
        """Queued tasks by (priority class, tenant), without reading any task."""
        return {key: n for key, n in self._depth.items() if n}

    async def submit_once(self, spec: TaskSpec, *, key: str, digest: str) -> tuple[Task, bool]:
        """`submit` under a client's idempotency key: (the new task, True), or (the task the key
        made within `KEY_TTL_S`, False), also across restarts and while that first submit is
        still being written. `digest` identifies the request: the same key with another request
        is a `TaskError`."""
        while (writing := self._keys_writing.get(key)) is not None:
            await writing.wait()
        first = self._keys.get(key)
        if first is not None and first.at >= time.time() - KEY_TTL_S:
            if first.digest != digest:
                raise TaskError(
                    f"Idempotency-Key {key!r} was used for another request (task "
                    f"{first.task_id}); send a new key for a new task"
                )
            return self.get(first.task_id), False
        writing = self._keys_writing[key] = asyncio.Event()
        try:
            task, _ = await self.submit(spec, key=(key, digest))
        finally:
            del self._keys_writing[key]
            writing.set()
        return task, True

    def _remember(self, k: SubmitKey) -> None:
        self._keys[k.key] = k
        # Dicts keep insertion order, which is time order: expired keys are at the front.
        if len(self._keys) % 1024 == 0:
            horizon = time.time() - KEY_TTL_S
            for old in [x for x, v in self._keys.items() if v.at < horizon]:
                del self._keys[old]

    async def submit(
        self, spec: TaskSpec, *, key: tuple[str, str] | None = None
    ) -> tuple[Task, str]:
        """Queues a task durably and returns it with its first attempt's bearer token; `key`
        (idempotency key, request digest) is stored with it (see `submit_once`).

        Raises `QueueFullError` when the tenant is at its cap, or when the node is at
        `max_queued` and no queued batch task can be shed to make room.
        """
        queued = self.queued_count(spec.tenant)
        if queued >= self.limits.tenant_queue_cap:
            raise QueueFullError(
                f"tenant {spec.tenant} has {queued} queued tasks, its cap "
                f"(retry later or raise tenant_queue_cap)"
            )
        victim = None
        if self.queued_count() >= self.limits.max_queued:
            victim = self._shed_victim(spec)
            if victim is None:
                raise QueueFullError(
                    f"the node has {self.queued_count()} queued tasks, its cap (retry later)"
                )
        now = time.time()
        shed = []
        if victim is not None:
            shed.append(victim.moved(State.CANCELLED, now, reason="shed under queue pressure"))
            self._drop_queued(shed[0])
        task = Task(
            id=uuid.uuid4().hex,
            seq=self.store.next_seq(),
            spec=spec,
            history=((State.QUEUED.value, now),),
        )
        stored = None if key is None else SubmitKey(key[0], task.id, now, key[1])
        # Hold the slot while the write is in flight, so concurrent submits see the cap.
        self._depth[spec.cls, spec.tenant] += 1
        try:
            await self.store.put(*shed, task, key=stored)
        except TaskError:
            if victim is not None:
                self._set(victim)
                self._enqueue(victim)
            raise
        finally:
            self._depth[spec.cls, spec.tenant] -= 1
        self._settled(*shed)
        self._set(task)
        self._enqueue(task)
        if stored is not None:
            self._remember(stored)
        return task, self.token_for(task)

    def _shed_victim(self, incoming: TaskSpec) -> Task | None:
        """The newest queued batch task, if the incoming task outranks batch."""
        if incoming.cls == "batch" or not self._batch:
            return None
        return self.tasks[self._by_seq[max(self._batch)]]

    def _drop_queued(self, cancelled: Task) -> None:
        old = self.tasks[cancelled.id]
        self._set(cancelled)
        self._dequeued(old)
        if not any(seq == old.seq for _, seq in self._delayed):
            self.scheduler.cancel(old.seq)
        else:
            self._delayed = [(d, s) for d, s in self._delayed if s != old.seq]
            heapq.heapify(self._delayed)

    async def next_tasks(
        self, n: int, *, free_cpu_millis: int, free_memory_bytes: int
    ) -> list[Task]:
        """Pops up to `n` tasks that fit the free capacity and marks them starting."""
        self._release_due()
        seqs = self.scheduler.pop_many(n, free_cpu_millis, free_memory_bytes)
        now = time.time()
        queued = []
        for seq in seqs:
            task_id = self._by_seq[seq]
            try:
                queued.append(self.tasks[task_id])
            except TaskError as e:
                # A record no longer readable (written by another version, or damaged) must not
                # hold up the tasks behind it: it leaves the queue, and stays in the store.
                self._drop_unreadable(seq, task_id, str(e))
        seqs = [t.seq for t in queued]
        started = [t.moved(State.STARTING, now) for t in queued]
        for t in started:
            self._dequeued(t)
            self._set(t)
        try:
            await self.store.put(*started)
        except TaskError:
            # Not durable, so not started: hand them back (at the end of their tenants' lanes).
            self.scheduler.complete_many(seqs)
            for t in queued:
                self._set(t)
            self._enqueue(*queued)
            raise
        return started

    def _drop_unreadable(self, seq: int, task_id: str, reason: str) -> None:
        self.scheduler.complete(seq)
        raw = self.tasks.raw(task_id)
        if raw is not None:
            self._depth[lane_of(raw)] -= 1
        del self._by_seq[seq]
        self._batch.discard(seq)
        self.unreadable[task_id] = reason
        log.error("task %s cannot be started: %s", task_id, reason)

    def _release_due(self) -> None:
        now = time.time()
        while self._delayed and self._delayed[0][0] <= now:
            _, seq = heapq.heappop(self._delayed)
            s = self.tasks[self._by_seq[seq]].spec
            self.scheduler.push(seq, s.tenant, s.cls, s.cpu_millis, s.memory_bytes)

    async def mark_running(self, task_id: str, *, process: tuple[int, int] | None = None) -> Task:
        """Records that a starting task's process runs: `process` (pid, start ticks) if the
        node's next start may re-adopt it, and its timeout's deadline."""
        old = self.get(task_id)
        now = time.time()
        running = old.moved(State.RUNNING, now, process=process, deadline=now + old.spec.timeout_s)
        return await self._replace(old, running)

    async def _replace(self, old: Task, t: Task) -> Task:
        """Puts `t` in place of `old`, durably; `old` again if the write fails."""
        # Visible before the await, so a concurrent call sees the new state and is refused.
        self._set(t)
        try:
            await self.store.put(t)
        except TaskError:
            self._set(old)
            raise
        return t

    async def set_egress(self, task_id: str, **rules: Any) -> Task:
        """Replaces a live task's egress rules and rates in its record (`rules`: `allow`,
        `allow_hosts`, `egress_rate`, `conn_rate`); a retry starts with them. `TaskError` when
        the task has ended, runs without network, or a rule is bad."""
        old = self.get(task_id)
        if old.state in TERMINAL:
            raise TaskError(f"task {task_id} is {old.state}; only a live task's egress can change")
        if old.spec.sandbox.network == "none":
            raise TaskError(
                f"task {task_id} runs with network none; egress rules apply to egress or host "
                "tasks (its network cannot change once submitted)"
            )
        sandbox = replace(old.spec.sandbox, **rules)  # SpecError names a bad rule
        return await self._replace(old, replace(old, spec=replace(old.spec, sandbox=sandbox)))

    async def finish(
        self, task_id: str, outcome: State, *, reason: str = "", exit_code: int | None = None
    ) -> Task:
        """Records a started task's outcome; a retryable outcome re-queues it after a backoff."""
        old = self.get(task_id)
        if outcome not in TERMINAL:
            raise TaskError(
                f"{outcome} is not an outcome (use succeeded, failed, timed_out, cancelled or lost)"
            )
        if old.state not in (State.STARTING, State.RUNNING):
            raise TaskError(
                f"task {task_id} is {old.state}, not started (use cancel for a queued task)"
            )
        now = time.time()
        done = old.moved(outcome, now, reason=reason, exit_code=exit_code, process=None)
        again = self._retry_of(done, now)
        self._set(again or done)
        written = asyncio.Event()
        if again is not None:
            self._requeueing[task_id] = written
        try:
            await self.store.put(*(x for x in (done, again) if x is not None))
        except TaskError:
            self._set(old)
            raise
        finally:
            self._requeueing.pop(task_id, None)
            written.set()
        self.scheduler.complete(old.seq)
        if again is not None:
            self._enqueue(again)
        else:
            self._settled(done)
        return again or done

    async def cancel(self, task_id: str) -> Task:
        """Cancels a queued task (a started one is cancelled by `finish(..., CANCELLED)`)."""
        if (retry := self._requeueing.get(task_id)) is not None:
            await retry.wait()  # it joins the queue (or stays started) once its record is written
        t = self.get(task_id)
        if t.state is not State.QUEUED:
            raise TaskError(
                f"task {task_id} is {t.state}, not queued (stop it, then finish it as cancelled)"
            )
        c = t.moved(State.CANCELLED, time.time(), reason="cancelled by request")
        self._drop_queued(c)
        try:
            await self.store.put(c)
        except TaskError:
            self._set(t)
            self._enqueue(t)
            raise
        self._settled(c)
        return c

    def _retry_of(self, done: Task, now: float) -> Task | None:
        if not self._should_retry(done):
            return None
        return replace(
            done.moved(State.QUEUED, now),
            attempt=done.attempt + 1,
            not_before=now + self.retry.delay(done.attempt),
        )

    def _should_retry(self, done: Task) -> bool:
        """The retry policy's answer, but for a lost attempt: lost to the node, not by its own
        fault, it runs once more (unless its spec opts out with `retry_lost` false, for work
        that must not run twice); a second loss goes by the policy."""
        if done.state is State.LOST:
            if not done.spec.retry_lost:
                return False
            if sum(1 for state, _ in done.history if state == State.LOST.value) == 1:
                return True
        return self.retry.should_retry(done.state, done.attempt, done.spec.retries)

    def token_for(self, task: Task) -> str:
        """The bearer token of `task`'s current attempt."""
        return self.tokens.issue(task.id, task.attempt)

    def task_of_token(self, token: str) -> Task | None:
        """The started task whose current attempt `token` belongs to (None: forged, unknown,
        of an earlier attempt, or of a task that is not running: a token is revoked when its
        attempt ends, and a retry gets a new one)."""
        found = self.tokens.verify(token)
        if found is None or not self.tasks.is_live(found[0]):  # an ended task is not in memory
            return None
        try:
            t = self.tasks.get(found[0])
        except TaskError:  # its record cannot be read: it cannot be running
            return None
        if t is None or t.attempt != found[1]:
            return None
        return t if t.state in (State.STARTING, State.RUNNING) else None

    def close(self) -> None:
        self.store.close()
