"""The re-rank feature store: float16 shards on disk, memory-mapped, on real files and a real Milvus."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from gmv_engine.feature_store import FeatureStore


def _batch(rng, n, dim=64):
    return rng.integers(1, 2**62, n), rng.random((n, dim), dtype=np.float32)


def test_features_come_back_as_float16_rounds_them_and_unknown_keys_are_left_out(tmp_path):
    rng = np.random.default_rng(1)
    store = FeatureStore(tmp_path)
    keys, features = _batch(rng, 300)
    for start in range(0, 300, 100):
        store.append("c", keys[start:start + 100], features[start:start + 100])
    got = store.get("c", [*keys[::7].tolist(), 12345])
    assert sorted(got) == sorted(keys[::7].tolist())
    for key, row in zip(keys[::7].tolist(), features[::7]):
        assert got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], row.astype(np.float16).astype(np.float32))
    assert store.count("c") == 300 and store.get("other", keys[:3]) == {}


def test_remove_deletes_only_those_keys_and_compaction_keeps_the_rest(tmp_path):
    rng = np.random.default_rng(2)
    store = FeatureStore(tmp_path)
    keys, features = _batch(rng, 1000)
    for start in range(0, 1000, 50):
        store.append("c", keys[start:start + 50], features[start:start + 50])
    assert store.remove("c", keys[:75].tolist() + [99]) == 75
    assert store.get("c", keys[:75]) == {} and len(store.get("c", keys[75:])) == 925
    store.append("c", keys[500:510], features[500:510])  # written again by a resumed run
    assert store.compact("c", max_shards=4)
    assert len(store._shards("c")) == 1 and store.count("c") == 925
    assert len(np.load(next((tmp_path / "c").glob("*.pk.npy")))) == 925  # merged once each
    np.testing.assert_allclose(store.get("c", [keys[500]])[int(keys[500])], features[500], atol=1e-3)
    store.drop("c")
    assert store.get("c", keys) == {} and not (tmp_path / "c").exists()


def test_a_reader_sees_each_shard_whole_while_a_writer_appends_and_removes(tmp_path):
    """Readers in other threads (as a server's batch lanes) during appends and removals: every
    key a read returns has its own feature, and no key that was never removed goes missing
    once it has been seen."""
    rng = np.random.default_rng(3)
    keys, features = _batch(rng, 4000, dim=16)
    expected = {int(k): f.astype(np.float16).astype(np.float32) for k, f in zip(keys, features)}
    writer, reader = FeatureStore(tmp_path), FeatureStore(tmp_path)
    doomed = set(keys[:200].tolist())
    problems, done = [], threading.Event()

    def read():
        seen = set()  # per reader: another thread's read may have begun before a shard landed
        while not done.is_set():
            got = reader.get("c", keys.tolist())
            for key, row in got.items():
                if not np.array_equal(row, expected[key]):
                    problems.append(f"wrong feature for {key}")
            lost = (seen - doomed) - set(got)
            if lost:
                problems.append(f"{len(lost)} keys seen before went missing")
            seen.update(got)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads:
        thread.start()
    for start in range(0, 4000, 100):
        writer.append("c", keys[start:start + 100], features[start:start + 100])
        if start == 2000:
            writer.remove("c", list(doomed))
    done.set()
    for thread in threads:
        thread.join()
    assert not problems, problems[:5]
    assert set(reader.get("c", keys.tolist())) == set(keys.tolist()) - doomed


def test_a_remote_store_is_copied_to_each_replicas_cache_and_follows_removals(tmp_path, monkeypatch):
    """A store by URI (file:// here; s3:// and gs:// go through the same pyarrow filesystem
    calls): the writer and each replica keep local copies in their own cache directories."""
    import gmv_engine.feature_store as feature_store

    monkeypatch.setattr(feature_store, "REMOTE_LIST_EVERY_S", 0.0)
    rng = np.random.default_rng(4)
    keys, features = _batch(rng, 200)
    uri = f"file://{tmp_path / 'bucket'}"
    writer = FeatureStore(uri, tmp_path / "writer-cache")
    replica = FeatureStore(uri, tmp_path / "replica-cache")
    writer.append("c", keys[:100], features[:100])
    assert len(replica.get("c", keys[:100])) == 100
    writer.append("c", keys[100:], features[100:])
    assert len(replica.get("c", keys)) == 200  # a miss lists the store again
    writer.remove("c", keys[:10].tolist())
    assert set(replica.get("c", keys)) == set(keys[10:].tolist())
    assert list((tmp_path / "replica-cache").rglob("*.f16.npy"))  # mapped from the replica's own disk


def test_default_store_follows_the_data_dir_with_the_embedded_milvus_only(tmp_path):
    from gmv_engine.settings import Settings

    assert Settings(data_dir=str(tmp_path)).resolved_feature_store() == str(tmp_path / "features")
    assert Settings(milvus_uri="http://db:19530").resolved_feature_store() is None
    assert Settings(milvus_uri="http://db:19530", feature_store="s3://b/f").resolved_feature_store() == "s3://b/f"


@pytest.fixture()
def small_rows(digits):
    from gmv_engine.ingest import read_manifest

    return read_manifest(digits.manifest)[:120]


def test_a_collection_keeps_its_features_in_the_store_not_in_milvus(milvus, index, small_rows, offline_components,
                                                                     tmp_path):
    from gmv_engine.errors import IndexUnavailableError
    from gmv_engine.ingest import ingest
    from gmv_engine.milvus.index import FEATURES_SUFFIX, CollectionInfo, TrainingIndex, training_pk

    encoder, reranker = offline_components
    info = CollectionInfo("offline", encoder.name, encoder.dim, reranker.name, reranker.feature_dim)
    name = "store_features"
    index.drop(name)
    report = ingest(index, name, small_rows, info, encoder, reranker, progress=False)
    assert report.inserted == len(small_rows)
    folder = index.info(name).feature_store
    assert folder.startswith(name + ".") and not index.client.has_collection(name + FEATURES_SUFFIX)
    pks = [training_pk(row.training_id) for row in small_rows]
    assert len(index.fetch_features(name, pks)) == len(pks)

    # Opened without a store, the collection says where its features are rather than scoring nothing.
    bare = TrainingIndex(milvus.uri)
    with pytest.raises(IndexUnavailableError, match="feature_store"):
        bare.fetch_features(name, pks[:3])
    # Opened with another store, likewise.
    elsewhere = TrainingIndex(milvus.uri, feature_store=str(tmp_path / "other"))
    with pytest.raises(IndexUnavailableError, match="has no re-rank features"):
        elsewhere.fetch_features(name, pks[:3])

    index.delete_features(name, pks[:20])
    assert len(index.fetch_features(name, pks)) == len(pks) - 20
    index.drop(name)
    assert not (index.feature_store.local_root / folder).exists()
    bare.close()
    elsewhere.close()


def test_a_collection_built_before_the_store_is_still_served_from_milvus(milvus, index, small_rows,
                                                                          offline_components):
    from gmv_engine.ingest import ingest
    from gmv_engine.milvus.index import FEATURES_SUFFIX, CollectionInfo, TrainingIndex, training_pk

    encoder, reranker = offline_components
    info = CollectionInfo("offline", encoder.name, encoder.dim, reranker.name, reranker.feature_dim)
    name = "milvus_features"
    legacy = TrainingIndex(milvus.uri)  # no store: the features go to NAME__rerank as before
    legacy.drop(name)
    ingest(legacy, name, small_rows[:40], info, encoder, reranker, progress=False)
    assert index.client.has_collection(name + FEATURES_SUFFIX) and index.info(name).feature_store == ""
    pks = [training_pk(row.training_id) for row in small_rows[:40]]
    assert len(index.fetch_features(name, pks)) == 40  # an index with a store reads them from Milvus
    legacy.drop(name)
    legacy.close()
