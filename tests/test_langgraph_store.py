"""AgentnodeStore against the real langgraph package, over the memory API on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest
from langgraph.store.base import InvalidNamespaceError

from agentnode.integrations.langgraph import AgentnodeStore
from agentnode.sdk import Memory


@pytest.fixture
def store(memory_server):  # type: ignore[no-untyped-def]
    url, tokens = memory_server
    with Memory(url, tokens["a"]) as mem:
        yield AgentnodeStore(mem, task="graph-1")


def test_put_get_overwrite_delete(store: AgentnodeStore) -> None:
    store.put(("users", "alice"), "prefs", {"theme": "dark"})
    item = store.get(("users", "alice"), "prefs")
    assert item is not None and item.value == {"theme": "dark"}
    assert item.namespace == ("users", "alice") and item.key == "prefs"
    store.put(("users", "alice"), "prefs", {"theme": "light"})
    again = store.get(("users", "alice"), "prefs")
    assert again is not None and again.value == {"theme": "light"}
    assert again.created_at == item.created_at and again.updated_at >= item.updated_at
    store.delete(("users", "alice"), "prefs")
    assert store.get(("users", "alice"), "prefs") is None
    assert store.get(("users", "nobody"), "prefs") is None


def test_search_by_prefix_and_filter(store: AgentnodeStore) -> None:
    store.put(("users", "alice", "notes"), "n1", {"kind": "todo", "text": "a"})
    store.put(("users", "alice", "notes"), "n2", {"kind": "idea", "text": "b"})
    store.put(("users", "bob"), "n3", {"kind": "todo", "text": "c"})
    store.put(("usersx",), "n4", {"kind": "todo", "text": "d"})
    assert {i.key for i in store.search(("users",))} == {"n1", "n2", "n3"}
    assert {i.key for i in store.search(("users",), filter={"kind": "todo"})} == {"n1", "n3"}
    assert len(store.search(("users",), limit=1, offset=1)) == 1
    assert store.list_namespaces(prefix=("users",)) == [
        ("users", "alice", "notes"),
        ("users", "bob"),
    ]
    assert store.list_namespaces(max_depth=1) == [("users",), ("usersx",)]
    assert store.list_namespaces(suffix=("notes",)) == [("users", "alice", "notes")]


def test_ttl_expires_items(store: AgentnodeStore) -> None:
    store.put(("tmp",), "k", {"v": 1}, ttl=0.1 / 60)  # LangGraph counts TTL in minutes
    assert store.get(("tmp",), "k") is not None
    time.sleep(0.2)
    assert store.get(("tmp",), "k") is None
    assert store.search(("tmp",)) == []


def test_async_api_and_bad_namespace(store: AgentnodeStore) -> None:
    async def run() -> None:
        await store.aput(("a",), "k", {"x": 1})
        item = await store.aget(("a",), "k")
        assert item is not None and item.value == {"x": 1}

    asyncio.run(run())
    with pytest.raises(InvalidNamespaceError):
        store.put(("has:colon",), "k", {"x": 1})
