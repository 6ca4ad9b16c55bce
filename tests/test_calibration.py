"""The credit temperature calibrated per collection and re-ranker, and the quality floor, on the
real embedded Milvus with the digits collection."""
import numpy as np
import pytest

from gmv_engine.calibration import SHARPNESS, calibrate
from gmv_engine.datasets import read_heldout
from gmv_engine.decode import load_image_file
from gmv_engine.errors import InvalidArgumentError
from gmv_engine.pipeline import Attributor
from gmv_engine.quality import create_quality
from gmv_engine.rerankers import create_reranker
from gmv_engine.settings import Settings


@pytest.fixture(scope="module")
def heldout(digits):
    return [load_image_file(path)[0] for path, _, _ in read_heldout(digits.heldout)[:40]]


def test_the_build_stores_a_calibration_of_its_reranker(index, digits_collection):
    name, report = digits_collection
    stored = index.calibrations(name)["l2"]
    assert stored == report.calibration
    assert stored.sample > 100 and stored.rows == report.inserted
    # RMS pixel distances of 32x32 digits: far below the paper's T = 1.
    assert 0.01 < stored.nearest_distance < 0.5
    assert stored.temperature == pytest.approx(stored.nearest_distance / SHARPNESS)
    assert "credit temperature T = " in report.summary()


def test_calibration_is_measured_through_the_query_path_and_reproducible(index, digits_collection):
    name, report = digits_collection
    again = calibrate(index, name, create_reranker("l2"), recall_k=100, nprobe=32)
    assert again == report.calibration
    # Another re-ranker measures its own distances: aligned_l2 reads the same stored pixels and
    # finds every digit closer to its nearest neighbour (it may mirror, shift and rotate).
    aligned = calibrate(index, name, create_reranker("aligned_l2"), recall_k=100, nprobe=32)
    assert 0 < aligned.nearest_distance < again.nearest_distance


def test_auto_uses_the_calibrated_temperature_and_reports_it(index, digits_collection, heldout):
    name, report = digits_collection
    auto = Attributor(index, name, Settings())
    paper = Attributor(index, name, Settings(temperature="1"))
    assert auto.temperature == report.calibration.temperature and paper.temperature == 1.0
    assert auto.query_settings()["temperature_source"] == "calibrated"
    assert paper.query_settings()["temperature"] == 1.0 and paper.query_settings()["temperature_source"] == "fixed"
    for a, b in zip(auto.attribute(heldout), paper.attribute(heldout)):
        # Same ranking, same total q; the calibrated T gives the closest image more of it.
        assert [c.training_id for c in a.credits] == [c.training_id for c in b.credits]
        assert sum(c.credit for c in a.credits) == pytest.approx(a.quality)
        if a.quality > 0:
            assert a.credits[0].credit / a.quality >= b.credits[0].credit / b.quality
    top_share = np.mean([r.credits[0].credit / r.quality for r in auto.attribute(heldout) if r.quality > 0])
    paper_share = np.mean([r.credits[0].credit / r.quality for r in paper.attribute(heldout) if r.quality > 0])
    assert paper_share < 0.15 < top_share  # T = 1 splits ~evenly over the 10 kept (0.1 each)


def test_a_reranker_without_a_stored_calibration_is_calibrated_on_first_use(index, digits_collection):
    name, _ = digits_collection
    # As a collection built before calibration existed (Milvus 2.3 cannot drop a property).
    index.client.alter_collection_properties(name, properties={"gmv.calibration": "{}"})
    try:
        recall_only = Attributor(index, name, Settings(reranker="none"), quality=create_quality("none"))
        assert recall_only.calibration.reranker == "none" and recall_only.temperature > 0
        assert set(index.calibrations(name)) == {"none"}  # stored for the next server
    finally:
        index.save_calibration(name, digits_collection[1].calibration)
    assert Attributor(index, name, Settings()).temperature == digits_collection[1].calibration.temperature


def test_an_l2_collection_serves_aligned_l2(index, digits_collection, heldout):
    name, _ = digits_collection
    aligned = Attributor(index, name, Settings(reranker="aligned_l2"))
    (result,) = aligned.attribute(heldout[:1])
    assert aligned.reranker.name == "aligned_l2" and len(result.credits) == 10
    assert sum(c.credit for c in result.credits) == pytest.approx(result.quality)


@pytest.mark.parametrize("value", ["0", "-1", "warm", "nan"])
def test_bad_temperatures_are_refused(value):
    with pytest.raises(InvalidArgumentError, match="temperature must be auto or a number > 0"):
        Settings(temperature=value).validate()


def test_min_quality_floors_q_but_not_for_flat_images(index, digits_collection, heldout):
    from PIL import Image

    name, _ = digits_collection
    floored = Attributor(index, name, Settings(min_quality=0.6))
    black = Image.new("RGB", (64, 64), (0, 0, 0))
    results = floored.attribute([*heldout[:10], black])
    assert all(r.quality >= 0.6 for r in results[:-1])
    assert results[-1].quality == 0.0 and all(c.credit == 0.0 for c in results[-1].credits)
    assert floored.query_settings()["min_quality"] == 0.6
    with pytest.raises(InvalidArgumentError, match="min_quality"):
        Settings(min_quality=1.5).validate()


def test_recall_mirror_finds_training_images_generated_mirrored(index, digits_collection, digits):
    """A generator trained with flip augmentation may reproduce a training image mirrored; with
    recall_mirror (the default) recall searches both orientations and finds it at distance 0."""
    from PIL import ImageOps

    from gmv_engine.ingest import read_manifest

    name, _ = digits_collection
    rows = read_manifest(digits.manifest)[::300][:5]
    flipped = [ImageOps.mirror(load_image_file(row.path)[0]) for row in rows]
    none = create_quality("none")
    both = Attributor(index, name, Settings(reranker="none"), quality=none)
    plain = Attributor(index, name, Settings(reranker="none", recall_mirror=0), quality=none)
    assert both.settings.recall_mirror == 1 and both.query_settings()["recall_mirror"] == 1
    originals = [load_image_file(row.path)[0] for row in rows]
    for row, found, upright in zip(rows, both.attribute(flipped), plain.attribute(originals)):
        # Found at the distance the upright image itself gets (0, up to PQ's quantisation error).
        assert found.credits[0].training_id == row.training_id == upright.credits[0].training_id
        assert found.credits[0].distance == pytest.approx(upright.credits[0].distance, abs=1e-4)
        assert [c.distance for c in found.credits] == sorted(c.distance for c in found.credits)
        assert len({c.training_id for c in found.credits}) == len(found.credits) == 10  # no pk twice
    assert any(r.credits[0].distance > 0.01 for r in plain.attribute(flipped))
    with pytest.raises(InvalidArgumentError, match="recall_mirror"):
        Settings(recall_mirror=2).validate()
