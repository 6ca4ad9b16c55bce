"""An in-process LRU cache of re-rank features, bounded in bytes.

A training row's feature never changes once written (a training_id with other content is
refused at ingest), so caching by primary key is safe for the life of one collection; an
Attributor owns one cache for one collection. Fetching 100 x 3072 floats through pymilvus
costs tens of milliseconds per generated image, while popular training images recur.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterable

import numpy as np


class FeatureCache:
    def __init__(self, max_bytes: int = 256 * 1024 * 1024):
        self.max_bytes = max_bytes
        self._items: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()  # the server's batch lanes share one cache


    def get_many(self, pks: Iterable[int]) -> dict[int, np.ndarray]:
        with self._lock:
            return self._get_many(pks)

    def _get_many(self, pks: Iterable[int]) -> dict[int, np.ndarray]:
        found = {}
        for pk in pks:
            vector = self._items.get(pk)
            if vector is None:
                self.misses += 1
                continue
            self._items.move_to_end(pk)
            found[pk] = vector
            self.hits += 1
        return found

    def put_many(self, features: dict[int, np.ndarray]) -> None:
        with self._lock:
            self._put_many(features)

    def _put_many(self, features: dict[int, np.ndarray]) -> None:
        for pk, vector in features.items():
            if pk in self._items or vector.nbytes > self.max_bytes:
                continue
            self._items[pk] = vector
            self._bytes += vector.nbytes
        while self._bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= evicted.nbytes

    def clear(self) -> None:
        """Forget every feature (a contributor's rows were removed from the collection)."""
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes
