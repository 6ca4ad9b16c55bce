import numpy as np

from gmv_engine.feature_cache import FeatureCache


def vec(value: float, n: int = 4) -> np.ndarray:
    return np.full(n, value, dtype=np.float32)  # 16 bytes


def test_hits_misses_and_lru_eviction_by_bytes():
    cache = FeatureCache(max_bytes=48)  # room for three 16-byte vectors
    cache.put_many({1: vec(1), 2: vec(2), 3: vec(3)})
    assert set(cache.get_many([1, 9])) == {1} and (cache.hits, cache.misses) == (1, 1)
    cache.put_many({4: vec(4)})  # evicts 2, the least recently used (1 was just read)
    assert set(cache.get_many([1, 2, 3, 4])) == {1, 3, 4}
    assert len(cache) == 3 and cache.nbytes == 48


def test_vectors_larger_than_the_cache_are_not_kept():
    cache = FeatureCache(max_bytes=8)
    cache.put_many({1: vec(1)})
    assert len(cache) == 0 and cache.get_many([1]) == {}
