"""The durable task store: RocksDB (rocksdict) for records and checkpoint blobs.

A record is binary: a fixed header repeating what the scheduler needs (state, class, tenant,
sequence number, requests, backoff end), then the whole task as msgpack. Recovery scans the
records once, reads only the headers, and keeps each body undecoded until the task is used, so a
restart with a long queue costs a scan rather than building every task.

Every record put during one turn of the event loop is committed as one WriteBatch at the end of
that turn (group commit), so a burst of transitions costs one WAL write. The commit runs on the
event loop's thread: rocksdict holds the GIL while it writes, so a writer thread would block the
loop just the same and only add two thread hand-offs per write. `await put(...)` returns only
after the batch holding it is written, so a caller that acknowledges after the await never
acknowledges something a process crash can lose (with `sync=True`, nor a power loss).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import struct
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from operator import itemgetter
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
from rocksdict import WriteOptions

from agentnode.errors import AgentnodeError, DiskFullError, StoreWriteError, TaskError
from agentnode.isolation.spec import Sandbox
from agentnode.storage.rocks import Batch, Rocks, is_disk_full
from agentnode.tasks.model import CLASSES, TERMINAL, State, Task, TaskSpec

__all__ = [
    "Page",
    "Queued",
    "Recovered",
    "SubmitKey",
    "TaskStore",
    "body",
    "body_of",
    "decode",
    "encode",
    "lane_of",
    "queued_of",
    "seq_of",
    "state_of",
]

_TASK = b"t/"
# Submission order: b"s/" + seq (8 bytes, big-endian, so keys sort by seq) → submission time
# (f64) + task id. Pages and the retention sweep walk it; new tasks only append to it.
_ORDER = b"s/"
_ORDER_VALUE = struct.Struct("<d")
# Set once every record has its _ORDER entry (records written before it existed get one).
_ORDERED = b"meta/ordered"
_SEQ = b"meta/seq"
# Idempotency keys of submits: b"i/" + the key → msgpack [task id, time, request digest].
_KEY = b"i/"
# A task's checkpoint: b"c/" + task id → the blob. In the database, not a file per save: a
# write-and-rename costs 0.3-2 ms of the event loop (ext4 flushes a file renamed over another),
# a database put 0.02 ms, and an agent checkpoints every step.
_CHECKPOINT = b"c/"
_MAX_CHECKPOINT = 64 << 20

#: The record format this code writes; it also reads format 1 (the spec's sandbox fields
#: flat in it). Any other first byte is refused with a clear error.
_FORMAT = 2
_FORMAT_FLAT = 1
_FLAT_BYTE = bytes([_FORMAT_FLAT])
# Stored as indexes: the order is part of the format (append only, or bump _FORMAT).
_STATES = (State.QUEUED, State.STARTING, State.RUNNING, State.SUCCEEDED, State.FAILED,
           State.TIMED_OUT, State.CANCELLED, State.LOST)  # fmt: skip
_STATE_INDEX = {s: i for i, s in enumerate(_STATES)}
_CLASS_INDEX = {c: i for i, c in enumerate(CLASSES)}
# format, state, class, tenant length, seq, cpu_millis, memory_bytes, not_before; then the
# tenant's UTF-8 bytes, then the msgpack body.
_HEAD = struct.Struct("<BBBBQQQd")


#: A queued task as the scheduler needs it (from its record's header, or `queued_of`):
#: (seq, tenant, class, cpu_millis, memory_bytes, id, not_before). The first five are what
#: `Scheduler.push_many` takes. Plain tuples: recovery makes one per queued task.
Queued = tuple[int, str, str, int, int, str, float]


class SubmitKey(NamedTuple):
    """A client's idempotency key for one submit, and the task it made."""

    key: str
    task_id: str
    at: float
    #: Of the request that made it: the same key with another request is refused.
    digest: str


