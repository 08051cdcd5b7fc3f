"""`AuditLog`: the node's one append-only, hash-chained record of what tasks did.

Every record is one JSON line whose last three keys are `seq` (counting from 1 without gaps
across every file of the log), `prev` (the SHA-256 of the record before it) and `hash` (the
SHA-256 of the line itself up to `,"hash"`, closed with `}`). Editing a record
breaks its own hash, deleting one leaves a gap in `seq`, reordering puts a `seq` out of place,
and rewriting a record together with its hash breaks the next record's `prev`: `verify` names
the record in each case.

Appends come from any thread (the DNS forwarder's, the event loop's) and are cheap: the
caller's thread serialises and hashes the record under a lock, so file order is chain order;
one writer thread writes whatever is waiting in one `write`, `fdatasync`s it, then indexes the
records that name a task in RocksDB (task id + seq -> record), which is what timelines read.
`commit()` waits for its record's fsync, sharing it with every record appended meanwhile.

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

from rocksdict import Options, Rdict, WriteBatch

from agentnode.audit.layout import GENESIS, LIVE, segments
from agentnode.durable import fsync_dir
from agentnode.errors import AuditError

__all__ = ["AuditLog"]

log = logging.getLogger("agentnode.audit")

#: Keys the log sets itself.
_RESERVED = frozenset(("seq", "prev", "hash"))
#: The index's key of its own progress: the last seq indexed.
_INDEXED = b"\xffindexed"
_SEQ_BYTES = 8
#: The largest record seq (the index keys hold it in `_SEQ_BYTES` bytes).
MAX_SEQ = (1 << (8 * _SEQ_BYTES)) - 1


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


def _index_batch(batch: list[tuple[int, str, str | None]], *, strip: int) -> WriteBatch:
    """One index entry per task per written batch, keyed by the task's last seq in it and
    holding its lines: a put per record cost more than the rest of an append together."""
    by_task: dict[str, list[str]] = {}
    last: dict[str, int] = {}
    for seq, line, task in batch:
        if task is not None:
            by_task.setdefault(task, []).append(line[:-strip] if strip else line)
            last[task] = seq
    wb = WriteBatch(raw_mode=True)
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
        self._pending: list[tuple[int, str, str | None]] = []
        self._closing = False
        self._seq, self._head = self._recover()
        self._durable = self._seq
        self._failed: BaseException | None = None
        self._waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        opts = Options(raw_mode=True)
        opts.set_write_buffer_size(1 << 20)
        self._index = Rdict(str(directory / "index"), options=opts)
        self._reindex()
        self._file = (directory / LIVE).open("a", encoding="utf-8")
        self._size = self._file.tell()
        self._writer = threading.Thread(target=self._run, name="agentnode-audit", daemon=True)
        self._writer.start()

    # -- opening ---------------------------------------------------------------------------------

    def _recover(self) -> tuple[int, str]:
        """The last record's seq and hash; drops a torn last line (never acknowledged)."""
        for path in reversed(segments(self.directory)):
            last = _last_line(path)
            if last is not None:
                record = json.loads(last)
                return int(record["seq"]), str(record["hash"])
        return 0, GENESIS

    def _reindex(self) -> None:
        """Indexes what the log holds past the index's progress (a crash between the log's
        fsync and the index write leaves such a tail)."""
        done = self._index.get(_INDEXED)
        indexed = 0 if done is None else int.from_bytes(done, "big")
        if indexed >= self._seq:
            return
        todo: list[tuple[int, str, str | None]] = []
        for path in reversed(segments(self.directory)):
            records = [(json.loads(line), line) for line in _lines(path)]
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
        to the chain and returns its seq. It is written and fsynced by the writer thread at
        once, together with whatever else is waiting."""
        return self.extend((record,))

    def extend(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Adds every record of `records` in order (see `append`); returns the last seq."""
        now = time.time()
        # Serialised outside the lock; only the chain fields are added under it.
        bodies = [(_body(r, now), r.get("task")) for r in records]
        with self._lock:
            if self._closing:
                raise AuditError("the audit log is closed (the node is stopping)")
            wake = not self._pending
            for body, task in bodies:
                line = self._link(body)
                self._pending.append((self._seq, line, task if _indexable(task) else None))
            if wake and bodies:
                self._wake.notify()
            return self._seq

    def _link(self, body: str) -> str:
        """`body` (a JSON object) made the next record of the chain; the caller holds the lock."""
        self._seq += 1
        chained = f'{body[:-1]},"seq":{self._seq},"prev":"{self._head}"}}'
        self._head = hashlib.sha256(chained.encode()).hexdigest()
        return f'{chained[:-1]},"hash":"{self._head}"}}\n'

    async def commit(self, record: Mapping[str, Any]) -> int:
        """Appends `record` and returns its seq once it is on disk (fsynced)."""
        seq = self.append(record)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._failed is not None:
                raise AuditError(f"the audit log cannot be written: {self._failed}")
            if self._durable >= seq:
                return seq
            self._waiters.append((seq, loop, fut))
        await fut
        return seq

    def flush(self) -> None:
        """Returns once every record appended so far is on disk and indexed."""
        with self._lock:
            target = self._seq
            self._wake.notify()
            while self._durable < target and self._failed is None:
                self._wake.wait()
            if self._failed is not None:
                raise AuditError(f"the audit log cannot be written: {self._failed}")

    @property
    def head(self) -> tuple[int, str]:
        """The last record's seq and hash (appended, maybe not yet on disk)."""
        with self._lock:
            return self._seq, self._head

    def close(self) -> None:
        """Writes what is waiting, stops the writer and closes the files. Idempotent."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._wake.notify()
        self._writer.join()
        self._file.close()
        self._index.close()

    # -- the writer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closing:
                    self._wake.wait()
                batch, self._pending = self._pending, []
                if not batch and self._closing:
                    return
            try:
                self._write(batch)
            except OSError as e:
                log.error(
                    "audit log write failed (records %d-%d): %s", batch[0][0], batch[-1][0], e
                )
                self._done(batch[-1][0], e)
                return
            self._done(batch[-1][0], None)

    def _write(self, batch: list[tuple[int, str, str | None]]) -> None:
        self._append_lines(batch)
        if self._size >= self.max_bytes:
            self._rotate()

    def _append_lines(self, batch: list[tuple[int, str, str | None]]) -> None:
        data = "".join(line for _, line, _ in batch)
        self._file.write(data)
        self._file.flush()
        os.fdatasync(self._file.fileno())
        self._size += len(data)
        self._index.write(_index_batch(batch, strip=1))

    def _rotate(self) -> None:
        # Under the lock, so no append takes a seq between these: what waits goes before the
        # `rotate` record, and what comes later after the `rotated` one, in the new file.
        with self._lock:
            batch, self._pending = self._pending, []
            now = time.time()
            closing = self._link(_encode({"time": now, "kind": "rotate", "head": self._head}))
            batch.append((self._seq, closing, None))
            name = f"audit-{_first_seq(self.directory / LIVE):020d}.log"
            opening = self._link(_encode({"time": now, "kind": "rotated", "from": name}))
            opening_seq = self._seq
        self._append_lines(batch)
        self._file.close()
        os.rename(self.directory / LIVE, self.directory / name)
        self._file = (self.directory / LIVE).open("a", encoding="utf-8")
        self._size = 0
        self._append_lines([(opening_seq, opening, None)])
        fsync_dir(self.directory)
        # What the rotation took from the queue is durable too; its waiters may go on.
        self._done(opening_seq, None)

    def _done(self, seq: int, error: BaseException | None) -> None:
        with self._lock:
            if error is None:
                self._durable = max(self._durable, seq)
            else:
                self._failed = error
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
