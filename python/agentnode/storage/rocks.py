"""`Rocks`: a RocksDB in raw mode (bytes keys and values) that takes writes again by itself
after a full disk.

RocksDB refuses every write after one failed (a full disk, a quota) until the database is
reopened, even once the disk has room again: without a reopen, each of the node's databases
(agent memory, vectors, objects, the proxy's ledger, tool keys, the audit index) would stay
unwritable until the node restarted. A failed write here reopens the database when its disk
has room and tries the write once more; otherwise it raises `StoreFullError` (or
`StoreWriteError`) naming the database, and the next write tries again.

rocksdict also types keys and values as any of str/int/float/bytes/bool because its default
mode pickles; in raw mode they are always bytes, which the readers here state once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from rocksdict import Options, Rdict, RdictIter, ReadOptions, WriteBatch, WriteOptions

from agentnode.errors import StorageError, StoreFullError, StoreWriteError

__all__ = ["Batch", "Op", "Rocks", "is_disk_full", "raw_options", "write_error"]

#: One write of a Batch: ("put" | "delete" | "delete_range", key, value or range end).
Op = tuple[str, bytes, bytes]
#: The least free space (bytes) at which a failed database is reopened: less, and the reopen
#: (a new write-ahead log, a manifest) would fail too.
_ROOM = 1 << 20
#: The least time between two reopens that found no room or failed.
_RETRY_S = 1.0


def raw_options() -> Options:
    """Options for a raw-mode database made when missing."""
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    return opts


def is_disk_full(e: BaseException) -> bool:
    """Whether `e` (an OSError, or RocksDB's error text) is a full disk or quota."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return "No space left" in text or "Disk quota exceeded" in text


class Batch:
    """Writes to apply at once (`ops`, each `Op`). RocksDB consumes a WriteBatch even when
    its write fails, so a Batch keeps its operations, and `Rocks.write` builds a WriteBatch
    for each try."""

    __slots__ = ("ops",)

    def __init__(self, ops: list[Op] | None = None) -> None:
        self.ops: list[Op] = [] if ops is None else ops

    def put(self, key: bytes, value: bytes) -> None:
        """Sets `key` to `value`."""
        self.ops.append(("put", key, value))

    def delete(self, key: bytes) -> None:
        """Deletes `key`."""
        self.ops.append(("delete", key, b""))

    def delete_range(self, begin: bytes, end: bytes) -> None:
        """Deletes the keys from `begin` up to (not including) `end`."""
        self.ops.append(("delete_range", begin, end))

    def __len__(self) -> int:
        return len(self.ops)

    def _build(self) -> WriteBatch:
        wb = WriteBatch(raw_mode=True)
        put, delete, delete_range = wb.put, wb.delete, wb.delete_range
        for op, key, arg in self.ops:
            if op == "put":
                put(key, arg)
            elif op == "delete":
                delete(key)
            else:
                delete_range(key, arg)
        return wb


class Rocks:
    """The RocksDB at `path` (made if missing), opened with `options` (raw mode).

    Reads and writes are RocksDB's; a write that fails is handled as the module says. Safe to
    use from several threads, as an Rdict is.
    """

    def __init__(self, path: Path, options: Options | None = None) -> None:
        self.path = path
        self._options = options if options is not None else raw_options()
        try:
            self._db: Rdict | None = Rdict(str(path), self._options)
        except Exception as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StorageError(
                f"cannot open the database at {path}: {why} (is another process using it, or "
                "is it damaged? move it away to start it empty)"
            ) from None
        #: Counts reopens: a writer whose handle was replaced meanwhile tries the new one.
        self._generation = 0
        self._lock = threading.Lock()
        self._next_try = 0.0
        #: A write failed and none has succeeded since (closing then reports it again).
        self._failing = False

    # -- reads ----------------------------------------------------------------------------------

    def get(self, key: bytes, read_opt: ReadOptions | None = None) -> bytes | None:
        """The value of `key`, or None."""
        db = self._handle()
        return cast("bytes | None", db.get(key) if read_opt is None else db.get(key, read_opt))

    def items(
        self,
        *,
        from_key: bytes | None = None,
        backwards: bool = False,
        read_opt: ReadOptions | None = None,
    ) -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs from `from_key` on, in key order (or reverse)."""
        items = self._handle().items(backwards=backwards, from_key=from_key, read_opt=read_opt)
        return cast("Iterator[tuple[bytes, bytes]]", iter(items))

    def iter(self, read_opt: ReadOptions | None = None) -> RdictIter:
        """A raw iterator (seek, valid, key, value, next)."""
        db = self._handle()
        return db.iter() if read_opt is None else db.iter(read_opt)

    # -- writes ---------------------------------------------------------------------------------

    def write(self, batch: Batch, options: WriteOptions | None = None) -> None:
        """Writes `batch` atomically."""
        self._do(lambda db: db.write(batch._build(), options))

    def put(self, key: bytes, value: bytes, options: WriteOptions | None = None) -> None:
        """Sets `key` to `value`."""
        self._do(lambda db: db.put(key, value, options))

    def delete(self, key: bytes, options: WriteOptions | None = None) -> None:
        """Deletes `key`."""
        self._do(lambda db: db.delete(key, options))

    def delete_range(self, begin: bytes, end: bytes) -> None:
        """Deletes the keys from `begin` up to (not including) `end`."""
        self._do(lambda db: db.delete_range(begin, end))

    def close(self) -> None:
        """Closes the database (its memtables are flushed); idempotent."""
        with self._lock:
            db, self._db = self._db, None
            self._next_try = float("inf")  # closed on purpose: no reopen
            failing = self._failing
        if db is None:
            return
        try:
            db.close()
        except Exception:
            if not failing:
                raise  # one that failed a write reports it again; it is closed all the same

    # -- failures -------------------------------------------------------------------------------

    def _handle(self) -> Rdict:
        db = self._db
        if db is None:  # a reopen failed: try again
            db = self._reopen(self._generation, None)
        return db

    def _do(self, op: Callable[[Rdict], Any]) -> None:
        db, generation = self._handle(), self._generation
        try:
            op(db)
            return
        except Exception as e:  # RocksDB refuses writes from now on: reopen, try once more
            self._failing = True
            db = self._reopen(generation, e)
        try:
            op(db)
        except Exception as e:
            raise self._error(e) from None
        self._failing = False

    def _reopen(self, generation: int, cause: Exception | None) -> Rdict:
        """A handle that can write: the current one if another thread reopened the database
        since `generation`, else the database reopened when its disk has room; raises why
        not otherwise (`cause`: the failed write's error)."""
        with self._lock:
            if self._generation != generation and self._db is not None:
                return self._db
            if self._next_try == float("inf"):
                raise StoreWriteError(f"the database at {self.path} is closed")
            if cause is not None and not is_disk_full(cause) and self._db is not None:
                # Not a want of space: reopening would not help, say what it was.
                raise self._error(cause)
            if time.monotonic() < self._next_try or not _has_room(self.path):
                raise self._error(cause)
            self._next_try = time.monotonic() + _RETRY_S
            old, self._db = self._db, None
            if old is not None:
                with contextlib.suppress(Exception):  # it reports the error it holds
                    old.close()
            try:
                self._db = Rdict(str(self.path), self._options)
            except Exception as e:
                raise self._error(e) from None
            self._generation += 1
            return self._db

    def _error(self, e: Exception | None) -> StoreWriteError:
        if e is None:
            if not _has_room(self.path):
                return write_error(self.path, OSError(errno.ENOSPC, "No space left on device"))
            return StoreWriteError(
                f"the database at {self.path} is being reopened after a failed write (try again)"
            )
        return write_error(self.path, e)


def write_error(path: Path, e: BaseException) -> StoreWriteError:
    """The error to raise for a failed write under `path`: StoreFullError for a full disk
    (the node resumes by itself once space is freed), StoreWriteError naming `e` otherwise."""
    if is_disk_full(e):
        return StoreFullError(
            f"the disk holding {path} is full (No space left on device): nothing can be "
            "written there (free space; writes resume by themselves)"
        )
    why = str(e).splitlines()[0] if str(e) else type(e).__name__
    return StoreWriteError(f"cannot write {path}: {why} (check disk space and permissions)")


def _has_room(path: Path) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= _ROOM