class Recovered(NamedTuple):
    """What `TaskStore.load` found in one scan that reads only the records' headers."""

    #: Every live (not ended) task's record by id; `decode` gives the task. Ended ones stay
    #: in the store only (`TaskStore.get`).
    records: dict[str, bytes]
    #: The queued tasks, in submission order.
    queued: list[Queued]
    #: The ids of the tasks that were starting or running.
    interrupted: list[str]


class Page(NamedTuple):
    """One page of stored records in submission order (`TaskStore.page`)."""

    #: (task id, record) of the matching tasks.
    records: list[tuple[str, bytes]]
    #: The seq to continue after (None: nothing is left to walk).
    after: int | None


def state_of(raw: bytes) -> State:
    """The state in a record's header."""
    return _STATES[raw[1]]


def seq_of(raw: bytes) -> int:
    """The submission sequence number in a record's header."""
    seq: int = _HEAD.unpack_from(raw)[4]
    return seq


def queued_of(task: Task) -> Queued:
    """What the scheduler needs of a queued task."""
    s = task.spec
    return (task.seq, s.tenant, s.cls, s.cpu_millis, s.memory_bytes, task.id, task.not_before)


def body_of(task: Task) -> dict[str, Any]:
    """A task as its record's body holds it: plain data, the sandbox in its JSON form (the
    API's). Maps rather than arrays, so a field added to Task or TaskSpec later decodes old
    records with its default."""
    spec = task.spec
    return {
        **vars(task),
        "state": task.state.value,
        "spec": {**vars(spec), "sandbox": spec.sandbox.to_json()},
    }


def body(raw: bytes) -> dict[str, Any]:
    """The body of a record that `TaskStore.load` accepted, as `body_of` gives it, without
    building (and validating) the task: what listing a stored page needs. `TaskError` if
    it is damaged."""
    if raw[0] != _FORMAT:
        return body_of(decode(raw))
    try:
        d = msgpack.unpackb(raw[_HEAD.size + raw[3] :])
    except (ValueError, msgpack.UnpackException) as e:
        raise TaskError(f"a stored task record is damaged ({e})") from None
    if not isinstance(d, dict) or not isinstance(d.get("spec"), dict):
        raise TaskError("a stored task record is damaged (its body is not a task)")
    return d


def encode(task: Task) -> bytes:
    """The binary record of `task` (header, then the task as a msgpack map); `TaskError` when
    a field cannot be stored."""
    spec = task.spec
    tenant = spec.tenant.encode()
    body = body_of(task)
    try:
        head = _HEAD.pack(
            _FORMAT,
            _STATE_INDEX[task.state],
            _CLASS_INDEX[spec.cls],
            len(tenant),
            task.seq,
            spec.cpu_millis,
            spec.memory_bytes,
            task.not_before,
        )
        return head + tenant + msgpack.packb(body)
    except (struct.error, TypeError, ValueError, OverflowError) as e:
        raise TaskError(f"task {task.id}: its record cannot be stored ({e})") from None


def _submitted(raw: bytes) -> float:
    """When a stored task was submitted (0 when its body cannot be read)."""
    try:
        return float(decode(raw).history[0][1])
    except (TaskError, IndexError):
        return 0.0


def lane_of(raw: bytes) -> tuple[str, str]:
    """(class, tenant) from a record's header, which `TaskStore.load` has read once already:
    what is known of a task whose body cannot be decoded."""
    _, _, cls, n, *_ = _HEAD.unpack_from(raw)
    return CLASSES[cls], raw[_HEAD.size : _HEAD.size + n].decode()


