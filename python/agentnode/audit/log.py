"""`AuditLog`: the node's one append-only, hash-chained record of what tasks did.

Every record is one JSON line whose last three keys are `seq` (counting from 1 without gaps
across every file of the log), `prev` (the SHA-256 of the record before it) and `hash` (the
SHA-256 of the line itself up to `,"hash"`, closed with `}`). Editing a record
breaks its own hash, deleting one leaves a gap in `seq`, reordering puts a `seq` out of place,
and rewriting a record together with its hash breaks the next record's `prev`: `verify` names
the record in each case.

Appends come from any thread (the DNS forwarder's, the event loop's) and are cheap: the
caller's thread serialises the record, then, under a lock (so file order is chain order),
links it and writes it to the file: once `append` returns the record is the kernel's, and a
crash of the node (`kill -9`) cannot lose it. Durability against a power cut is grouped: one
writer thread `fdatasync`s the file at most `SYNC_INTERVAL` after the first record it has not
synced, then indexes every record synced that names a task in RocksDB (task id + seq ->
record), which is what timelines read. So a burst of records shares one fsync and one index
write, where each record had its own (an LLM call's record cost the node ~0.15-0.25 ms of
CPU in its own fsync and the writer's wakeup). `commit()` and `flush()` sync at once, sharing
the fsync with every record appended meanwhile.

When the live file passes `max_bytes` the writer closes it with a `rotate` record carrying the
head hash, renames it `audit-<first seq>.log` and starts a new file with a `rotated` record that
names the old one; the chain runs on through both.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from agentnode.audit.layout import GENESIS, LIVE, segments
from agentnode.durable import fsync_dir
from agentnode.errors import AuditError, StoreWriteError
from agentnode.storage.rocks import Batch, Rocks, raw_options

__all__ = ["AuditLog"]

log = logging.getLogger("agentnode.audit")

#: Keys the log sets itself.
_RESERVED = frozenset(("seq", "prev", "hash"))
#: The index's key of its own progress: the last seq indexed.
_INDEXED = b"\xffindexed"
_SEQ_BYTES = 8
#: The largest record seq (the index keys hold it in `_SEQ_BYTES` bytes).
MAX_SEQ = (1 << (8 * _SEQ_BYTES)) - 1
#: Seconds a written record waits for the fsync it shares with those that follow: the most a
#: power cut can lose (a crash of the node loses nothing written), as the proxy's ledger's.
SYNC_INTERVAL = 0.05
#: Bytes of records kept in memory while the file cannot be written (a full disk); past them
#: records are counted, and an `audit_lost` record gives the count once writing resumes.
BACKLOG_BYTES = 16 << 20
#: Seconds between tries to write the file (or the index) again after a failure.
RETRY_S = 0.5


def _make_encoder() -> Callable[[object], str]:
    """Compact JSON, non-JSON values as str. The C encoder built once: `json.dumps` with options
    builds an encoder per call, 60% of an append. No cycle markers (they would be shared by
    threads); a cyclic record ends in RecursionError, which `_body` reports."""
    fallback = json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode
    if c_make_encoder is None:  # an interpreter without the C accelerator
        return fallback
    make = c_make_encoder(None, str, encode_basestring_ascii, None, ":", ",", False, False, False)

    def encode(value: object) -> str:
        return "".join(make(value, 0))

    return encode


_encode = _make_encoder()


def _indexable(task: object) -> bool:
    """Whether a record's `task` can key the index (NUL separates the key's parts)."""
    return isinstance(task, str) and bool(task) and "\0" not in task


def _index_key(task: str, seq: int) -> bytes:
    return task.encode() + b"\x00" + seq.to_bytes(_SEQ_BYTES, "big")


def _index_batch(batch: list[tuple[int, str, str | None]], *, strip: int) -> Batch:
    """One index entry per task per written batch, keyed by the task's last seq in it and
    holding its lines: a put per record cost more than the rest of an append together."""
    by_task: dict[str, list[str]] = {}
    last: dict[str, int] = {}
    for seq, line, task in batch:
        if task is not None:
            by_task.setdefault(task, []).append(line[:-strip] if strip else line)
            last[task] = seq
    wb = Batch()
    for task, lines in by_task.items():
        wb.put(_index_key(task, last[task]), "\n".join(lines).encode())
    wb.put(_INDEXED, batch[-1][0].to_bytes(_SEQ_BYTES, "big"))
    return wb


class AuditLog:
    """The hash-chained log in `directory` (made if missing) and its per-task index.

    `max_bytes` is the live file's size at which it is rotated.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 64 << 20,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        #: Records written but not yet synced and indexed.
        self._unsynced: list[tuple[int, str, str | None]] = []
        #: A commit or flush waits: sync without waiting out the interval.
        self._sync_now = False
        self._closing = False
        self._seq, self._head = self._recover()
        self._durable = self._seq
        #: Why the file cannot be written now (a full disk): records wait in `_held`.
        self._stuck: OSError | None = None
        self._held: list[tuple[int, str, str | None]] = []
        self._held_bytes = 0
        #: Records not kept past `BACKLOG_BYTES`, and when the first of them came.
        self._lost = 0
        self._lost_since = 0.0
        #: Synced records the index could not take yet, and why.
        self._unindexed: list[tuple[int, str, str | None]] = []
        self._index_failure: StoreWriteError | None = None
        self._writer_gone = False
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        opts = raw_options()
        opts.set_write_buffer_size(1 << 20)
        self._index = Rocks(directory / "index", opts)
        self._reindex()
        self._fd = _open_live(directory)
        self._size = os.fstat(self._fd).st_size
        self._writer = threading.Thread(target=self._run, name="agentnode-audit", daemon=True)
        self._writer.start()

    # -- opening ---------------------------------------------------------------------------------

    def _recover(self) -> tuple[int, str]:
        """The last record's seq and hash; drops a torn last line (never acknowledged)."""
        for path in reversed(segments(self.directory)):
            last = _last_line(path)
            if last is not None:
                record = self._parse(path, last)
                return int(record["seq"]), str(record["hash"])
        return 0, GENESIS

    def _parse(self, path: Path, line: str) -> dict[str, Any]:
        """A record of the log, or AuditError saying it is damaged and what to do."""
        try:
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record["seq"], int) and record["hash"]:
                return record
        except (ValueError, KeyError, TypeError):
            pass
        raise AuditError(
            f"a record of the audit log {path} is damaged ({line[:60]!r}): check the log with "
            f"`agentnode audit verify {self.directory}`, then move it away to start a new chain"
        )

    def _reindex(self) -> None:
        """Indexes what the log holds past the index's progress (a crash between the log's
        fsync and the index write leaves such a tail)."""
        done = self._index.get(_INDEXED)
        indexed = 0 if done is None else int.from_bytes(done, "big")
        if indexed >= self._seq:
            return
        todo: list[tuple[int, str, str | None]] = []
        for path in reversed(segments(self.directory)):
            records = [(self._parse(path, line), line) for line in _lines(path)]
            todo[:0] = [
                (r["seq"], line, r.get("task") if _indexable(r.get("task")) else None)
                for r, line in records
                if r["seq"] > indexed
            ]
            if not records or records[0][0]["seq"] <= indexed + 1:
                break
        if todo:
            self._index.write(_index_batch(todo, strip=0))

    # -- appending -------------------------------------------------------------------------------

    def append(self, record: Mapping[str, Any]) -> int:
        """Adds `record` (a JSON-serialisable mapping with a `kind`; `time` defaults to now)
        to the chain and returns its seq. It is written to the file before this returns, and
        fsynced within `SYNC_INTERVAL` together with whatever else was written meanwhile."""
        return self.extend((record,))

    def extend(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Adds every record of `records` in order (see `append`); returns the last seq (0
        when the log could not take them: see `BACKLOG_BYTES`)."""
        now = time.time()
        # Serialised outside the lock; only the chain fields are added under it.
        bodies: list[str] = []
        tasks: list[str | None] = []
        for r in records:
            bodies.append(_body(r, now))
            task = r.get("task")
            tasks.append(task if _indexable(task) else None)
        with self._lock:
            if self._closing:
                raise AuditError("the audit log is closed (the node is stopping)")
            if not bodies:
                return self._seq
            if self._stuck is not None:
                return self._hold(bodies, tasks, now)
            first = self._seq + 1
            lines = [self._link(body) for body in bodies]
            linked = list(zip(range(first, self._seq + 1), lines, tasks, strict=True))
            data = "".join(lines).encode()
            try:
                _write_all(self._fd, data)
            except OSError as e:
                # Linked, so they keep their seqs: held, written first when the log can be.
                self._stuck_on(e, f"records {first}-{self._seq}")
                self._held += linked
                self._held_bytes += len(data)
                return self._seq
            self._size += len(data)
            wake = not self._unsynced
            self._unsynced += linked
            if wake:
                self._wake.notify()
            return self._seq

    def _hold(self, bodies: list[str], tasks: list[str | None], now: float) -> int:
        """Keeps records in memory while the file cannot be written; the caller holds the
        lock. Past `BACKLOG_BYTES` they are counted instead, unlinked: the chain stays whole
        and an `audit_lost` record says how many went and when."""
        size = sum(map(len, bodies))
        if self._held_bytes + size > BACKLOG_BYTES:
            if not self._lost:
                log.error("audit log: %d bytes of records wait in memory; further records "
                          "are counted, not kept, until it can be written", self._held_bytes)  # fmt: skip
                self._lost_since = now
            self._lost += len(bodies)
            return 0
        first = self._seq + 1
        lines = [self._link(body) for body in bodies]
        self._held += zip(range(first, self._seq + 1), lines, tasks, strict=True)
        self._held_bytes += size
        return self._seq

    def _stuck_on(self, error: OSError, what: str) -> None:
        """Enters the state where records wait in memory; the caller holds the lock."""
        log.error("audit log write failed (%s): %s; records wait in memory and are written "
                  "once it can be", what, error)  # fmt: skip
        self._stuck = error
        self._wake.notify_all()

    def _link(self, body: str) -> str:
        """`body` (a JSON object) made the next record of the chain; the caller holds the lock."""
        self._seq += 1
        chained = f'{body[:-1]},"seq":{self._seq},"prev":"{self._head}"}}'
        self._head = hashlib.sha256(chained.encode()).hexdigest()
        return f'{chained[:-1]},"hash":"{self._head}"}}\n'

    async def commit(self, record: Mapping[str, Any]) -> int:
        """Appends `record` and returns its seq once it is on disk (fsynced at once, with
        whatever else waits for its fsync)."""
        seq = self.append(record)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._stuck is not None:
                raise AuditError(f"the audit log cannot be written: {self._stuck}")
            if self._durable >= seq:
                return seq
            self._waiters.append((seq, loop, fut))
            if not self._sync_now:  # one wakeup for the writer, not one per waiting commit
                self._sync_now = True
                self._wake.notify()
        await fut
        return seq

    def flush(self) -> None:
        """Returns once every record appended so far is on disk and indexed; raises
        AuditError while the log cannot be written."""
        with self._lock:
            target = self._seq
            if self._durable < target and not self._sync_now:
                self._sync_now = True
                self._wake.notify()
            while self._durable < target and self._stuck is None and not self._writer_gone:
                self._wake.wait()
            if self._stuck is not None:
                raise AuditError(f"the audit log cannot be written: {self._stuck}")
            if self._writer_gone:
                raise AuditError("the audit log's writer stopped (the node's log says why)")

    @property
    def stuck(self) -> str | None:
        """Why the log cannot be written now (its records wait in memory), or None."""
        error = self._stuck  # one reference, read whole: no lock for the hot path
        return None if error is None else f"the audit log cannot be written: {error}"

    @property
    def head(self) -> tuple[int, str]:
        """The last record's seq and hash (appended, maybe not yet on disk)."""
        with self._lock:
            return self._seq, self._head

    def health(self) -> str:
        """`ok`, or `failing: <why>` (for /healthz)."""
        with self._lock:
            if self._stuck is not None:
                return (f"failing: the audit log cannot be written ({self._stuck}); "
                        f"{len(self._held)} records wait in memory, {self._lost} lost")  # fmt: skip
            if self._index_failure is not None:
                return f"failing: the audit index cannot be written ({self._index_failure})"
            return "ok"

    def close(self) -> None:
        """Writes what is waiting, stops the writer and closes the files. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify()
        self._writer.join()
        if self._held or self._lost:
            log.error("audit log closed with %d records unwritten (the disk is still full?)",
                      len(self._held) + self._lost)  # fmt: skip
        os.close(self._fd)
        self._index.close()

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: say so once, and let no waiter wait for ever
            log.critical("audit log writer stopped: %r", e)
            with self._lock:
                self._writer_gone = True
                self._done(self._durable, AuditError(f"the audit log writer stopped: {e!r}"),
                           locked=True)  # fmt: skip

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (
                    self._unsynced or self._unindexed or self._closing or self._stuck is not None
                ):
                    self._wake.wait()
                if self._stuck is not None:
                    self._done(self._durable, self._stuck, locked=True)
                    if not self._unstick() and not self._closing:
                        self._wake.wait(RETRY_S)
                        continue
                # Records that come meanwhile share this fsync (appends do not wake us again).
                deadline = time.monotonic() + (RETRY_S if not self._unsynced else SYNC_INTERVAL)
                while not (self._sync_now or self._closing or self._stuck is not None):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                if self._stuck is not None and not self._closing:
                    continue
                batch, self._unsynced = self._unsynced, []
                self._sync_now = False
                rotate = self._size >= self.max_bytes and self._stuck is None
                if not batch and self._closing:
                    return
            if batch:
                try:
                    # Outside the lock: appends go on writing while the disk syncs.
                    os.fdatasync(self._fd)
                except OSError as e:
                    with self._lock:
                        self._unsynced[:0] = batch
                        self._stuck_on(e, f"sync of records from {batch[0][0]}")
                    if self._closing:
                        return
                    continue
                self._index_records(batch)
                self._done(batch[-1][0], None)
            elif self._unindexed:
                self._index_records([])
            if rotate:
                try:
                    rotated = self._rotate()
                except OSError as e:
                    with self._lock:
                        self._stuck_on(e, "rotation")
                    continue
                self._index_records(rotated)
                self._done(rotated[-1][0], None)

    def _unstick(self) -> bool:
        """Writes the held records (and an `audit_lost` record for those not kept) after a
        torn write's part is cut; whether it could. The caller holds the lock."""
        seq, head = self._seq, self._head
        held = list(self._held)
        if self._lost:
            body = _encode({"time": time.time(), "kind": "audit_lost", "records": self._lost,
                            "since": self._lost_since})  # fmt: skip
            held.append((self._seq + 1, self._link(body), None))
        data = "".join(line for _, line, _ in held).encode()
        try:
            os.ftruncate(self._fd, self._size)
            _write_all(self._fd, data)
        except OSError as e:
            self._seq, self._head = seq, head
            self._stuck = e
            return False
        log.warning("audit log writes resumed (%d records were held in memory, %d lost)",
                    len(self._held), self._lost)  # fmt: skip
        self._size += len(data)
        self._unsynced += held
        self._held, self._held_bytes, self._lost = [], 0, 0
        self._stuck = None
        return True

    def _index_records(self, batch: list[tuple[int, str, str | None]]) -> None:
        """Indexes synced records, with any an earlier failure left unindexed (until the
        index takes them, timelines lack them; the log has them all)."""
        todo = self._unindexed + batch
        if not todo:
            return
        try:
            self._index.write(_index_batch(todo, strip=1))
        except StoreWriteError as e:
            if self._index_failure is None:
                log.error("audit index write failed (records from %d wait): %s", todo[0][0], e)
            self._unindexed, self._index_failure = todo, e
            return
        if self._index_failure is not None:
            log.warning("audit index writes resumed")
        self._unindexed, self._index_failure = [], None

    def _rotate(self) -> list[tuple[int, str, str | None]]:
        """Closes the live file with a `rotate` record, renames it and starts a new one with a
        `rotated` record; returns what it synced (the records written since the last sync, the
        two of the rotation). Under the lock throughout, so no append takes a seq or writes
        between these: what was written goes before the `rotate` record, what comes later
        after the `rotated` one, in the new file (appends wait out one rotation a 64 MiB)."""
        with self._lock:
            seq, head = self._seq, self._head
            now = time.time()
            closing = self._link(_encode({"time": now, "kind": "rotate", "head": self._head}))
            try:
                _write_all(self._fd, closing.encode())
                os.fdatasync(self._fd)
            except OSError:
                # Not rotated: the live file goes on, cut back to its last whole record.
                self._seq, self._head = seq, head
                os.ftruncate(self._fd, self._size)
                raise
            batch, self._unsynced = self._unsynced, []
            batch.append((self._seq, closing, None))
            name = f"audit-{_first_seq(self.directory / LIVE):020d}.log"
            opening = self._link(_encode({"time": now, "kind": "rotated", "from": name}))
            batch.append((self._seq, opening, None))
            os.close(self._fd)
            os.rename(self.directory / LIVE, self.directory / name)
            self._fd = _open_live(self.directory)
            _write_all(self._fd, opening.encode())
            os.fdatasync(self._fd)
            self._size = len(opening)
        fsync_dir(self.directory)
        return batch

    def _done(self, seq: int, error: BaseException | None, *, locked: bool = False) -> None:
        """Resolves the commits waiting for records up to `seq` (every one with `error`)."""
        if not locked:
            with self._lock:
                self._done(seq, error, locked=True)
            return
        if error is None:
            self._durable = max(self._durable, seq)
        ready: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        waiting: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        for w in self._waiters:
            (ready if error is not None or w[0] <= self._durable else waiting).append(w)
        self._waiters = waiting
        self._wake.notify_all()
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, loop, fut in ready:
            by_loop.setdefault(loop, []).append(fut)
        for loop, futs in by_loop.items():
            # One wakeup per loop per fsync, whatever the number of waiters.
            loop.call_soon_threadsafe(_resolve, futs, error)

    # -- reading ---------------------------------------------------------------------------------

    def task_records(self, task: str, *, after: int = 0) -> Iterator[dict[str, Any]]:
        """A task's records in seq order, from the index (flush first to see the newest)."""
        prefix = task.encode() + b"\x00"
        # Entries are keyed by their last seq: the first at or past after+1 holds what follows.
        for key, value in self._index.items(from_key=_index_key(task, after + 1)):
            if not (isinstance(key, bytes) and key.startswith(prefix)):
                break
            for line in value.split(b"\n"):
                record = json.loads(line)
                if record["seq"] > after:
                    yield record


def _open_live(directory: Path) -> int:
    """The live file, opened for appending (owner only: the records name every tenant)."""
    return os.open(directory / LIVE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)


def _write_all(fd: int, data: bytes) -> None:
    """Writes all of `data` (a write to a file may take part of it, e.g. as the disk fills)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _resolve(futs: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for fut in futs:
        if fut.done():
            continue
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(AuditError(f"the audit log cannot be written: {error}"))


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield line[:-1]


def _first_seq(path: Path) -> int:
    with path.open(encoding="utf-8") as f:
        return int(json.loads(f.readline())["seq"])


def _body(record: Mapping[str, Any], now: float) -> str:
    if "kind" not in record:
        raise AuditError("an audit record needs a 'kind' (e.g. 'tool_call')")
    clash = _RESERVED.intersection(record)
    if clash:
        raise AuditError(
            f"audit record field {sorted(clash)[0]!r} is set by the log (leave it out)"
        )
    fields = dict(record)
    fields.setdefault("time", now)
    try:
        return _encode(fields)
    except (RecursionError, TypeError, ValueError) as e:
        raise AuditError(f"audit record of kind {record['kind']!r} is not JSON: {e}") from None


def _last_line(path: Path) -> str | None:
    """The last complete line of `path`; a torn tail after it is cut off (a write a crash cut
    short, whose record was never reported durable)."""
    with path.open("rb+") as f:
        size = f.seek(0, os.SEEK_END)
        window = 1 << 16
        while size > 0:
            start = max(0, size - window)
            f.seek(start)
            data = f.read(size - start)
            if not data.endswith(b"\n"):
                keep = data.rfind(b"\n")
                if keep == -1 and start > 0:
                    window *= 2
                    continue
                log.warning("audit log %s ends in a torn record; dropping it", path)
                size = start + keep + 1
                f.truncate(size)
                continue
            cut = data.rfind(b"\n", 0, len(data) - 1)
            if cut == -1 and start > 0:
                window *= 2
                continue
            return data[cut + 1 : -1].decode()
    return None
