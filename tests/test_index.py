"""The training index in the real embedded Milvus: IVF_PQ really built, and its recall."""
import numpy as np
import pytest

from gmv_engine.datasets import read_heldout
from gmv_engine.decode import load_image_file
from gmv_engine.errors import CollectionNotFoundError, IncompatibleCollectionError
from gmv_engine.milvus.index import IndexParams, default_nlist, default_pq_m, training_pk
from gmv_engine.ingest import read_manifest

from helpers import make_info


def test_collection_has_a_built_ivf_pq_index(index, digits_collection):
    name, report = digits_collection
    state = index.index_state(name)
    assert state["index_type"] == "IVF_PQ"
    assert state["total_rows"] == report.inserted == index.count(name) > 1500
    assert state["indexed_rows"] == state["total_rows"] and state["pending_index_rows"] == 0
    assert state["params"] == {"nlist": default_nlist(report.rows), "m": default_pq_m(768), "nbits": 8}


def test_collection_records_what_built_it(index, digits_collection):
    info = index.info(digits_collection[0])
    assert (info.profile, info.encoder, info.encoder_dim, info.reranker, info.feature_dim) == ("offline", "pixels", 768, "l2", 3072)


def test_ivf_pq_recall_against_exact_search(index, digits, digits_collection, offline_components):
    """Share of the exact top-k (numpy brute force over the same embeddings) found in IVF_PQ's
    top-K' at the defaults (K' = 100, nprobe = 32): what the re-rank stage can see."""
    encoder, _ = offline_components
    training = read_manifest(digits.manifest)
    train_vectors = encoder.embed([load_image_file(row.path)[0] for row in training])
    train_pks = np.array([training_pk(row.training_id) for row in training])
    heldout = read_heldout(digits.heldout)
    queries = encoder.embed([load_image_file(path)[0] for path, _, _ in heldout])

    hits = index.search(digits_collection[0], queries, limit=100, nprobe=32)
    exact_order = np.argsort(((queries[:, None, :] - train_vectors[None, :, :]) ** 2).sum(-1), axis=1)
    recall_10_at_100 = np.mean([len(set(train_pks[exact[:10]]) & {h.pk for h in found}) / 10
                                for exact, found in zip(exact_order, hits)])
    recall_100_at_100 = np.mean([len(set(train_pks[exact[:100]]) & {h.pk for h in found}) / 100
                                 for exact, found in zip(exact_order, hits)])
    print(f"IVF_PQ recall on digits: exact top-10 in top-100 {recall_10_at_100:.3f}, "
          f"exact top-100 in top-100 {recall_100_at_100:.3f}")
    assert recall_10_at_100 >= 0.9
    assert recall_100_at_100 >= 0.8


def test_missing_collection_is_not_found(index):
    with pytest.raises(CollectionNotFoundError, match="does not exist"):
        index.info("no_such_collection")


def test_existing_collection_built_differently_is_refused(index, digits_collection, offline_components):
    encoder, _ = offline_components
    from gmv_engine.rerankers import create_reranker

    other = make_info(encoder, create_reranker("none"))
    with pytest.raises(IncompatibleCollectionError, match="exists and was built with"):
        index.create(digits_collection[0], other, IndexParams(), 10)


@pytest.mark.parametrize("name", ["1starts_with_digit", "has-dash", "has space", ""])
def test_invalid_collection_names(index, name):
    with pytest.raises(ValueError, match="not valid"):
        index.check_name(name)


def test_default_index_parameters():
    assert default_pq_m(768) == 192 and default_pq_m(512) == 128 and default_pq_m(10) == 2
    assert default_nlist(1617) == 41  # capped so k-means has ~39 points per list
    assert default_nlist(1_000_000) == 4000
    assert 768 % default_pq_m(768) == 0


def test_lite_file_uri_says_it_cannot_build_ivf_pq(tmp_path):
    from gmv_engine.errors import IndexUnavailableError
    from gmv_engine.milvus.index import TrainingIndex, is_lite_uri

    assert is_lite_uri(str(tmp_path / "gmv.db")) and not is_lite_uri("http://127.0.0.1:19530")
    try:
        import milvus_lite  # noqa: F401
    except ImportError:
        with pytest.raises(IndexUnavailableError, match="cannot build IVF_PQ"):
            TrainingIndex(str(tmp_path / "gmv.db"))
    else:
        assert TrainingIndex(str(tmp_path / "gmv.db")).index_type_for_server() == "IVF_FLAT"
