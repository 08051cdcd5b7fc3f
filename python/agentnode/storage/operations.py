"""The episodic memory operations, one implementation each, behind both of the node's doors to
them: the HTTP API (`storage.api`, which maps routes, query strings and bodies onto an
operation's arguments) and the memory socket (`storage.memsocket`, whose requests name an
operation and carry its arguments as a msgpack map).

An operation is `op(who, args)`: `who` is the caller's `Principal` (the tenant comes from the
credential alone, never from `args`), `args` a mapping of JSON-like values that the operation
checks itself. It returns the answer (JSON-like), or an awaitable of it when it must leave the
event loop (an fsync, a long scan): the common puts and gets run on the loop, as a RocksDB write
to its log costs less than a hand-off to a thread and back. Failures raise `StorageError`s.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from agentnode.errors import AuthError, MemoryKeyError
from agentnode.storage.episodic import EpisodicStore, NewRecord
from agentnode.storage.tenancy import Principal

__all__ = ["MAX_SCAN", "Args", "Operation", "check_task", "episodic_operations", "settle"]

Args = Mapping[str, Any]
#: An operation: its answer, or an awaitable of it.
Operation = Callable[[Principal, Args], Any]
#: The most records one scan returns.
MAX_SCAN = 10_000


async def settle(answer: Any) -> Any:
    """An operation's answer, awaited if it is an awaitable."""
    if isinstance(answer, Awaitable):
        return await answer
    return answer


def check_task(who: Principal, task: str) -> str:
    """`task`, unless `who`'s credential is pinned to another task (then AuthError)."""
    if who.task is not None and who.task != task:
        raise AuthError(f"this credential is limited to task {who.task!r} (use that task's token)")
    return task


def _text(args: Args, name: str) -> str:
    value = args.get(name)
    if not isinstance(value, str):
        raise MemoryKeyError(f"'{name}' must be a string, not {type(value).__name__}")
    return value


def _int(args: Args, name: str, default: int | None) -> int | None:
    value = args.get(name, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise MemoryKeyError(f"'{name}' must be an integer, not {value!r}")
    return value


def _where(who: Principal, args: Args) -> tuple[str, str]:
    return _text(args, "namespace"), check_task(who, _text(args, "task"))


def _new_records(args: Args) -> tuple[list[NewRecord], bool]:
    items = args.get("records", [args])
    if not isinstance(items, list) or not items:
        raise MemoryKeyError("'records' must be a non-empty list")
    records = []
    for item in items:
        if not isinstance(item, dict) or "value" not in item:
            raise MemoryKeyError("each record must be an object with a 'value'")
        ttl = item.get("ttl")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
            raise MemoryKeyError(f"invalid ttl {ttl!r} (use a number of seconds)")
        rid = item.get("id")
        if rid is not None and not isinstance(rid, str):
            raise MemoryKeyError(f"record id {rid!r} is not a string")
        records.append(NewRecord(item["value"], rid, ttl))
    sync = args.get("sync", False)
    if not isinstance(sync, bool):
        raise MemoryKeyError(f"'sync' must be true or false, not {sync!r}")
    return records, sync


def append(store: EpisodicStore, who: Principal, args: Args) -> Any:
    """Stores one record (`value`, `id`?, `ttl`?) or several (`records`) atomically, under
    `namespace`/`task`: `{"ids": [...]}`. `sync` waits for an fsync (off the loop)."""
    ns, task = _where(who, args)
    records, sync = _new_records(args)
    if sync:
        return _synced(store, who.tenant, ns, task, records)
    # To RocksDB's log without fsync, on the loop: what `aappend_many` does without `sync`.
    return {"ids": store.append_many(who.tenant, ns, task, records, sync=False)}


async def _synced(
    store: EpisodicStore, tenant: str, ns: str, task: str, records: list[NewRecord]
) -> dict[str, Any]:
    return {"ids": await store.aappend_many(tenant, ns, task, records, sync=True)}


def get(store: EpisodicStore, who: Principal, args: Args) -> Any:
    """One record: `namespace`, `task`, `id`."""
    ns, task = _where(who, args)
    return store.get(who.tenant, ns, task, _text(args, "id")).to_wire()


def scan(store: EpisodicStore, who: Principal, args: Args) -> Any:
    """A task's live records: `since_ns`?, `until_ns`?, `limit` (1..MAX_SCAN, default 100),
    `order` ("newest", the default, or "oldest"): `{"records": [...]}`."""
    ns, task = _where(who, args)
    order = args.get("order", "newest")
    if order not in ("newest", "oldest"):
        raise MemoryKeyError(f"order={order!r} is not 'newest' or 'oldest'")
    limit = _int(args, "limit", 100)
    if limit is None or not 0 < limit <= MAX_SCAN:
        raise MemoryKeyError(f"limit={limit} is out of range (use 1..{MAX_SCAN})")
    return _scanned(
        functools.partial(
            store.scan,
            who.tenant,
            ns,
            task,
            since_ns=_int(args, "since_ns", None),
            until_ns=_int(args, "until_ns", None),
            limit=limit,
            newest_first=order == "newest",
        )
    )


async def _scanned(run: Callable[[], list[Any]]) -> dict[str, Any]:
    # Up to MAX_SCAN records: off the loop.
    return {"records": [r.to_wire() for r in await asyncio.to_thread(run)]}


async def delete(store: EpisodicStore, who: Principal, args: Args) -> None:
    """Deletes one record (`namespace`, `task`, `id`); NotFoundError if there is none."""
    ns, task = _where(who, args)
    await asyncio.to_thread(store.delete, who.tenant, ns, task, _text(args, "id"))


async def end(store: EpisodicStore, who: Principal, args: Args) -> dict[str, Any]:
    """Ends a task: its records expire `ttl` seconds from now: `{"expires_ms"}`."""
    ns, task = _where(who, args)
    ttl = args.get("ttl")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise MemoryKeyError("'ttl' must be a number of seconds (how long the task's records stay)")
    return {"expires_ms": await asyncio.to_thread(store.end_task, who.tenant, ns, task, ttl=ttl)}


def tasks(store: EpisodicStore, who: Principal, args: Args) -> Any:
    """The (namespace, task) pairs of the tenant holding records, of namespaces starting with
    `prefix`; a credential pinned to a task sees that task's only: `{"tasks": [...]}`."""
    prefix = args.get("prefix", "")
    if not isinstance(prefix, str):
        raise MemoryKeyError(f"'prefix' must be a string, not {type(prefix).__name__}")
    pairs = store.list_tasks(who.tenant, prefix)
    if who.task is not None:
        pairs = [p for p in pairs if p[1] == who.task]
    return {"tasks": [list(p) for p in pairs]}


def episodic_operations(store: EpisodicStore) -> dict[str, Operation]:
    """The episodic operations over `store`, by the name the memory socket knows them by."""
    return {
        f"episodic.{op.__name__}": functools.partial(op, store)
        for op in (append, get, scan, delete, end, tasks)
    }
