"""Idempotency keys that outlive the node: each keyed call's first result, in RocksDB under the
data dir, so a repeat after a restart gets that result instead of a second run.

A key is marked started before its call runs and given its result when it ends. A key found
started with no result was cut off by a crash or restart mid-call: whether its side effect
happened is unknown, so it is never run again under that key (the caller is told to use a new
one). Writes go to RocksDB's write-ahead log without an fsync, as the task store's do: they
survive a crash or `kill -9` of the node, not a power cut. Retention is bounded per tenant:
a tenant's oldest keys go past `kept` entries or `max_bytes` of its results, so no tenant's
calls push another's keys out (a key that went would let its call run twice); any key goes
after `max_age_s` seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

from agentnode.storage.rocks import Batch, Rocks

__all__ = ["KeyStore", "Slot"]

#: (owner, tool, key): a key is one caller's own, per tool; its owner is a task's
#: `TENANT/TASK`, or a tenant's name for a caller without a task.
Slot = tuple[str, str, str]

_KEY = b"k"  # k + slot -> msgpack [digest, time, result or None]
# t + tenant + NUL + time (ns, big-endian) + slot -> its result's size: each tenant's keys,
# oldest first, for its retention.
_AGE = b"t"
_OLD_AGE = b"a"  # a + time + slot: the age index before retention was per tenant


def _slot_bytes(slot: Slot) -> bytes:
    # NUL cannot occur in a tenant or tool name; a key holding one still ends the record.
    return b"\0".join(part.encode() for part in slot)


def _tenant(slot: Slot) -> str:
    return slot[0].partition("/")[0]


def _ages_of(tenant: str) -> bytes:
    return _AGE + tenant.encode() + b"\0"


def _age_key(at: float, slot: Slot) -> bytes:
    return _ages_of(_tenant(slot)) + int(at * 1e9).to_bytes(8, "big") + _slot_bytes(slot)


class _Held:
    """What one tenant holds: keys, bytes of results, when its oldest was taken (ns; None
    with none: every call checks the bounds, and the ages are scanned only past one)."""

    __slots__ = ("bytes", "count", "oldest")

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0
        self.oldest: int | None = None


class KeyStore:
    """Keyed calls' first results, durable across node restarts."""

    def __init__(
        self,
        path: Path,
        *,
        kept: int = 10_000,
        max_bytes: int = 256 << 20,
        max_age_s: float = 86_400.0,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = Rocks(path)
        #: Per tenant.
        self.kept = kept
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._held: dict[str, _Held] = {}
        self._reindex()
        for age_key, size in self._ages(_AGE):
            tenant, at_ns = _parse_age(age_key)
            held = self._held.setdefault(tenant, _Held())
            if held.oldest is None:
                held.oldest = at_ns
            held.count += 1
            held.bytes += size

    def _reindex(self) -> None:
        """Moves a store's age index of before per-tenant retention to the tenants' own."""
        batch = Batch()
        for raw, size in self._db.items(from_key=_OLD_AGE):
            if raw[:1] != _OLD_AGE:
                break
            slot = tuple(part.decode() for part in raw[9:].split(b"\0", 2))
            if len(slot) == 3:
                at = int.from_bytes(raw[1:9], "big") / 1e9
                batch.put(_age_key(at, (slot[0], slot[1], slot[2])), size)
            batch.delete(raw)
        if len(batch):
            self._db.write(batch)

    def get(self, slot: Slot) -> tuple[str, dict[str, Any] | None] | None:
        """(arguments digest, result) of the key's first call, result None when that call was
        cut off before it ended; None when the key is unknown or has expired."""
        raw = self._db.get(_KEY + _slot_bytes(slot))
        if raw is None:
            return None
        digest, at, result = msgpack.unpackb(raw)
        if time.time() - at > self.max_age_s:
            return None
        return digest, result

    def start(self, slot: Slot, digest: str) -> None:
        """Marks the key taken before its call runs."""
        now = time.time()
        batch = Batch()
        batch.put(_KEY + _slot_bytes(slot), msgpack.packb([digest, now, None]))
        batch.put(_age_key(now, slot), b"")
        self._db.write(batch)
        tenant = _tenant(slot)
        held = self._held.setdefault(tenant, _Held())
        held.count += 1
        if held.oldest is None:
            held.oldest = int(now * 1e9)
        self._expire(tenant, held, now)

    def finish(self, slot: Slot, digest: str, result: dict[str, Any]) -> None:
        """Stores the key's result (its age still counts from `start`)."""
        key = _KEY + _slot_bytes(slot)
        raw = self._db.get(key)
        if raw is None:
            return  # expired while it ran
        at = msgpack.unpackb(raw)[1]
        packed = msgpack.packb([digest, at, result])
        batch = Batch()
        batch.put(key, packed)
        batch.put(_age_key(at, slot), len(packed).to_bytes(8, "big"))
        self._db.write(batch)
        tenant = _tenant(slot)
        held = self._held.setdefault(tenant, _Held())
        held.bytes += len(packed)
        self._expire(tenant, held, time.time())

    def forget(self, slot: Slot) -> None:
        """Drops a key whose call was cancelled before it ran anything worth keeping."""
        self._db.delete(_KEY + _slot_bytes(slot))  # its age entry goes at expiry

    def _expire(self, tenant: str, held: _Held, now: float) -> None:
        """Drops `tenant`'s oldest keys until at most `kept` remain, holding at most
        `max_bytes`, none older than `max_age_s`."""
        cutoff = int((now - self.max_age_s) * 1e9)
        if (
            held.count <= self.kept
            and held.bytes <= self.max_bytes
            and (held.oldest is None or held.oldest >= cutoff)
        ):
            return
        held.oldest = None
        batch = Batch()
        for age_key, size in self._ages(_ages_of(tenant)):
            _, at_ns = _parse_age(age_key)
            if held.count <= self.kept and held.bytes <= self.max_bytes and at_ns >= cutoff:
                held.oldest = at_ns
                break
            batch.delete(age_key)
            slot_key = _KEY + age_key[len(_ages_of(tenant)) + 8 :]
            stored = self._db.get(slot_key)
            # The same slot may have been taken again later (a newer age entry holds it).
            if stored is not None and int(msgpack.unpackb(stored)[1] * 1e9) == at_ns:
                batch.delete(slot_key)
            held.count -= 1
            held.bytes -= size
        if len(batch):
            self._db.write(batch)

    def _ages(self, prefix: bytes) -> Iterator[tuple[bytes, int]]:
        """(age key, size of its result) of every key under `prefix`, oldest first within a
        tenant."""
        for raw, size in self._db.items(from_key=prefix):
            if not raw.startswith(prefix):
                return
            yield raw, int.from_bytes(size, "big") if size else 0

    def close(self) -> None:
        self._db.close()


def _parse_age(age_key: bytes) -> tuple[str, int]:
    """(tenant, time in ns) of an age key."""
    end = age_key.index(b"\0", 1)
    return age_key[1:end].decode(), int.from_bytes(age_key[end + 1 : end + 9], "big")
