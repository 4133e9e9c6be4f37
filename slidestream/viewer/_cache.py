"""A thread-safe least-recently-used cache bounded by the bytes of its values."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["ByteLRU"]

V = TypeVar("V")


class ByteLRU(Generic[V]):
    """Keep the most recently used values while their summed size stays under a limit.

    Parameters
    ----------
    limit_bytes
        Capacity in bytes (0 disables caching).
    size_of
        The size in bytes of a value (``len`` for ``bytes``).
    """

    def __init__(self, limit_bytes: int, size_of: Callable[[V], int]) -> None:
        self._limit = int(limit_bytes)
        self._size_of = size_of
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        """The value under ``key`` (now the most recent), or ``None``."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value``; the least recently used values go while over the limit."""
        size = self._size_of(value)
        if size > self._limit:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            self._items[key] = (value, size)
            self._bytes += size
            while self._bytes > self._limit and self._items:
                _, (_, dropped) = self._items.popitem(last=False)
                self._bytes -= dropped

    def discard(self, predicate: Callable[[Hashable], bool]) -> None:
        """Drop every entry whose key matches ``predicate``."""
        with self._lock:
            for key in [k for k in self._items if predicate(k)]:
                self._bytes -= self._items.pop(key)[1]

    @property
    def nbytes(self) -> int:
        """Bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
