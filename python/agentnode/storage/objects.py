"""The object store: content-addressed sha256 blobs with named, reference-counted references per tenant.

Layout under `root`:

    blobs/<2 hex>/<64 hex>   immutable blob files, named by the sha256 of their content
    tmp/<uuid>               blobs being written (a crash leaves one here; `open` sweeps them)
    meta/                    RocksDB: n<tenant>0<name> -> [digest, size], c<digest> -> refcount,
                             u<tenant> -> bytes referenced by the tenant

A write streams into tmp/ while hashing and counting (never the whole object in memory), fsyncs,
then renames into blobs/ and fsyncs the directory: a blob path either holds the complete content
or does not exist. Only then is the reference committed (one synced WriteBatch). Deleting the
last reference to a digest leaves its file to `gc()`, which runs under the same lock as the
rename-and-commit step so it never removes a blob a writer is about to reference.

Quota is per tenant, in bytes referenced (a blob shared by two names counts twice), checked as
bytes arrive so an oversized upload stops early and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import msgpack
from rocksdict import WriteOptions

from agentnode.durable import fsync_dir
from agentnode.errors import NotFoundError, QuotaExceededError, StorageError
from agentnode.storage.keys import check_name
from agentnode.storage.rocks import Batch, Rocks, write_error

__all__ = ["ObjectInfo", "ObjectStore", "ObjectWriter"]

CHUNK = 1 << 16


class ObjectInfo:
    """A named reference: its digest and size in bytes."""

    __slots__ = ("digest", "name", "size")

    def __init__(self, name: str, digest: str, size: int) -> None:
        self.name = name
        self.digest = digest
        self.size = size

    def to_wire(self) -> dict[str, object]:
        """The reference as the HTTP API and SDK exchange it."""
        return {"name": self.name, "digest": self.digest, "size": self.size}


class ObjectStore:
    """Objects under `root`. `quotas` maps tenant to bytes; others get `default_quota`."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        default_quota: int = 1 << 30,
        quotas: Mapping[str, int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.default_quota = default_quota
        self.quotas = dict(quotas or {})
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(exist_ok=True)
        # No writer is running yet, so anything in tmp/ was left by a crash.
        for leftover in self._tmp.iterdir():
            leftover.unlink()
        self._meta = Rocks(self.root / "meta")
        self._sync = WriteOptions()
        self._sync.sync = True
        self._lock = threading.Lock()
        self._writing: dict[str, int] = {}  # tenant -> bytes in uploads not yet committed

    def quota(self, tenant: str) -> int:
        """The tenant's quota in bytes."""
        return self.quotas.get(tenant, self.default_quota)

    def usage(self, tenant: str) -> int:
        """Bytes the tenant's references hold."""
        raw = self._meta.get(b"u" + check_name("tenant", tenant).encode())
        return 0 if raw is None else int(msgpack.unpackb(raw))

    def _ref_key(self, tenant: str, name: str) -> bytes:
        return (
            b"n"
            + check_name("tenant", tenant).encode()
            + b"\x00"
            + check_name("object name", name).encode()
        )

    def writer(self, tenant: str, name: str) -> ObjectWriter:
        """Starts a streaming upload of `name`; call `write` per chunk, then `commit` or `abort`."""
        self._ref_key(tenant, name)
        return ObjectWriter(self, tenant, name)

    def put(self, tenant: str, name: str, chunks: Iterable[bytes]) -> ObjectInfo:
        """Stores the concatenated chunks under `name` (replacing it) and returns the reference."""
        w = self.writer(tenant, name)
        try:
            for chunk in chunks:
                w.write(chunk)
        except BaseException:
            w.abort()
            raise
        return w.commit()

    def stat(self, tenant: str, name: str) -> ObjectInfo:
        """The reference `name`, or NotFoundError."""
        raw = self._meta.get(self._ref_key(tenant, name))
        if raw is None:
            raise NotFoundError(f"no object named {name!r}")
        digest, size = msgpack.unpackb(raw)
        return ObjectInfo(name, digest, size)

    def read(self, tenant: str, name: str, *, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The content of `name` in chunks. The blob is opened before the first chunk is asked for."""
        info = self.stat(tenant, name)
        f = open(self._blob_path(info.digest), "rb")  # noqa: SIM115 (closed by the generator)

        def chunks() -> Iterator[bytes]:
            with f:
                while block := f.read(chunk_size):
                    yield block

        return chunks()

    def list(self, tenant: str, prefix: str = "") -> list[ObjectInfo]:
        """The tenant's references whose name starts with `prefix`, by name."""
        base = b"n" + check_name("tenant", tenant).encode() + b"\x00"
        found = []
        for key, raw in self._meta.items(from_key=base + prefix.encode()):
            if not key.startswith(base + prefix.encode()):
                break
            digest, size = msgpack.unpackb(raw)
            found.append(ObjectInfo(key[len(base) :].decode(), digest, size))
        return found

    def delete(self, tenant: str, name: str) -> None:
        """Removes the reference `name`; the blob goes at the next `gc()` if nothing else refers to it."""
        key = self._ref_key(tenant, name)
        with self._lock:
            info = self.stat(tenant, name)
            wb = Batch()
            wb.delete(key)
            self._unref(wb, tenant, info.digest, info.size)
            self._meta.write(wb, self._sync)

    def gc(self) -> int:
        """Deletes blob files no reference points to. Returns how many."""
        removed = 0
        with self._lock:
            for shard in self._blobs.iterdir():
                for blob in shard.iterdir():
                    if self._meta.get(b"c" + blob.name.encode()) is None:
                        blob.unlink()
                        removed += 1
        return removed

    def close(self) -> None:
        """Closes the metadata database."""
        self._meta.close()

    def _blob_path(self, digest: str) -> Path:
        return self._blobs / digest[:2] / digest

    def _count(self, digest: str) -> int:
        raw = self._meta.get(b"c" + digest.encode())
        return 0 if raw is None else int(msgpack.unpackb(raw))

    def _unref(self, wb: Batch, tenant: str, digest: str, size: int) -> None:
        count = self._count(digest) - 1
        if count:
            wb.put(b"c" + digest.encode(), msgpack.packb(count))
        else:
            wb.delete(b"c" + digest.encode())
        wb.put(b"u" + tenant.encode(), msgpack.packb(self.usage(tenant) - size))

    def _reserve(self, tenant: str, name: str, more: int) -> None:
        """Counts `more` in-flight bytes against the quota, or raises QuotaExceededError."""
        with self._lock:
            try:
                replaced = self.stat(tenant, name).size
            except NotFoundError:
                replaced = 0
            in_flight = self._writing.get(tenant, 0) + more
            if self.usage(tenant) - replaced + in_flight > self.quota(tenant):
                raise QuotaExceededError(
                    f"tenant {tenant!r} would exceed its object quota of {self.quota(tenant)} "
                    "bytes (delete objects, then run gc, or raise the quota)"
                )
            self._writing[tenant] = in_flight

    def _release(self, tenant: str, n: int) -> None:
        with self._lock:
            self._writing[tenant] = self._writing.get(tenant, 0) - n

    def _install(self, tenant: str, name: str, tmp: Path, digest: str, size: int) -> ObjectInfo:
        final = self._blob_path(digest)
        with self._lock:
            final.parent.mkdir(exist_ok=True)
            if final.exists():
                tmp.unlink()  # same content already stored
            else:
                os.rename(tmp, final)
                fsync_dir(final.parent)
            key = self._ref_key(tenant, name)
            usage = self.usage(tenant) + size
            counts = {digest: self._count(digest)}
            old = self._meta.get(key)
            if old is not None:
                old_digest, old_size = msgpack.unpackb(old)
                usage -= old_size
                counts[old_digest] = counts.get(old_digest, self._count(old_digest)) - 1
            counts[digest] += 1
            wb = Batch()
            for d, n in counts.items():
                if n:
                    wb.put(b"c" + d.encode(), msgpack.packb(n))
                else:
                    wb.delete(b"c" + d.encode())
            wb.put(key, msgpack.packb([digest, size]))
            wb.put(b"u" + tenant.encode(), msgpack.packb(usage))
            self._meta.write(wb, self._sync)
            self._writing[tenant] -= size
        return ObjectInfo(name, digest, size)


class ObjectWriter:
    """One streaming upload into an ObjectStore (see `ObjectStore.writer`)."""

    def __init__(self, store: ObjectStore, tenant: str, name: str) -> None:
        self._store = store
        self._tenant = tenant
        self._name = name
        self._hash = hashlib.sha256()
        self._size = 0
        self._path = store._tmp / uuid.uuid4().hex
        self._file = open(self._path, "xb")  # noqa: SIM115 (closed in commit/abort)
        self._done = False

    def write(self, chunk: bytes) -> None:
        """Appends a chunk; raises QuotaExceededError (and aborts) if the quota would be passed."""
        try:
            self._store._reserve(self._tenant, self._name, len(chunk))
        except QuotaExceededError:
            self.abort()
            raise
        self._size += len(chunk)
        self._hash.update(chunk)
        try:
            self._file.write(chunk)
        except OSError as e:
            self.abort()
            raise write_error(self._store.root, e) from None

    def commit(self) -> ObjectInfo:
        """Makes the object durable and points `name` at it."""
        if self._done:
            raise StorageError("object upload already finished (start a new writer)")
        self._done = True
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            return self._store._install(
                self._tenant, self._name, self._path, self._hash.hexdigest(), self._size
            )
        except BaseException as e:
            with contextlib.suppress(OSError):  # a failed flush left it open
                self._file.close()
            self._path.unlink(missing_ok=True)
            self._store._release(self._tenant, self._size)
            if isinstance(e, OSError):
                raise write_error(self._store.root, e) from None
            raise

    def abort(self) -> None:
        """Discards the upload. Idempotent."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):  # its buffer's flush, on a full disk
            self._file.close()
        self._path.unlink(missing_ok=True)
        self._store._release(self._tenant, self._size)
