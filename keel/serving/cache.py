"""The prediction cache: a score per (model version, entity, feature event time), per worker.

The key carries everything a score depends on, so a new model version or newer features
miss by construction: nothing is ever served stale, and no invalidation message is needed.
When a version stops serving, `PredictionCache.retain` drops its entries at once. An entity
whose feature event time is unknown is never cached (newer features could not be told apart).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable

Key = tuple[str, int, int]  # (model version, account id, feature event time in microseconds)


class PredictionCache:
    """A bounded LRU map from `Key` to score, safe across a worker's threads.

    Args:
        max_entries: Entries kept; the least recently used go first. 0 disables the cache.
    """

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, float] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, keys: list[Key | None]) -> list[float | None]:
        """Cached scores in the order of ``keys`` (None: a miss, or a key that cannot be cached)."""
        if not self.enabled:
            return [None] * len(keys)
        found: list[float | None] = []
        with self._lock:
            entries = self._entries
            for key in keys:
                score = entries.get(key) if key is not None else None
                if score is not None:
                    entries.move_to_end(key)
                found.append(score)
        hits = sum(score is not None for score in found)
        self.hits += hits
        self.misses += len(keys) - hits
        return found

    def put_many(self, items: Iterable[tuple[Key | None, float]]) -> None:
        if not self.enabled:
            return
        with self._lock:
            entries = self._entries
            for key, score in items:
                if key is not None:
                    entries[key] = score
                    entries.move_to_end(key)
            while len(entries) > self.max_entries:
                entries.popitem(last=False)

    def retain(self, versions: set[str]) -> int:
        """Drop every entry of a version not in ``versions``; returns how many went."""
        with self._lock:
            stale = [key for key in self._entries if key[0] not in versions]
            for key in stale:
                del self._entries[key]
        return len(stale)
