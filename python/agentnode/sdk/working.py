"""Working memory: a small in-process LRU per task, for what an agent needs again within seconds.

It never leaves the agent's process and is lost when the process exits; anything worth keeping
goes to episodic memory (`Memory.append`). Not thread-safe: one per task, used by that task.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Any

__all__ = ["WorkingMemory"]


class WorkingMemory:
    """A least-recently-used map of at most `maxsize` entries."""

    def __init__(self, *, maxsize: int = 256) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, not {maxsize}")
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value of `key` (now most recently used), or `default`."""
        if key not in self._items:
            return default
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        """Stores `key`, evicting the least recently used entry when full."""
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def pop(self, key: Hashable, default: Any = None) -> Any:
        """Removes and returns `key`'s value, or `default`."""
        return self._items.pop(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        """Forgets everything."""
        self._items.clear()
