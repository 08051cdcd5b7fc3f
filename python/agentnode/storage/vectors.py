"""Vector collections on disk: a usearch HNSW index in Rust, recorded in RocksDB.

Layout under the store's directory::

    rocksdb/                       the record (rocksdict, raw bytes keys)
        c/<name>                   collection config (JSON)
        v/<name>\\0<key u64 BE>     label header + float32 vector
        l/<name>\\0<seq u64 BE>     op log since the last checkpoint: b"u"/b"d" + key
        s/<name>                   last logged sequence number (u64 BE)
    index/<name>.<seq>.anvec       index checkpoint covering ops up to <seq>

Every write goes to RocksDB first (one WriteBatch: value, log entry, sequence) and to the index
second, so the index can always be brought up to date: at open the newest checkpoint is loaded and
the log after it replayed; a missing or corrupt checkpoint is rebuilt from the `v/` records.
Writes to one collection are serialised (the record and the index must apply them in the same
order); searches run concurrently with writes and with each other, the GIL released in Rust.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import threading
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rocksdict import WriteOptions

from agentnode._native import VectorCollection
from agentnode.errors import CollectionExistsError, UnknownCollectionError, VectorError
from agentnode.storage.rocks import Batch, Rocks

__all__ = [
    "MAX_DIMS",
    "Collection",
    "CollectionConfig",
    "Match",
    "Record",
    "VectorStore",
    "check_key",
]

# Bounds dims (the index's own MAX_DIMS) and the graph's knobs: more than any embedding model or
# graph uses; a larger value would overflow the native call's integer types.
_MAX = 1 << 16
#: The most dimensions a collection may have.
MAX_DIMS = _MAX

log = logging.getLogger(__name__)

Metric = Literal["cos", "l2", "ip"]
# "i8+f32": an i8 graph plus an exact f32 copy of each vector that re-ranks its candidates;
# about twice f32's queries per second at equal recall, for cos only (see the Rust `Dtype`).
Dtype = Literal["f32", "f16", "i8", "i8+f32"]

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_KEY = 2**64 - 2  # usearch reserves 2**64 - 1 for free slots
_U64 = struct.Struct(">Q")
_HEADER = struct.Struct("<I")
_REBUILD_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class CollectionConfig:
    """A collection's shape and HNSW parameters (0 means usearch's default)."""

    dims: int
    metric: Metric = "cos"
    dtype: Dtype = "f32"
    connectivity: int = 0
    expansion_add: int = 0
    expansion_search: int = 0

    def native_kwargs(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "dtype": self.dtype,
            "connectivity": self.connectivity,
            "expansion_add": self.expansion_add,
            "expansion_search": self.expansion_search,
        }


@dataclass(frozen=True, slots=True)
class Match:
    """One search hit; `distance` is smaller for closer vectors. `metadata` only when asked."""

    key: int
    distance: float
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Record:
    """A stored vector with its labels, as recorded in RocksDB."""

    key: int
    vector: list[float]
    tenant: str
    namespace: str
    task: str
    metadata: dict[str, Any]


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise VectorError(
            f"bad collection name {name!r} (use 1-64 letters, digits, '_', '.' or '-')"
        )


def check_key(key: object) -> int:
    """Returns `key` if it can key a vector, else raises VectorError."""
    if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= _MAX_KEY:
        raise VectorError(f"bad key {key!r} (keys are integers from 0 to 2**64-2)")
    return key


def _floats(vectors: object, *, rows: int, dims: int) -> memoryview[Any]:
    """`vectors` as a flat float32 memoryview of `rows * dims` values.

    Accepts a float32 buffer (numpy array, `array('f')`) or nested sequences of numbers.
    """
    view: memoryview[Any]
    try:
        view = memoryview(vectors)  # type: ignore[arg-type]
    except TypeError:
        flat = array("f")
        try:
            seq = vectors if rows != 1 or not _is_flat(vectors) else [vectors]
            for row in seq:  # type: ignore[attr-defined]
                flat.extend(row)
        except (TypeError, OverflowError) as e:
            raise VectorError(f"vectors must be sequences of numbers ({e})") from None
        view = memoryview(flat)
    else:
        if view.format not in ("f", "<f", "=f"):
            raise VectorError(
                f"vector buffer has format {view.format!r} (send float32, e.g. numpy.float32)"
            )
        # A strided view (a numpy slice with a step) is copied into C order once.
        view = (view if view.c_contiguous else memoryview(view.tobytes())).cast("B").cast("f")
    if len(view) != rows * dims:
        if rows == 1:
            raise VectorError(
                f"vector has {len(view)} dimensions but the collection expects {dims} "
                f"(send vectors of length {dims})"
            )
        raise VectorError(
            f"batch has {rows} keys but {len(view) / dims:g} vectors of {dims} dimensions "
            "(send one vector per key)"
        )
    return view


def _per_key(field: str, value: str | Sequence[str], rows: int) -> list[str]:
    """`value` for each of `rows` keys: one string for all, or a sequence of one per key."""
    if isinstance(value, str):
        return [value] * rows
    if not isinstance(value, Sequence):
        raise VectorError(f"{field} must be a string, got {type(value).__name__}")
    values = list(value)
    if len(values) != rows:
        raise VectorError(
            f"batch has {rows} keys but {len(values)} {field} labels (send one per key or one)"
        )
    for text in values:
        if not isinstance(text, str):
            raise VectorError(f"{field} must be a string, got {type(text).__name__}")
    return values


def _metadata_json(key: int, metadata: Mapping[str, Any] | None) -> bytes:
    try:
        return json.dumps(dict(metadata or {}), separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise VectorError(
            f"metadata of key {key} cannot be stored as JSON ({e}; use strings, numbers, "
            "booleans, null, lists and objects)"
        ) from None


def _is_flat(seq: object) -> bool:
    try:
        return len(seq) == 0 or not hasattr(seq[0], "__len__")  # type: ignore[arg-type,index]
    except TypeError:
        return False


class Collection:
    """One named collection of a `VectorStore`. Get it from `VectorStore.collection`."""

    def __init__(
        self,
        store: VectorStore,
        name: str,
        config: CollectionConfig,
        index: VectorCollection,
        *,
        saved_seq: int | None = None,
    ) -> None:
        self._store = store
        # The sequence number of the checkpoint file this index matches, if any.
        self.saved_seq = saved_seq
        self.name = name
        self.config = config
        self._index = index
        self._write = threading.Lock()
        self._prefix = f"v/{name}\0".encode()
        self._log_prefix = f"l/{name}\0".encode()
        self._seq_key = f"s/{name}".encode()
        # Set under `_write` by `drop_collection`, so a background checkpoint that was about to
        # run does not write a file for a collection that no longer exists.
        self._dropped = False

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and 0 <= key <= _MAX_KEY and key in self._index

    @property
    def index(self) -> VectorCollection:
        """The native collection (for benchmarks and tests that need raw speed)."""
        return self._index

    def upsert(
        self,
        key: int,
        vector: Sequence[float] | memoryview | Any,
        *,
        tenant: str,
        namespace: str = "",
        task: str = "",
        metadata: Mapping[str, Any] | None = None,
        sync: bool = False,
    ) -> None:
        """Inserts or replaces `key`. `sync=True` fsyncs the RocksDB write-ahead log first."""
        self.upsert_batch(
            [key],
            _floats(vector, rows=1, dims=self.config.dims),
            tenant=tenant,
            namespace=namespace,
            task=task,
            metadata=None if metadata is None else [metadata],
            sync=sync,
        )

    def upsert_batch(
        self,
        keys: Sequence[int],
        vectors: Any,
        *,
        tenant: str,
        namespace: str | Sequence[str] = "",
        task: str | Sequence[str] = "",
        metadata: Sequence[Mapping[str, Any]] | None = None,
        sync: bool = False,
        threads: int = 2,
    ) -> None:
        """Upserts `len(keys)` vectors (a float32 array of shape (n, dims) or nested lists).

        `namespace` and `task` label the whole batch, or each key when given one string per key.
        The whole batch is validated before anything is written; then it is recorded in RocksDB
        in one WriteBatch and added to the index on `threads` threads.
        """
        keys = [check_key(k) for k in keys]
        if len(set(keys)) != len(keys):
            raise VectorError("batch repeats a key (send each key once per batch)")
        if metadata is not None and len(metadata) != len(keys):
            raise VectorError(
                f"batch has {len(keys)} keys but {len(metadata)} metadata entries "
                "(send one per key or none)"
            )
        if not isinstance(tenant, str):
            raise VectorError(f"tenant must be a string, got {type(tenant).__name__}")
        if not tenant:
            raise VectorError("tenant is empty (every vector belongs to a tenant)")
        namespaces = _per_key("namespace", namespace, len(keys))
        tasks = _per_key("task", task, len(keys))
        flat = _floats(vectors, rows=len(keys), dims=self.config.dims)
        self._index.check_batch(keys, flat)
        payloads = [
            _metadata_json(key, m)
            for key, m in zip(
                keys, metadata if metadata is not None else [None] * len(keys), strict=True
            )
        ]
        heads = [
            json.dumps([tenant, n, t]).encode() for n, t in zip(namespaces, tasks, strict=True)
        ]
        row = self.config.dims * 4
        raw = flat.cast("B")
        with self._write:
            batch = Batch()
            seq = self._store._seq(self.name)
            for i, (key, head, payload) in enumerate(zip(keys, heads, payloads, strict=True)):
                seq += 1
                value = b"".join(
                    (
                        _HEADER.pack(len(head)),
                        head,
                        _HEADER.pack(len(payload)),
                        payload,
                        raw[i * row : (i + 1) * row],
                    )
                )
                batch.put(self._prefix + _U64.pack(key), value)
                batch.put(self._log_prefix + _U64.pack(seq), b"u" + _U64.pack(key))
            batch.put(self._seq_key, _U64.pack(seq))
            self._store._commit(batch, sync=sync)
            labels = [
                (tenant, n, t, p) for n, t, p in zip(namespaces, tasks, payloads, strict=True)
            ]
            self._index.upsert_batch(keys, flat, labels, threads=threads)

    def delete(self, key: int, *, sync: bool = False) -> bool:
        """Removes `key`; returns whether it was present."""
        key = check_key(key)
        with self._write:
            if key not in self._index:
                return False
            seq = self._store._seq(self.name) + 1
            batch = Batch()
            batch.delete(self._prefix + _U64.pack(key))
            batch.put(self._log_prefix + _U64.pack(seq), b"d" + _U64.pack(key))
            batch.put(self._seq_key, _U64.pack(seq))
            self._store._commit(batch, sync=sync)
            return self._index.delete(key)

    def get(self, key: int) -> Record | None:
        """The recorded vector and labels of `key`, or None."""
        value = self._store._db.get(self._prefix + _U64.pack(check_key(key)))
        return None if value is None else _decode(key, value)

    def search(
        self,
        query: Sequence[float] | Any,
        k: int = 10,
        *,
        tenant: str | None = None,
        namespace: str | None = None,
        task: str | None = None,
        keys: Iterable[int] | None = None,
        with_metadata: bool = False,
    ) -> list[Match]:
        """The `k` nearest vectors passing every given filter, closest first.

        Filters (tenant, namespace, task, a key set) are evaluated in Rust, by an exact scan
        when they admit few vectors and during the graph search otherwise, so a selective
        filter still returns `k` hits when `k` exist.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise VectorError(f"k must be a positive integer, got {k!r}")
        flat = _floats(query, rows=1, dims=self.config.dims)
        found = self._index.search(
            flat,
            k,
            tenant=tenant,
            namespace=namespace,
            task=task,
            keys=None if keys is None else {check_key(x) for x in keys},
        )
        return [self._match(key, dist, with_metadata) for key, dist in found]

    def search_batch(
        self,
        queries: Any,
        k: int = 10,
        *,
        tenant: str | None = None,
        namespace: str | None = None,
        task: str | None = None,
        with_metadata: bool = False,
        threads: int = 2,
    ) -> list[list[Match]]:
        """`search` for each row of `queries` (shape (n, dims)), on `threads` threads."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise VectorError(f"k must be a positive integer, got {k!r}")
        try:
            rows = len(queries)
        except TypeError:
            raise VectorError("queries must be a 2-D float32 array or a list of vectors") from None
        flat = _floats(queries, rows=rows, dims=self.config.dims)
        found = self._index.search_batch(
            flat, k, tenant=tenant, namespace=namespace, task=task, threads=threads
        )
        return [[self._match(key, dist, with_metadata) for key, dist in hits] for hits in found]

    def _match(self, key: int, distance: float, with_metadata: bool) -> Match:
        if not with_metadata:
            return Match(key, distance)
        label = self._index.label(key)
        return Match(key, distance, json.loads(label[3]) if label else {})

    def checkpoint(self) -> Path:
        """Saves the index atomically and trims the op log it covers; returns the file."""
        with self._write:
            seq = self._store._seq(self.name)
            path = self._store._index_path(self.name, seq)
            if self._dropped or (self.saved_seq == seq and path.exists()):
                return path  # dropped, or nothing written since the last checkpoint
            self._index.save(path)
            self.saved_seq = seq
            self._store._db.delete_range(self._log_prefix, self._log_prefix + _U64.pack(seq + 1))
            for old in self._store._index_files(self.name):
                if old[1] != path:
                    old[1].unlink(missing_ok=True)
            return path


def _decode(key: int, value: bytes) -> Record:
    (tenant, namespace, task, payload), raw = _split(value)
    vector = array("f")
    vector.frombytes(raw)
    return Record(key, vector.tolist(), tenant, namespace, task, json.loads(payload))


def _split(value: bytes) -> tuple[tuple[str, str, str, bytes], bytes]:
    """Labels (with the raw metadata payload) and raw vector bytes of a `v/` record."""
    (hlen,) = _HEADER.unpack_from(value, 0)
    tenant, namespace, task = json.loads(value[4 : 4 + hlen])
    at = 4 + hlen
    (plen,) = _HEADER.unpack_from(value, at)
    return (tenant, namespace, task, value[at + 4 : at + 4 + plen]), value[at + 4 + plen :]


class VectorStore:
    """Named vector collections under one directory; close it (or use `with`) to checkpoint.

    Thread-safe: collections may be written and searched from many threads at once.
    """

    def __init__(self, path: str | Path, *, threads: int = 2) -> None:
        self.path = Path(path)
        self._threads = threads
        (self.path / "index").mkdir(parents=True, exist_ok=True)
        # A crash during a checkpoint leaves the temporary file the rename never took.
        for stray in (self.path / "index").glob("*.anvec.tmp*"):
            stray.unlink(missing_ok=True)
        self._db = Rocks(self.path / "rocksdb")
        self._sync = WriteOptions()
        self._sync.sync = True
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._closed = False
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_collection(
        self,
        name: str,
        *,
        dims: int,
        metric: Metric = "cos",
        dtype: Dtype = "f32",
        connectivity: int = 0,
        expansion_add: int = 0,
        expansion_search: int = 0,
    ) -> Collection:
        """Creates a collection; raises VectorError if the name is taken or a parameter is bad."""
        _check_name(name)
        for label, value, low in (
            ("dims", dims, 1),
            ("connectivity", connectivity, 0),
            ("expansion_add", expansion_add, 0),
            ("expansion_search", expansion_search, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= _MAX:
                raise VectorError(f"{label} must be an integer from {low} to {_MAX}, got {value!r}")
        config = CollectionConfig(
            dims, metric, dtype, connectivity, expansion_add, expansion_search
        )
        with self._lock:
            if self._db.get(f"c/{name}".encode()) is not None:
                raise CollectionExistsError(
                    f"collection {name!r} already exists (pick another name)"
                )
            index = VectorCollection(dims, **config.native_kwargs())
            self._db.put(
                f"c/{name}".encode(), json.dumps(_config_json(config)).encode(), self._sync
            )
            coll = Collection(self, name, config, index)
            self._collections[name] = coll
            return coll

    def collection(self, name: str) -> Collection:
        """The named collection, opened on first use; UnknownCollectionError if absent."""
        _check_name(name)
        with self._lock:
            coll = self._collections.get(name)
            if coll is None:
                raw = self._db.get(f"c/{name}".encode())
                if raw is None:
                    raise UnknownCollectionError(
                        f"no vector collection named {name!r} (create it first)"
                    )
                config = CollectionConfig(**json.loads(raw))
                index, saved = self._open_index(name, config)
                coll = Collection(self, name, config, index, saved_seq=saved)
                self._collections[name] = coll
            return coll

    def collections(self) -> list[str]:
        """Names of every collection, sorted."""
        return sorted(bytes(k)[2:].decode() for k, _ in self._scan(b"c/"))

    def drop_collection(self, name: str) -> None:
        """Deletes a collection, its records and its index files."""
        coll = self.collection(name)
        with self._lock, coll._write:
            for prefix in (coll._prefix, coll._log_prefix):
                self._db.delete_range(prefix, prefix[:-1] + b"\x01")
            self._db.delete(coll._seq_key)
            self._db.delete(f"c/{name}".encode(), self._sync)
            for _, path in self._index_files(name):
                path.unlink(missing_ok=True)
            coll._dropped = True
            del self._collections[name]

    def checkpoint(self) -> None:
        """Checkpoints every open collection (see `Collection.checkpoint`)."""
        with self._lock:
            colls = list(self._collections.values())
        for coll in colls:
            coll.checkpoint()

    def start_checkpointer(self, interval: float = 300.0) -> None:
        """Checkpoints every `interval` seconds on a background thread until `close()`.

        Only collections written since their last checkpoint are saved. Without it, a store
        checkpoints only at `close()`, and a crash makes the next open replay every write since
        the store was opened.
        """
        if self._checkpointer is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.checkpoint()
                except Exception:  # retried next interval; the RocksDB record stays complete
                    log.exception("periodic vector checkpoint failed in %s", self.path)

        self._checkpointer = threading.Thread(
            target=loop, name="agentnode-vector-checkpoint", daemon=True
        )
        self._checkpointer.start()

    def close(self) -> None:
        """Stops the checkpointer, checkpoints and closes the store; idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        self.checkpoint()
        self._collections.clear()
        self._db.close()
        self._closed = True

    # -- internals -------------------------------------------------------------------------

    def _commit(self, batch: Batch, *, sync: bool) -> None:
        if sync:
            self._db.write(batch, self._sync)
        else:
            self._db.write(batch)

    def _seq(self, name: str) -> int:
        raw = self._db.get(f"s/{name}".encode())
        return 0 if raw is None else int(_U64.unpack(raw)[0])

    def _scan(self, prefix: bytes) -> Iterator[tuple[bytes, bytes]]:
        it = self._db.iter()
        it.seek(prefix)
        while it.valid():
            key = it.key()
            if not key.startswith(prefix):
                break
            yield key, it.value()
            it.next()

    def _index_path(self, name: str, seq: int) -> Path:
        return self.path / "index" / f"{name}.{seq}.anvec"

    def _index_files(self, name: str) -> list[tuple[int, Path]]:
        found = []
        for p in (self.path / "index").glob(f"{name}.*.anvec"):
            middle = p.name[len(name) + 1 : -len(".anvec")]
            if middle.isdigit():
                found.append((int(middle), p))
        return sorted(found)

    def _open_index(
        self, name: str, config: CollectionConfig
    ) -> tuple[VectorCollection, int | None]:
        """The index brought up to date, and the checkpoint it still matches (None if rebuilt
        or changed by the log replay)."""
        seq = self._seq(name)
        prefix = f"v/{name}\0".encode()
        files = [f for f in self._index_files(name) if f[0] <= seq]
        if files:
            saved, path = files[-1]
            try:
                index = VectorCollection.load(path, config.dims, **config.native_kwargs())
            except VectorError as e:
                log.warning("vector collection %r: %s; rebuilding from RocksDB", name, e)
            else:
                replayed = self._replay(name, index, saved, prefix)
                count = self._count(prefix)
                if len(index) == count:
                    return index, None if replayed else saved
                log.warning(
                    "vector collection %r: index has %d vectors, record has %d; rebuilding",
                    name,
                    len(index),
                    count,
                )
        return self._rebuild(prefix, config), None

    def _count(self, prefix: bytes) -> int:
        return sum(1 for _ in self._scan(prefix))

    def _replay(self, name: str, index: VectorCollection, saved: int, prefix: bytes) -> int:
        """Applies the logged ops after checkpoint `saved`; returns how many."""
        log_prefix = f"l/{name}\0".encode()
        applied = 0
        for key, op in self._scan(log_prefix):
            if _U64.unpack(key[len(log_prefix) :])[0] <= saved:
                continue
            applied += 1
            vkey = _U64.unpack(op[1:])[0]
            value = self._db.get(prefix + op[1:])
            if value is None:
                index.delete(vkey)
            else:
                label, raw = _split(value)
                index.upsert_batch([vkey], memoryview(raw).cast("f"), [label], threads=1)
        return applied

    def _rebuild(self, prefix: bytes, config: CollectionConfig) -> VectorCollection:
        index = VectorCollection(config.dims, **config.native_kwargs())
        keys: list[int] = []
        labels: list[tuple[str, str, str, bytes]] = []
        rows: list[bytes] = []

        def flush() -> None:
            if keys:
                flat = array("f")
                flat.frombytes(b"".join(rows))
                index.upsert_batch(keys, flat, labels, threads=self._threads)
                keys.clear()
                labels.clear()
                rows.clear()

        for key, value in self._scan(prefix):
            label, raw = _split(value)
            keys.append(_U64.unpack(key[len(prefix) :])[0])
            labels.append(label)
            rows.append(raw)
            if len(keys) >= _REBUILD_CHUNK:
                flush()
        flush()
        return index


def _config_json(config: CollectionConfig) -> dict[str, Any]:
    return {
        "dims": config.dims,
        "metric": config.metric,
        "dtype": config.dtype,
        "connectivity": config.connectivity,
        "expansion_add": config.expansion_add,
        "expansion_search": config.expansion_search,
    }
