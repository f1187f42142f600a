"""A small least-recently-used cache: prompt embeddings per prior, loaded checkpoints per prior in the pool, the
analytic prior's renders and image posteriors."""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LruCache(Generic[K, V]):
    """A small least-recently-used cache (not thread-safe on its own: its owner locks around it)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[K, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: K, compute: Callable[[], V]) -> V:
        """The cached value, else `compute()` stored (its owner's lock held throughout, if it takes one)."""
        if key in self._items:
            return self._hit(key)
        self.misses += 1
        value = compute()
        self.put(key, value)
        return value

    def get(self, key: K) -> V | None:
        """The cached value (now the most recently used), or None. For owners that compute outside their lock."""
        if key not in self._items:
            self.misses += 1
            return None
        return self._hit(key)

    def _hit(self, key: K) -> V:
        self.hits += 1
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: K, value: V) -> None:
        """Stores `value` as the most recently used, evicting the least recently used beyond `maxsize`."""
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
