"""The credit formula of MISSION.md, on hand-computed cases and its properties."""
import math

import numpy as np
import pytest

from gmv_engine.credit import credits_from_distances, sum_by_contributor


def test_hand_computed_two_images():
    # q * e^-d_i / (e^-0.5 + e^-1.5), q = 0.8
    credits = credits_from_distances([0.5, 1.5], quality=0.8)
    denominator = math.exp(-0.5) + math.exp(-1.5)
    assert credits == pytest.approx([0.8 * math.exp(-0.5) / denominator, 0.8 * math.exp(-1.5) / denominator])
    assert credits == pytest.approx([0.5848469, 0.2151531], abs=1e-7)


def test_equal_distances_share_equally():
    assert credits_from_distances([0.3, 0.3, 0.3, 0.3], quality=1.0) == pytest.approx([0.25] * 4)


def test_single_image_gets_all_of_q():
    assert credits_from_distances([7.0], quality=0.37) == pytest.approx([0.37])


def test_temperature_divides_distances():
    d = [0.2, 0.9, 1.4]
    assert credits_from_distances(d, 0.5, temperature=2.0) == pytest.approx(
        credits_from_distances([x / 2.0 for x in d], 0.5, temperature=1.0))


@pytest.mark.parametrize("seed", range(5))
def test_sum_is_quality_and_order_follows_distance(seed):
    rng = np.random.default_rng(seed)
    distances = np.sort(rng.uniform(0, 5, size=10))
    quality = float(rng.uniform(0, 1))
    credits = credits_from_distances(distances, quality)
    assert credits.sum() == pytest.approx(quality)
    assert np.all(np.diff(credits) <= 1e-15)  # closer -> at least as much credit
    assert np.all(credits >= 0)


def test_numerically_stable_for_large_distances():
    # exp(-1000) underflows to 0 in float64; the shifted softmax must still give finite credits.
    credits = credits_from_distances([1000.0, 1001.0], quality=1.0)
    assert np.all(np.isfinite(credits))
    assert credits == pytest.approx([1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])


def test_zero_quality_gives_zero_credit():
    assert credits_from_distances([0.1, 0.2], quality=0.0) == pytest.approx([0.0, 0.0])


@pytest.mark.parametrize("kwargs", [dict(quality=1.5), dict(quality=-0.1), dict(quality=0.5, temperature=0)])
def test_rejects_out_of_range_arguments(kwargs):
    with pytest.raises(ValueError):
        credits_from_distances([0.1], **kwargs)


def test_rejects_non_finite_distance():
    with pytest.raises(ValueError):
        credits_from_distances([0.1, float("nan")], quality=1.0)


def test_sum_by_contributor():
    totals = sum_by_contributor(["a", "b", "a", "c"], [0.1, 0.3, 0.25, 0.05])
    assert [name for name, _ in totals] == ["a", "b", "c"]
    assert dict(totals) == pytest.approx({"a": 0.35, "b": 0.3, "c": 0.05})