def decode(raw: bytes) -> Task:
    """The task in a record that `TaskStore.load` accepted; `TaskError` if it is damaged."""
    try:
        d: dict[str, Any] = msgpack.unpackb(raw[_HEAD.size + raw[3] :], use_list=False)
        fields = dict(d.pop("spec"))
        if raw[0] == _FORMAT_FLAT:
            fields = _from_flat(fields)
        fields["sandbox"] = Sandbox.from_json(fields["sandbox"])
        return Task(spec=TaskSpec(**fields), state=State(d.pop("state")), **d)
    except (ValueError, TypeError, KeyError, IndexError, msgpack.UnpackException) as e:
        # A SpecError is a ValueError's sibling, not one: it says which field this code refuses.
        raise TaskError(
            f"a stored task record is damaged ({e}); move the node's data dir away to start "
            "with an empty queue"
        ) from None
    except AgentnodeError as e:
        raise TaskError(
            f"a stored task record holds a spec this agentnode refuses ({e}); cancel or move it"
        ) from None


#: Format 1 spelled the sandbox in the spec's own flat fields: (old name, JSON name).
_FLAT_RENAMED = (("cpu_millis", "cpus"), ("memory_bytes", "memory"), ("timeout_s", "timeout"))
_FLAT_SANDBOX = ("pids", "env", "network", "allow", "allow_hosts", "egress_rate", "conn_rate",
                 "publish",
                 "user", "binds", "cpu_weight", "memory_high", "swap", "tmp_size", "userns",
                 "caps", "rootfs", "cwd", "hostname")  # fmt: skip


def _upgrade(raw: bytes) -> bytes:
    """A format-1 record in this format. A spec this version refuses (an id of 4294967295, a
    packet capability with an egress policy...) is never run: a task not yet ended is
    cancelled, saying why, and keeps only its tenant, class and command."""
    try:
        return encode(decode(raw))
    except TaskError as e:
        if "refuses" not in str(e):
            raise ValueError from None  # damaged: load() names the record
        why = str(e)
    try:
        d: dict[str, Any] = msgpack.unpackb(raw[_HEAD.size + raw[3] :], use_list=False)
        old = d.pop("spec")
        spec = TaskSpec(tenant=old["tenant"], command=old["command"], cls=old["cls"])
        task = Task(spec=spec, state=State(d.pop("state")), **d)
    except (KeyError, TypeError, ValueError, AgentnodeError, msgpack.UnpackException):
        raise ValueError from None  # damaged too
    reason = f"not run: {why.removeprefix('a stored task record holds ')}"
    if task.state in TERMINAL:
        return encode(replace(task, reason=reason))
    return encode(task.moved(State.CANCELLED, time.time(), reason=reason))


def _from_flat(spec: dict[str, Any]) -> dict[str, Any]:
    """A format-1 spec's fields as this format's (the sandbox in its JSON form)."""
    box = {key: spec.pop(key) for key in _FLAT_SANDBOX if key in spec}
    for old, new in _FLAT_RENAMED:
        if old in spec:
            box[new] = spec.pop(old)
    if "cpus" in box:
        box["cpus"] = box["cpus"] / 1000
    box["env"] = dict(box.get("env", ()))
    binds = box.pop("binds", ())
    box["ro"] = [f"{src}:{dest}" for src, dest, writable in binds if not writable]
    box["rw"] = [f"{src}:{dest}" for src, dest, writable in binds if writable]
    return {**spec, "sandbox": box}


def _order_key(seq: int) -> bytes:
    return _ORDER + seq.to_bytes(8, "big")


def _order_entry(task_id: bytes, seq: int, submitted: float) -> tuple[bytes, bytes]:
    return _order_key(seq), _ORDER_VALUE.pack(submitted) + task_id


def _records(tasks: Iterable[Task]) -> list[tuple[bytes, bytes]]:
    out = []
    for t in tasks:
        task_id = t.id.encode()
        out.append((_TASK + task_id, encode(t)))
        # Rewritten with each record (it never changes): a record never lacks its entry.
        out.append(_order_entry(task_id, t.seq, t.history[0][1] if t.history else 0.0))
    return out


