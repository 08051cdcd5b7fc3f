"""LangGraph persistence kept by the node: `AgentnodeStore` (a `BaseStore`) and
`AgentnodeCheckpointer` (a `BaseCheckpointSaver`), both over agentnode episodic memory.

Inside a task both need no arguments beyond a `Memory()`: it reaches the node through the task
socket with the task's own token, so the records are the task's tenant's and survive the task's
retries (they live under the task's id, which stays the same from one attempt to the next).

`AgentnodeStore`:
Mapping: a LangGraph namespace `("users", "alice")` is the episodic namespace `users:alice`
(labels use the episodic alphabet, no ':'), an item's key is the record id, and every item
lives under one task (`task=`, default "langgraph"), so ending that task expires them all.

Limits, on purpose for now:
- `search` lists and filters (namespace prefix, exact-match `filter`, offset/limit) without
  vectors; `query` is not used and `score` is None. Semantic search arrives with the vector index.
- TTL (minutes, as LangGraph counts) runs from the last write; reads do not refresh it.

`AgentnodeCheckpointer`: each thread is one episodic namespace (`lgcp:` + a digest of the thread
id) under one task (default `$AGENTNODE_TASK_ID`), holding one record per checkpoint, per
changed channel value (stored once per version, as LangGraph's own savers do), per checkpoint's
pending writes, and a pointer to the newest checkpoint of each checkpoint namespace. `get_tuple`
reads the pointer, the checkpoint with its writes, then every channel value, each in one round
trip over the memory socket (`Memory.get_many`; one request per record over HTTP); for the
newest checkpoint of a thread this saver wrote (it keeps the last `_NEWEST_KEPT` threads' whole,
as stored) only the pointer and the checkpoint's writes, the records that change, in one round
trip; `list` scans the thread (at most 10,000 records).

One write per super-step: a task's pending writes wait (up to `WRITES_WAIT_S`) for the
checkpoint that ends its super-step and are stored in that checkpoint's batch; `put_writes`
still returns only once they are stored, by that batch or by its own write when no checkpoint
came in time (a slower task of the same super-step; then that thread's next few writes do not
wait) or when they hold an error or interrupt (no checkpoint follows those).

A run's input checkpoint (`source: "input"`) is the one `put` that returns before its write:
LangGraph starts the run's first super-step without waiting for it (it waits for the checkpoint
that ends that super-step, after which both are stored, in one batch), so it goes with the
thread's next write, or is written by a flusher thread `INPUT_WAIT_S` after it came, or before
this saver reads anything: a run's first write per thread less, of one per super-step.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    MatchCondition,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
)

from agentnode.errors import NotFoundError
from agentnode.sdk.memory import Memory

__all__ = ["INPUT_WAIT_S", "WRITES_WAIT_S", "AgentnodeCheckpointer", "AgentnodeStore"]

#: How long a task's pending writes wait for the checkpoint that ends its super-step (LangGraph
#: makes it right after the super-step's last task), to be stored in one write with it.
WRITES_WAIT_S = 0.005
#: After a wait that no checkpoint ended, a thread's next writes are stored at once this many
#: times: a graph whose checkpoints wait for its writes (LangGraph's DeltaChannel) or whose
#: tasks finish far apart would otherwise pay the wait every super-step.
_UNWAITED_AFTER_MISS = 8

#: How long a run's input checkpoint waits to go with the first super-step's checkpoint
#: before the flusher thread writes it alone (LangGraph makes that one right after).
INPUT_WAIT_S = 0.05
#: How many checkpoints' pending writes the saver remembers (what it wrote need not be read).
_WRITES_KEPT = 4
#: How many threads' newest-checkpoint pointers it remembers (a forgotten one is read again).
_POINTERS_KEPT = 1024
#: How many threads' newest checkpoints it keeps whole (its record and its channel values, as
#: stored), so that the next run on a thread it wrote reads only what may have changed.
_NEWEST_KEPT = 16
#: Seconds the flusher thread outlives the last input checkpoint it waited to write: a saver
#: running graph after graph keeps one thread instead of starting one per run.
_FLUSHER_IDLE_S = 1.0
_SCAN_LIMIT = 10_000


def _ns(namespace: tuple[str, ...]) -> str:
    if not namespace or any(not label or ":" in label for label in namespace):
        raise InvalidNamespaceError(f"namespace {namespace!r} must be non-empty labels without ':'")
    return ":".join(namespace)


def _when(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _matches(namespace: tuple[str, ...], cond: MatchCondition) -> bool:
    path = tuple(cond.path)
    if len(path) > len(namespace):
        return False
    part = namespace[: len(path)] if cond.match_type == "prefix" else namespace[-len(path) :]
    return all(p in ("*", label) for p, label in zip(path, part, strict=True))


class AgentnodeStore(BaseStore):
    """A LangGraph store over `memory` (an `agentnode.sdk.Memory`), all items under `task`."""

    supports_ttl = True

    def __init__(self, memory: Memory, *, task: str = "langgraph") -> None:
        self._memory = memory
        self._task = task
        self._lock = threading.Lock()  # Memory is one connection: one request at a time

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        """Runs the operations in order against the memory API."""
        with self._lock:
            return [self._run(op) for op in ops]

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        """`batch` on a worker thread, so the event loop never waits on the network."""
        return await asyncio.to_thread(self.batch, list(ops))

    def _run(self, op: Op) -> Result:
        if isinstance(op, GetOp):
            return self._get(op.namespace, op.key)
        if isinstance(op, PutOp):
            self._put(op)
            return None
        if isinstance(op, SearchOp):
            return self._search(op)
        if isinstance(op, ListNamespacesOp):
            return self._list_namespaces(op)
        raise TypeError(f"unknown LangGraph store operation {type(op).__name__}")

    def _get(self, namespace: tuple[str, ...], key: str) -> Item | None:
        try:
            rec = self._memory.get(_ns(namespace), self._task, key)
        except NotFoundError:
            return None
        return self._item(namespace, rec)

    @staticmethod
    def _item(namespace: tuple[str, ...], rec: dict[str, Any]) -> Item:
        value, created = rec["value"]["value"], rec["value"]["created_ms"]
        return Item(
            value=value,
            key=rec["id"],
            namespace=namespace,
            created_at=_when(created),
            updated_at=_when(rec["created_ms"]),
        )

    def _put(self, op: PutOp) -> None:
        ns = _ns(op.namespace)
        existing = self._get(op.namespace, op.key)
        if op.value is None:
            if existing is not None:
                self._memory.delete(ns, self._task, op.key)
            return
        created = (
            int(existing.created_at.timestamp() * 1000)
            if existing is not None
            else int(datetime.now(tz=UTC).timestamp() * 1000)
        )
        ttl = op.ttl * 60 if op.ttl is not None else None
        self._memory.append(
            ns, self._task, {"value": dict(op.value), "created_ms": created}, id=op.key, ttl=ttl
        )

    def _namespaces(self) -> list[tuple[str, ...]]:
        return sorted(
            {tuple(ns.split(":")) for ns, task in self._memory.tasks() if task == self._task}
        )

    def _search(self, op: SearchOp) -> list[SearchItem]:
        prefix = tuple(op.namespace_prefix)
        found: list[SearchItem] = []
        for namespace in self._namespaces():
            if namespace[: len(prefix)] != prefix:
                continue
            try:
                records = self._memory.scan(
                    _ns(namespace), self._task, limit=_SCAN_LIMIT, newest_first=False
                )
            except NotFoundError:  # its last item expired since the listing
                continue
            for rec in records:
                item = self._item(namespace, rec)
                if op.filter and any(item.value.get(k) != v for k, v in op.filter.items()):
                    continue
                found.append(
                    SearchItem(namespace, item.key, item.value, item.created_at, item.updated_at)
                )
        return found[op.offset : op.offset + op.limit]

    def _list_namespaces(self, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        spaces = [
            ns
            for ns in self._namespaces()
            if all(_matches(ns, cond) for cond in op.match_conditions or ())
        ]
        if op.max_depth is not None:
            spaces = sorted({ns[: op.max_depth] for ns in spaces})
        return spaces[op.offset : op.offset + op.limit]


def _digest(text: object) -> str:
    # Thread ids, checkpoint namespaces and versions are free text; record ids and namespace
    # labels have a small alphabet. The originals are kept in the records' values.
    return _digest_of(str(text))


@functools.lru_cache(maxsize=4096)
def _digest_of(text: str) -> str:
    # A super-step digests the same few texts again and again (~90 digests a 3-step run: every
    # channel's name and current version at each put); a remembered one costs a dict lookup.
    return hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _picked(records: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    """The records of `ids` that `records` holds."""
    return {rid: records[rid] for rid in ids if rid in records}


def _thread_ns(thread_id: str) -> str:
    return "lgcp:" + _digest(thread_id)


class AgentnodeCheckpointer(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer over `memory` (default: a `Memory()` from the task's
    environment), all threads under `task` (default $AGENTNODE_TASK_ID, else "langgraph").

    Writes reach the node's RocksDB write-ahead log before `put` returns (no fsync, as the
    node's own task records: they survive the task's and the daemon's death, not the host's;
    a run's input checkpoint goes with the next write, see the module docstring), so a task
    killed mid-graph and retried resumes from its last completed super-step: call the graph
    with `None` as input when `get_tuple` finds a checkpoint for the thread.
    """

    def __init__(self, memory: Memory | None = None, *, task: str | None = None) -> None:
        super().__init__()
        self._memory = memory if memory is not None else Memory()
        self._task = task or os.environ.get("AGENTNODE_TASK_ID") or "langgraph"
        self._lock = threading.Lock()  # Memory is one connection: one request at a time
        # Pending writes not stored yet, by thread namespace and record id; notified when a
        # batch holding some of them has been written (or failed).
        self._queued: dict[str, dict[str, dict[str, Any]]] = {}
        self._stored = threading.Condition(self._lock)
        # Per thread namespace: how many more pending writes to store without waiting.
        self._unwaited: dict[str, int] = {}
        # What this saver last read or wrote of the newest-checkpoint pointers ("l.") and of
        # the pending writes ("w."), by record (None: known to be absent): saves a read per put
        # and per put_writes within a run (`get_tuple`, which starts each run, reads them
        # again); delete_thread forgets its entries. Both are bounded, oldest first out.
        self._pointers: dict[tuple[str, str], dict[str, Any] | None] = {}
        self._writes: dict[tuple[str, str], dict[str, Any] | None] = {}
        # The newest checkpoint this saver wrote of a few threads, by (thread namespace,
        # checkpoint namespace digest): its record and, by channel, the version and stored
        # value of its channels (by channel, not record id: a put keeps them without digests).
        self._newest: dict[
            tuple[str, str], tuple[dict[str, Any], dict[str, tuple[Any, dict[str, Any]]]]
        ] = {}
        # Thread namespaces whose queue holds an input checkpoint, with when it must be
        # written; the flusher thread (while one runs) writes it then, woken by `_holding`.
        self._held: dict[str, float] = {}
        self._holding = threading.Condition(self._lock)
        self._flusher: threading.Thread | None = None

    # -- records --------------------------------------------------------------------------------

    def _get(self, namespace: str, record_id: str) -> dict[str, Any] | None:
        try:
            value: dict[str, Any] = self._memory.get(namespace, self._task, record_id)["value"]
        except NotFoundError:
            return None
        return value

    def _cached(self, namespace: str, record_id: str) -> dict[str, Any] | None:
        """`_get` through what this saver remembers of the records it also writes (pointers
        and pending writes); the caller holds the lock."""
        key = (namespace, record_id)
        known = self._writes if record_id.startswith("w.") else self._pointers
        if key not in known:
            self._remember(key, self._get(namespace, record_id))
        return known[key]

    def _remember(self, key: tuple[str, str], value: dict[str, Any] | None) -> None:
        """Remembers a pointer or pending-writes record as stored (the caller holds the lock).
        Writes are added to the newest checkpoints only, but a step's writes may still land
        after the next checkpoint's put (LangGraph submits them to a thread pool): the last
        few checkpoints' writes are kept, not just the newest one's."""
        known, kept = (
            (self._writes, _WRITES_KEPT) if key[1].startswith("w.") else
            (self._pointers, _POINTERS_KEPT)
        )  # fmt: skip
        known.pop(key, None)  # re-inserted as the newest
        known[key] = value
        while len(known) > kept:
            del known[next(iter(known))]

    def _scan(self, namespace: str) -> dict[str, dict[str, Any]]:
        try:
            records = self._memory.scan(
                namespace, self._task, limit=_SCAN_LIMIT, newest_first=False
            )
        except NotFoundError:
            return {}
        return {rec["id"]: rec["value"] for rec in records}

    def _threads(self) -> list[str]:
        return [ns for ns, task in self._memory.tasks("lgcp:") if task == self._task]

    def _write(self, space: str, records: list[dict[str, Any]]) -> None:
        """Stores `records` and what is queued for `space` (pending writes, an input
        checkpoint) in one atomic batch; the caller holds the lock. On failure the queued
        records stay queued."""
        queued = self._queued.pop(space, {})
        held = self._held.pop(space, None)
        # A held input checkpoint's pointer is replaced by a newer checkpoint's.
        batch = queued | {r["id"]: r for r in records}
        try:
            self._memory.append_many(space, self._task, list(batch.values()))
        except BaseException:
            self._queued[space] = queued
            if held is not None:
                self._held[space] = held
            raise
        finally:
            self._stored.notify_all()

    def _hold(self, space: str, records: list[dict[str, Any]]) -> None:
        """Queues an input checkpoint's records for the thread's next write, due within
        `INPUT_WAIT_S` (the flusher's deadline); the caller holds the lock."""
        self._queued.setdefault(space, {}).update((r["id"], r) for r in records)
        self._held.setdefault(space, time.monotonic() + INPUT_WAIT_S)
        if self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_held, name="agentnode-checkpoint-flusher", daemon=True
            )
            self._flusher.start()
        else:
            self._holding.notify()

    def _flush_held(self) -> None:
        """The flusher thread: writes each held input checkpoint no write carried by its
        deadline; ends after `_FLUSHER_IDLE_S` with nothing held."""
        with self._lock:
            idle_until = time.monotonic() + _FLUSHER_IDLE_S
            while True:
                now = time.monotonic()
                for space in [s for s, due in self._held.items() if due <= now]:
                    if any(rid.startswith("w.") for rid in self._queued.get(space, ())):
                        # Pending writes waited with it, for a checkpoint that did not come.
                        self._unwaited[space] = _UNWAITED_AFTER_MISS
                    try:
                        self._write(space, [])
                    except Exception:
                        # Not lost: still queued, it goes with the thread's next write or
                        # read, which fails in its turn if the node is still unreachable.
                        self._held.pop(space, None)
                if self._held:
                    idle_until = now + _FLUSHER_IDLE_S
                    self._holding.wait(min(self._held.values()) - now)
                elif now < idle_until:
                    self._holding.wait(idle_until - now)
                else:
                    self._flusher = None
                    return

    def _flush(self) -> None:
        """Stores every queued pending write (before a read); the caller holds the lock."""
        for space in list(self._queued):
            self._write(space, [])

    def _tuple(
        self,
        value: dict[str, Any],
        writes: dict[str, Any] | None,
        fetch: Callable[[list[str]], dict[str, Any]],
    ) -> CheckpointTuple:
        """A stored checkpoint as LangGraph reads it; `fetch(record ids)` finds the records
        of its channel values (those it has: by id)."""
        thread, ns, cid = value["thread"], value["ns"], value["id"]
        checkpoint: Checkpoint = self.serde.loads_typed(tuple(value["checkpoint"]))
        dns = _digest(ns)
        ids = {
            channel: f"b.{dns}.{_digest(channel)}.{_digest(version)}"
            for channel, version in checkpoint["channel_versions"].items()
        }
        found = fetch(list(ids.values()))
        values = {}
        for channel, rid in ids.items():
            stored = (found.get(rid) or {}).get("v")
            if stored is not None and stored[0] != "empty":
                values[channel] = self.serde.loads_typed(tuple(stored))
        pending = sorted(
            (writes or {}).get("writes", []), key=lambda w: writes_sort_key(w[5], w[0], w[1])
        )

        def config(checkpoint_id: str) -> RunnableConfig:
            return {
                "configurable": {
                    "thread_id": thread,
                    "checkpoint_ns": ns,
                    "checkpoint_id": checkpoint_id,
                }
            }

        return CheckpointTuple(
            config=config(cid),
            checkpoint={**checkpoint, "channel_values": values},
            metadata=self.serde.loads_typed(tuple(value["metadata"])),
            parent_config=config(value["parent"]) if value["parent"] else None,
            pending_writes=[(w[0], w[2], self.serde.loads_typed((w[3], w[4]))) for w in pending],
        )

    # -- the saver API --------------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint `config` names, or the thread's newest in its checkpoint namespace."""
        thread = str(config["configurable"]["thread_id"])
        ns = config["configurable"].get("checkpoint_ns", "")
        space, dns = _thread_ns(thread), _digest(ns)
        with self._lock:
            self._flush()
            cid = get_checkpoint_id(config)
            newest = self._newest.get((space, dns))
            # What it remembers of the mutable records, the pointer and pending writes, may be
            # stale: another saver (another process of the task, or one per graph in this
            # one) may have run the thread since. Each run starts here, so they are read
            # again, in one round trip (one request each over HTTP); checkpoints and values
            # never change once written.
            wanted = [] if cid else [f"l.{dns}"]
            if newest is not None and (not cid or newest[0]["id"] == cid):
                wanted.append(f"w.{dns}.{_digest(newest[0]['id'])}")
            found = self._memory.get_many(space, self._task, wanted) if wanted else []
            for rid, rec in zip(wanted, found, strict=True):
                self._remember((space, rid), None if rec is None else rec["value"])
            if not cid:
                latest = self._pointers[(space, f"l.{dns}")]
                if latest is None:
                    return None
                cid = latest["id"]
            if newest is not None and newest[0]["id"] == cid:
                # This saver wrote it: nothing more to read but values it does not remember.
                writes = self._writes[(space, f"w.{dns}.{_digest(cid)}")]
                known = {
                    f"b.{dns}.{_digest(ch)}.{_digest(ver)}": value
                    for ch, (ver, value) in newest[1].items()
                }
                return self._tuple(newest[0], writes, functools.partial(self._values, space, known))
            # The checkpoint and its writes in one round trip, then all its values in one
            # (over the memory socket; over HTTP one request each).
            value, writes = (
                None if rec is None else rec["value"]
                for rec in self._memory.get_many(
                    space, self._task, [f"c.{dns}.{_digest(cid)}", f"w.{dns}.{_digest(cid)}"]
                )
            )
            if value is None:
                return None
            self._remember((space, f"w.{dns}.{_digest(cid)}"), writes)
            return self._tuple(value, writes, functools.partial(self._values, space, {}))

    def _values(self, space: str, known: dict[str, Any], ids: list[str]) -> dict[str, Any]:
        """The stored channel values of `ids`: those `known` holds, the others read in one
        round trip over the memory socket (one request each over HTTP)."""
        found = {rid: known[rid] for rid in ids if rid in known}
        missing = [rid for rid in ids if rid not in found]
        if missing:
            records = self._memory.get_many(space, self._task, missing)
            found |= {rid: rec["value"] for rid, rec in zip(missing, records, strict=True) if rec}
        return found

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Checkpoints newest first, of one thread (or all), filtered as LangGraph's savers do."""
        with self._lock:
            self._flush()
            spaces = (
                [_thread_ns(str(config["configurable"]["thread_id"]))]
                if config
                else self._threads()
            )
            records = [self._scan(space) for space in spaces]
        want_ns = config["configurable"].get("checkpoint_ns") if config else None
        want_id = get_checkpoint_id(config) if config else None
        before_id = get_checkpoint_id(before) if before else None
        found: list[tuple[str, dict[str, Any], dict[str, dict[str, Any]]]] = []
        for recs in records:
            for rid, value in recs.items():
                if not rid.startswith("c.") or (want_ns is not None and value["ns"] != want_ns):
                    continue
                if (want_id and value["id"] != want_id) or (before_id and value["id"] >= before_id):
                    continue
                found.append((value["id"], value, recs))
        found.sort(key=lambda f: f[0], reverse=True)
        left = limit
        for _, value, recs in found:
            if filter:
                metadata = self.serde.loads_typed(tuple(value["metadata"]))
                if not all(metadata.get(k) == v for k, v in filter.items()):
                    continue
            if left is not None:
                if left <= 0:
                    return
                left -= 1
            dns = _digest(value["ns"])
            yield self._tuple(
                value,
                recs.get(f"w.{dns}.{_digest(value['id'])}"),
                functools.partial(_picked, recs),
            )

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Stores a checkpoint and the channel values of `new_versions`, atomically."""
        thread = str(config["configurable"]["thread_id"])
        ns = config["configurable"].get("checkpoint_ns", "")
        space, dns, cid = _thread_ns(thread), _digest(ns), checkpoint["id"]
        stored = dict(checkpoint)
        values: dict[str, Any] = stored.pop("channel_values")  # type: ignore[assignment]
        fresh = {
            ch: (
                ver,
                {"v": list(self.serde.dumps_typed(values[ch]) if ch in values else ("empty", b""))},
            )
            for ch, ver in new_versions.items()
        }
        records: list[dict[str, Any]] = [
            {"id": f"b.{dns}.{_digest(ch)}.{_digest(ver)}", "value": value}
            for ch, (ver, value) in fresh.items()
        ]
        head = {
            "thread": thread,
            "ns": ns,
            "id": cid,
            "parent": config["configurable"].get("checkpoint_id"),
            "checkpoint": list(self.serde.dumps_typed(stored)),
            "metadata": list(self.serde.dumps_typed(get_checkpoint_metadata(config, metadata))),
        }
        records.append({"id": f"c.{dns}.{_digest(cid)}", "value": head})
        with self._lock:
            latest = self._cached(space, f"l.{dns}")
            if latest is None or latest["id"] <= cid:
                records.append({"id": f"l.{dns}", "value": {"id": cid}})
            if metadata.get("source") == "input":
                self._hold(space, records)
            else:
                self._write(space, records)
            if latest is None or latest["id"] <= cid:
                self._remember((space, f"l.{dns}"), {"id": cid})
                self._keep_newest((space, dns), checkpoint["channel_versions"], head, fresh)
            # A checkpoint just made has no pending writes: its first put_writes reads nothing.
            self._remember((space, f"w.{dns}.{_digest(cid)}"), None)
        return {"configurable": {"thread_id": thread, "checkpoint_ns": ns, "checkpoint_id": cid}}

    def _keep_newest(
        self,
        key: tuple[str, str],
        versions: ChannelVersions,
        checkpoint: dict[str, Any],
        fresh: dict[str, tuple[Any, dict[str, Any]]],
    ) -> None:
        """Keeps a checkpoint just stored (`checkpoint`, its record's value) as its thread's
        newest, with the values of its channels this saver knows: those it stored now
        (`fresh`) and those kept from the checkpoint before that are still current; the
        caller holds the lock."""
        before = self._newest.pop(key, None)
        values = fresh
        if before is not None:
            values = {
                ch: kept for ch, kept in before[1].items() if versions.get(ch) == kept[0]
            } | fresh
        self._newest[key] = (checkpoint, values)
        while len(self._newest) > _NEWEST_KEPT:
            del self._newest[next(iter(self._newest))]

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Stores a task's pending writes for a checkpoint, returning once they are stored
        (with the next checkpoint when it comes within `WRITES_WAIT_S`). Special channels
        (errors, interrupts) replace an earlier write at their index; others are kept from
        the first."""
        thread = str(config["configurable"]["thread_id"])
        ns = config["configurable"].get("checkpoint_ns", "")
        cid = config["configurable"]["checkpoint_id"]
        space, rid = _thread_ns(thread), f"w.{_digest(ns)}.{_digest(cid)}"
        with self._lock:
            stored = self._cached(space, rid) or {"writes": []}
            by_key = {(w[0], w[1]): w for w in stored["writes"]}
            for idx, (channel, value) in enumerate(writes):
                key = (task_id, WRITES_IDX_MAP.get(channel, idx))
                if key[1] >= 0 and key in by_key:
                    continue
                by_key[key] = [task_id, key[1], channel, *self.serde.dumps_typed(value), task_path]
            merged = {"writes": list(by_key.values())}
            self._queued.setdefault(space, {})[rid] = {"id": rid, "value": merged}
            self._remember((space, rid), merged)
            # An error or interrupt ends the run: no checkpoint follows to carry it.
            unwaited = self._unwaited.pop(space, 0)
            if unwaited:
                self._unwaited[space] = unwaited - 1
            elif not any(channel in WRITES_IDX_MAP for channel, _ in writes):
                deadline = time.monotonic() + WRITES_WAIT_S
                while rid in self._queued.get(space, {}):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._unwaited[space] = _UNWAITED_AFTER_MISS
                        break
                    self._stored.wait(left)
            if rid in self._queued.get(space, {}):
                self._write(space, [])

    def delete_thread(self, thread_id: str) -> None:
        """Deletes every checkpoint, value and write of a thread."""
        space = _thread_ns(str(thread_id))
        with self._lock:
            self._flush()
            self._pointers = {k: v for k, v in self._pointers.items() if k[0] != space}
            self._writes = {k: v for k, v in self._writes.items() if k[0] != space}
            self._newest = {k: v for k, v in self._newest.items() if k[0] != space}
            for rid in self._scan(space):
                self._memory.delete(space, self._task, rid)

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """`get_tuple` on a worker thread."""
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """`list` on a worker thread."""
        found = await asyncio.to_thread(
            lambda: list(self.list(config, filter=filter, before=before, limit=limit))
        )
        for item in found:
            yield item

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """`put` on a worker thread."""
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """`put_writes` on a worker thread."""
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        """`delete_thread` on a worker thread."""
        await asyncio.to_thread(self.delete_thread, thread_id)

    def get_next_version(self, current: str | None, channel: None) -> str:
        """Versions as LangGraph's own savers make them: a counter, then a random tiebreak
        (so two writers of one version never collide). The tiebreak is `random`'s, reseeded
        in every forked child, not `os.urandom`'s: a syscall per channel per step."""
        number = 0 if current is None else int(str(current).split(".")[0])
        return f"{number + 1:032}.{random.getrandbits(64):020}"
