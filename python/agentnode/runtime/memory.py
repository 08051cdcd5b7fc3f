"""The agent's memory across runs: `remember` and `recall`, two tools the runtime itself offers
the model next to the node's, backed by the tenant's vector store (`agentnode.sdk.Memory`).

A task's token writes only its own task's records but searches all of its tenant's vectors, and
never another tenant's: so what one run remembers, the tenant's later runs recall, and no other
tenant's run can. Facts are stored as vectors in the tenant's collection `agentnode.runtime`,
in the namespace of a memory space (`--memory-space NAME`, default `default`), the text in their
metadata. The vector is the fact's words hashed into `DIMS` buckets, so `recall` finds the facts
sharing words with its query, closest (cosine) first: no embedding model, no cost per fact.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from agentnode.sdk.memory import Memory
from agentnode.storage.keys import check_name

__all__ = ["COLLECTION", "DIMS", "TOOLS", "AgentMemory", "words_vector"]

COLLECTION = "agentnode.runtime"
#: Buckets of the hashed words: wide enough that two words rarely share one.
DIMS = 1024
#: A hit closer than this shares at least one word with the query (cosine distance 1: none).
_RELATED = 0.999
_WORD = re.compile(r"\w+")

TOOLS: dict[str, dict[str, Any]] = {
    "remember": {
        "description": "Store a fact for later runs of this agent (they can recall it).",
        "inputSchema": {
            "type": "object",
            "properties": {"text": {"type": "string", "description": "the fact, in words"}},
            "required": ["text"],
        },
    },
    "recall": {
        "description": "Facts earlier runs remembered that share words with the query, "
        "closest first.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "words to look for"},
                "limit": {"type": "integer", "description": "most facts to return (10)"},
            },
            "required": ["query"],
        },
    },
}


def words_vector(text: str) -> list[float] | None:
    """`text`'s words (case-folded) counted in `DIMS` hashed buckets; None without a word."""
    vector = [0.0] * DIMS
    words = _WORD.findall(text.casefold())
    for word in words:
        digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
        vector[int.from_bytes(digest) % DIMS] += 1.0
    return vector if words else None


class AgentMemory:
    """The `remember`/`recall` tools of one run, in memory space `space`."""

    def __init__(self, *, space: str) -> None:
        self.space = check_name("memory space", space)
        self._memory = Memory()
        self._ready = False

    def call(self, name: str, arguments: dict[str, Any], *, key: str) -> tuple[str, bool]:
        """The text of a memory tool's result for the model, and whether it is an error.
        `key` (unique per call) picks the vector's key, so a call run again after a kill
        replaces the first run's fact instead of adding a second."""
        if name == "remember":
            text = arguments.get("text")
            vector = words_vector(text) if isinstance(text, str) else None
            if vector is None:
                return "remember needs 'text': the fact to store, in words", True
            self._collection()
            number = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8]) >> 1
            self._memory.upsert(COLLECTION, [{"key": number, "vector": vector,
                                              "namespace": self.space,
                                              "metadata": {"text": text}}])  # fmt: skip
            return f"remembered: {text}", False
        query, limit = arguments.get("query"), arguments.get("limit", 10)
        vector = words_vector(query) if isinstance(query, str) else None
        if vector is None:
            return "recall needs 'query': words to look for", True
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 100:
            return f"recall's 'limit' is a whole number from 1 to 100, got {limit!r}", True
        self._collection()
        hits = self._memory.search(COLLECTION, vector, limit, namespace=self.space,
                                   with_metadata=True)  # fmt: skip
        facts = [h["metadata"].get("text") for h in hits if h["distance"] < _RELATED]
        if not facts:
            return f"nothing remembered about {query}", False
        return "\n".join(f"- {fact}" for fact in facts), False

    def _collection(self) -> None:
        # Creating it again with the same settings is a no-op: the first run of a tenant makes it.
        if not self._ready:
            self._memory.create_collection(COLLECTION, dims=DIMS, metric="cos")
            self._ready = True

    def close(self) -> None:
        """Lets go of the connection."""
        self._memory.close()