class TaskStore:
    """Task records and checkpoints under `root/db` (a checkpoint is copied to
    `root/checkpoints/<task id>` for an attempt that starts with one). `put` from one event
    loop."""

    def __init__(self, root: Path, *, sync: bool = False) -> None:
        """Opens (creating) the store.

        Every batch reaches RocksDB's write-ahead log in the kernel before `put` returns, which
        survives a crash or `kill -9` of this process. `sync=True` also fsyncs each batch to
        survive power loss, which stalls the event loop for the fsync, once per batch.
        Checkpoints are written the same way (`write_checkpoint`).
        """
        #: Whether records and checkpoints are fsynced (survive power loss, not only `kill -9`).
        self.sync = sync
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.inboxes = root / "inbox"
        self.inboxes.mkdir(exist_ok=True)
        # Half-written checkpoints of a process that died mid-write; the last complete one stays.
        for stale in self.checkpoints.glob("*.tmp"):
            stale.unlink()
        self._db = Rocks(root / "db")
        #: Why the store cannot write for want of space (None: it can).
        self.disk_full: str | None = None
        self._wopts = WriteOptions()
        self._wopts.sync = sync
        raw = self._db.get(_SEQ)
        self._seq = int(raw) if raw else 0
        self._closed = False
        self._pending: list[tuple[list[tuple[bytes, bytes]], asyncio.Future[None]]] = []

    def next_seq(self) -> int:
        """A new submission sequence number, persisted with the next write."""
        self._seq += 1
        return self._seq

    async def put(self, *tasks: Task, key: SubmitKey | None = None) -> None:
        """Persists the task records (and, in the same batch, a submit's idempotency `key`);
        returns once they are durable. A record that cannot be encoded fails this call alone
        (`TaskError`), before it joins the shared batch."""
        if self._closed:
            raise TaskError(f"the task store at {self.root} is closed (reopen it)")
        records = _records(tasks)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._flush)  # after the rest of this turn's callbacks
        if key is not None:
            records.append(
                (_KEY + key.key.encode(), msgpack.packb([key.task_id, key.at, key.digest]))
            )
        self._pending.append((records, done))
        await done

    def load_keys(self, since: float) -> dict[str, SubmitKey]:
        """The idempotency keys stored since `since` (older ones are deleted)."""
        found: dict[str, SubmitKey] = {}
        stale = Batch()
        for k, v in self._db.items(from_key=_KEY):
            if not k.startswith(_KEY):
                break
            try:
                task_id, at, digest = msgpack.unpackb(v)
                key = SubmitKey(k[len(_KEY) :].decode(), task_id, float(at), digest)
            except (ValueError, TypeError, msgpack.UnpackException):
                key = None
            if key is None or key.at < since:
                stale.delete(k)
            else:
                found[key.key] = key
        self._db.write(stale, self._wopts)
        return found

    def put_now(self, *tasks: Task) -> None:
        """Synchronous `put`, for code that is not on an event loop."""
        self._commit(_records(tasks))

    def load(self) -> Recovered:
        """Every stored record, read in one scan that decodes only the headers. Raises
        `TaskError` on a record of an unknown format."""
        records: dict[str, bytes] = {}
        queued: list[Queued] = []
        interrupted: list[str] = []
        unpack = _HEAD.unpack_from
        head_size = _HEAD.size
        # raw_mode: every key and value is bytes.
        items = self._db.items(from_key=_TASK)
        upgraded = Batch()
        ordered = self._db.get(_ORDERED) is not None
        for k, v in items:
            if not k.startswith(_TASK):
                break
            try:
                if v[:1] == _FLAT_BYTE:
                    v = _upgrade(v)
                    upgraded.put(k, v)
                fmt, state, cls, n, seq, cpu, mem, not_before = unpack(v)
                if fmt != _FORMAT:
                    raise ValueError
                task_id = k[2:].decode()
                st = _STATES[state]
                if not ordered:
                    upgraded.put(*_order_entry(k[2:], seq, _submitted(v)))
                if st in TERMINAL:
                    continue
                records[task_id] = v
                if st is State.QUEUED:
                    tenant = v[head_size : head_size + n].decode()
                    queued.append((seq, tenant, CLASSES[cls], cpu, mem, task_id, not_before))
                elif st is State.STARTING or st is State.RUNNING:
                    interrupted.append(task_id)
            except (struct.error, ValueError, IndexError):  # UnicodeDecodeError is a ValueError
                raise self._bad_record(k, v) from None
        if not ordered:
            upgraded.put(_ORDERED, b"1")
        if len(upgraded):
            self._db.write(upgraded, self._wopts)
        queued.sort(key=itemgetter(0))  # by seq
        return Recovered(records, queued, interrupted)

    def get(self, task_id: str) -> bytes | None:
        """The stored record of a task (None: no such task)."""
        return self._db.get(_TASK + task_id.encode())

    def page(
        self,
        *,
        after: int,
        limit: int,
        match: Callable[[bytes, float], bool],
        scan: int,
    ) -> Page:
        """Up to `limit` records for which `match(record, submitted_at)` holds, in submission
        order from the task after seq `after`, looking at `scan` tasks at most (so a filter
        that matches rarely still answers in bounded time, with a shorter page)."""
        found: list[tuple[str, bytes]] = []
        last = None
        items = self._db.items(from_key=_order_key(after + 1))
        for k, v in items:
            if not k.startswith(_ORDER) or (len(found) >= limit or scan <= 0):
                return Page(found, last if k.startswith(_ORDER) else None)
            scan -= 1
            last = int.from_bytes(k[len(_ORDER) :], "big")
            task_id = v[_ORDER_VALUE.size :].decode()
            raw = self._db.get(_TASK + v[_ORDER_VALUE.size :])
            if raw is not None and match(raw, _ORDER_VALUE.unpack_from(v)[0]):
                found.append((task_id, raw))
        return Page(found, None)

    def remove(self, tasks: Iterable[tuple[str, int]]) -> None:
        """Deletes the records, order entries and checkpoints of (id, seq) tasks (retention)."""
        batch = Batch()
        for task_id, seq in tasks:
            batch.delete(_TASK + task_id.encode())
            batch.delete(_order_key(seq))
            batch.delete(_CHECKPOINT + task_id.encode())
            for path in (self.checkpoint_path(task_id), self.inbox_path(task_id)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        if len(batch):
            self._db.write(batch, self._wopts)

    def _bad_record(self, key: bytes, raw: bytes) -> TaskError:
        if raw[:1] == b"{":
            what = "is in the JSON of an earlier development version"
        elif raw[:1] in (bytes([_FORMAT]), bytes([_FORMAT_FLAT])):
            what = f"is damaged ({len(raw)} bytes)"
        else:
            what = f"is in an unknown format (first byte {raw[:1].hex() or 'missing'})"
        return TaskError(
            f"task record {key.decode(errors='replace')} in {self.root / 'db'} {what}; this "
            f"agentnode reads record format {_FORMAT}: move the data dir away to start with an "
            "empty queue"
        )

    def _commit(self, records: Iterable[tuple[bytes, bytes]]) -> None:
        batch = Batch()
        for key, value in records:
            batch.put(key, value)
        batch.put(_SEQ, str(self._seq).encode())
        try:
            self._db.write(batch, self._wopts)
        except StoreWriteError as e:
            raise self._write_error(e) from None
        self.disk_full = None

    def _write_error(self, e: Exception) -> TaskError:
        if is_disk_full(e):
            self.disk_full = f"the disk holding {self.root} is full"
            return DiskFullError(
                f"{self.disk_full} (No space left on device): the task store cannot record "
                "anything (free space; the node resumes by itself)"
            )
        return TaskError(
            f"cannot write the task store at {self.root}: {e} (check disk space and permissions)"
        )

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return  # close() wrote them
        error: BaseException | None = None
        try:
            self._commit(r for records, _ in pending for r in records)
        except TaskError as e:
            error = e
        except Exception as e:  # not the database's (it would be a TaskError): say what it was
            error = self._write_error(e)
        for _, done in pending:
            if done.done():  # its waiter was cancelled; the write stands
                continue
            if error is None:
                done.set_result(None)
            else:
                done.set_exception(error)

    def checkpoint_path(self, task_id: str) -> Path:
        """Where a starting attempt finds its task's checkpoint as a file (`checkpoint_file`)."""
        if not task_id.isalnum():
            raise TaskError(f"invalid task id {task_id!r} (ids are alphanumeric)")
        return self.checkpoints / task_id

    def write_checkpoint(self, task_id: str, blob: bytes) -> None:
        """Stores a checkpoint, replacing the task's last one.

        Like the task records it is written with, it survives `kill -9` of the task and of the
        node when this returns, and with `sync=True` (and only then) power loss too: an fsync
        costs a step 4 ms or more on a shared disk, more than the node's whole budget around an
        agent step.
        """
        if len(blob) > _MAX_CHECKPOINT:
            raise TaskError(
                f"checkpoint of {len(blob)} bytes exceeds {_MAX_CHECKPOINT} (store less state)"
            )
        self._commit([(_CHECKPOINT + self.checkpoint_path(task_id).name.encode(), blob)])

    def read_checkpoint(self, task_id: str) -> bytes | None:
        """The task's last checkpoint, or None."""
        path = self.checkpoint_path(task_id)
        blob = self._db.get(_CHECKPOINT + task_id.encode())
        if blob is None and path.exists():  # written as a file by an earlier version
            blob = path.read_bytes()
        return blob

    def checkpoint_file(self, task_id: str) -> Path | None:
        """The task's last checkpoint written out as a file for an attempt that is starting (it
        reads it at $AGENTNODE_CHECKPOINT), or None when it has none."""
        blob = self.read_checkpoint(task_id)
        if blob is None:
            return None
        path = self.checkpoint_path(task_id)
        fd, tmp = tempfile.mkstemp(dir=self.checkpoints, prefix=task_id, suffix=".tmp")
        try:
            with open(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
        except BaseException as e:
            os.unlink(tmp)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"the disk holding {self.checkpoints} is full: task {task_id}'s checkpoint "
                    "cannot be given to its next attempt (free space)"
                ) from None
            raise
        return path

    def inbox_path(self, task_id: str) -> Path:
        """A task's inbox: what is sent to the running agent (one JSON object a line), which
        it reads at $AGENTNODE_INBOX. The node only ever appends to it."""
        return self.inboxes / self.checkpoint_path(task_id).name

    def open_inbox(self, task_id: str) -> Path:
        """The task's inbox, made empty if it has none yet (its attempts share it)."""
        path = self.inbox_path(task_id)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644))
        return path

    def deliver(self, task_id: str, message: bytes) -> None:
        """Appends one line to the task's inbox, making it if need be (its reader takes only
        whole lines). Whole or not at all: a line cut short (a full disk takes part of a
        write) is taken back, and `DiskFullError` or `TaskError` says why; a later line is
        never glued to half of it."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.inbox_path(task_id), flags, 0o644)
        except OSError as e:
            raise self._inbox_error(task_id, e) from None
        start = None
        try:
            start = os.fstat(fd).st_size
            line = memoryview(message + b"\n")
            while line:
                line = line[os.write(fd, line) :]
            if self.sync:
                os.fsync(fd)
        except OSError as e:
            if start is not None:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start)
            raise self._inbox_error(task_id, e) from None
        finally:
            os.close(fd)

    def _inbox_error(self, task_id: str, e: OSError) -> TaskError:
        if is_disk_full(e):
            return DiskFullError(
                f"the disk holding {self.inboxes} is full: the input to task {task_id} was not "
                "delivered (free space and send it again)"
            )
        return TaskError(f"the input to task {task_id} was not delivered: {e.strerror}")

    def close(self) -> None:
        """Finishes pending writes and closes the database."""
        if self._closed:
            return
        self._closed = True
        self._flush()
        self._db.close()
