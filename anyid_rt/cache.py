"""`LRUCache`: the one in-memory cache of work done once (reference latents, prompt embeddings).

A bounded mapping that forgets the least recently used entry and counts hits and misses, so that callers
and tests can tell whether work was really skipped. Capacity 0 disables it (every lookup is a miss and
nothing is kept).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Generic, Hashable, NamedTuple, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


class LRUCache(Generic[K, V]):
    """At most `capacity` entries; `get` refreshes an entry and counts a hit or a miss, `put` evicts the oldest."""

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise ValueError(f"cache size must be an int >= 0, got {capacity!r}")
        self.capacity = capacity
        self._items: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: K) -> V | None:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        return None

    def put(self, key: K, value: V) -> None:
        if not self.capacity:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry and reset the hit / miss counters."""
        self._items.clear()
        self.hits = self.misses = 0

    def info(self) -> CacheInfo:
        return CacheInfo(self.hits, self.misses, self.capacity, len(self._items))

    def __len__(self) -> int:
        return len(self._items)


__all__ = ["LRUCache", "CacheInfo"]
