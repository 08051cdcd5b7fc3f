"""`AgentnodeStore`: a LangGraph `BaseStore` kept in agentnode episodic memory.

Mapping: a LangGraph namespace `("users", "alice")` is the episodic namespace `users:alice`
(labels use the episodic alphabet, no ':'), an item's key is the record id, and every item
lives under one task (`task=`, default "langgraph"), so ending that task expires them all.

Limits, on purpose for now:
- `search` lists and filters (namespace prefix, exact-match `filter`, offset/limit) without
  vectors; `query` is not used and `score` is None. Semantic search arrives with the vector index.
- TTL (minutes, as LangGraph counts) runs from the last write; reads do not refresh it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

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

__all__ = ["AgentnodeStore"]

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
