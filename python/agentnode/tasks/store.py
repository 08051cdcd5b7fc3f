"""The durable task store: RocksDB (rocksdict) for records, files for checkpoint blobs.

Writes go through one writer thread that commits everything pending as a single WriteBatch
(group commit), so the event loop never blocks on disk and a burst of transitions costs one
WAL write. `await put(...)` returns only after the batch holding it is written, so a caller that
acknowledges after the await never acknowledges something a process crash can lose (with
`sync=True`, nor a power loss).
"""

from __future__ import annotations

import asyncio
import os
import queue
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch, WriteOptions

from agentnode.errors import TaskError
from agentnode.tasks.model import Task

__all__ = ["TaskStore"]

_TASK = b"t/"
_SEQ = b"meta/seq"
_MAX_CHECKPOINT = 64 << 20

_Item = tuple[list[Task], asyncio.AbstractEventLoop, asyncio.Future[None]]


class TaskStore:
    """Task records under `root/db`, checkpoints under `root/checkpoints/<task id>`."""

    def __init__(self, root: Path, *, sync: bool = False) -> None:
        """Opens (creating) the store.

        Every batch reaches RocksDB's write-ahead log in the kernel before `put` returns, which
        survives a crash or `kill -9` of this process. `sync=True` also fsyncs each batch to
        survive power loss; rocksdict holds the GIL while it writes, so that stalls the event
        loop for the fsync, once per batch.
        """
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        # Half-written checkpoints of a process that died mid-write; the last complete one stays.
        for stale in self.checkpoints.glob("*.tmp"):
            stale.unlink()
        opts = Options(raw_mode=True)
        opts.create_if_missing(True)
        self._db = Rdict(str(root / "db"), opts)
        self._wopts = WriteOptions()
        self._wopts.sync = sync
        raw = self._db.get(_SEQ)
        self._seq = int(raw) if raw else 0
        self._closed = False
        self._pending: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._writer = threading.Thread(
            target=self._write_loop, name="agentnode-store", daemon=True
        )
        self._writer.start()

    def next_seq(self) -> int:
        """A new submission sequence number, persisted with the next write."""
        self._seq += 1
        return self._seq

    async def put(self, *tasks: Task) -> None:
        """Persists the task records; returns once they are durable."""
        if self._closed:
            raise TaskError(f"the task store at {self.root} is closed (reopen it)")
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.put((list(tasks), loop, done))
        await done

    def put_now(self, *tasks: Task) -> None:
        """Synchronous `put`, for code that is not on an event loop."""
        self._commit(list(tasks))

    def load(self) -> list[Task]:
        """Every stored task, in submission order."""
        tasks = [
            Task.from_json(bytes(v))
            for k, v in self._db.items(from_key=_TASK)
            if isinstance(k, bytes) and k.startswith(_TASK) and isinstance(v, bytes)
        ]
        return sorted(tasks, key=lambda t: t.seq)

    def _commit(self, tasks: Iterable[Task]) -> None:
        batch = WriteBatch(raw_mode=True)
        for t in tasks:
            batch.put(_TASK + t.id.encode(), t.to_json())
        batch.put(_SEQ, str(self._seq).encode())
        self._db.write(batch, self._wopts)

    def _write_loop(self) -> None:
        while (item := self._pending.get()) is not None:
            items = [item]
            while True:
                try:
                    nxt = self._pending.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._pending.put(None)
                    break
                items.append(nxt)
            error: BaseException | None = None
            try:
                self._commit(t for tasks, _, _ in items for t in tasks)
            except Exception as e:
                error = TaskError(
                    f"cannot write the task store at {self.root}: {e} (check disk space and permissions)"
                )
            for _, loop, done in items:
                loop.call_soon_threadsafe(_settle, done, error)

    def checkpoint_path(self, task_id: str) -> Path:
        """Where a task's checkpoint lives (given to a retried task as AGENTNODE_CHECKPOINT)."""
        if not task_id.isalnum():
            raise TaskError(f"invalid task id {task_id!r} (ids are alphanumeric)")
        return self.checkpoints / task_id

    def write_checkpoint(self, task_id: str, blob: bytes) -> Path:
        """Stores a checkpoint atomically (temp file, fsync, rename) and returns its path."""
        if len(blob) > _MAX_CHECKPOINT:
            raise TaskError(
                f"checkpoint of {len(blob)} bytes exceeds {_MAX_CHECKPOINT} (store less state)"
            )
        path = self.checkpoint_path(task_id)
        fd, tmp = tempfile.mkstemp(dir=self.checkpoints, prefix=task_id, suffix=".tmp")
        try:
            with open(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        return path

    def read_checkpoint(self, task_id: str) -> bytes | None:
        path = self.checkpoint_path(task_id)
        return path.read_bytes() if path.exists() else None

    def close(self) -> None:
        """Finishes pending writes and closes the database."""
        if self._closed:
            return
        self._closed = True
        self._pending.put(None)
        self._writer.join()
        self._db.close()


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)
