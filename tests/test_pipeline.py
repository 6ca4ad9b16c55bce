"""The whole pipeline on the real embedded Milvus with the offline profile."""
import numpy as np
import pytest

from gmv_engine.settings import Settings
from gmv_engine.datasets import read_heldout
from gmv_engine.decode import decode_image, load_image_file
from gmv_engine.errors import IncompatibleCollectionError, InvalidArgumentError, InvalidImageError
from gmv_engine.pipeline import Attributor
from gmv_engine.quality import create_quality

from helpers import png_bytes


@pytest.fixture(scope="module")
def attributor(index, digits_collection):
    return Attributor(index, digits_collection[0], Settings())


@pytest.fixture(scope="module")
def heldout(digits):
    return [(load_image_file(path)[0], label) for path, _, label in read_heldout(digits.heldout)]


@pytest.fixture(scope="module")
def results(attributor, heldout):
    return attributor.attribute([image for image, _ in heldout])


def test_c1_identical_class_share_at_least_0_9(results, heldout):
    """The paper's C1: share of each generation's top-10 contributors with its own class."""
    shares = [np.mean([c.contributor_id == f"digit-{label}" for c in result.credits])
              for result, (_, label) in zip(results, heldout)]
    print(f"C1 (offline profile, {len(shares)} held-out digits, k=10): {np.mean(shares):.3f}")
    assert np.mean(shares) >= 0.9


def test_each_generation_credits_sum_to_its_quality(results):
    for result in results:
        assert 0.0 <= result.quality <= 1.0
        assert sum(c.credit for c in result.credits) == pytest.approx(result.quality)
        assert sum(credit for _, credit in result.contributors) == pytest.approx(result.quality)


def test_top_k_kept_in_distance_order_with_credit_following(results):
    for result in results:
        assert [c.rank for c in result.credits] == list(range(1, 11))
        distances = [c.distance for c in result.credits]
        credits = [c.credit for c in result.credits]
        assert distances == sorted(distances)
        assert all(a >= b - 1e-15 for a, b in zip(credits, credits[1:]))


def test_training_images_outside_top_k_get_no_credit(attributor, heldout):
    image = heldout[0][0]
    (top3,) = attributor.attribute([image], top_k=3)
    (top10,) = attributor.attribute([image], top_k=10)
    assert len(top3.credits) == 3
    assert [c.training_id for c in top3.credits] == [c.training_id for c in top10.credits[:3]]
    assert sum(c.credit for c in top3.credits) == pytest.approx(top3.quality)


def test_exact_training_image_ranks_first_with_distance_zero(attributor, digits):
    from gmv_engine.ingest import read_manifest

    row = read_manifest(digits.manifest)[123]
    (result,) = attributor.attribute_bytes([row.path.read_bytes()])
    assert result.credits[0].training_id == row.training_id
    # Zero up to the feature store's float16 rounding (a pixel in [0, 1] moves by <= 2.4e-4);
    # the nearest other training image is over a hundred times further.
    assert result.credits[0].distance == pytest.approx(0.0, abs=5e-4)
    assert result.credits[1].distance > 100 * max(result.credits[0].distance, 1e-6)


def test_batch_results_equal_single_results(attributor, heldout):
    images = [image for image, _ in heldout[:4]]
    batched = attributor.attribute(images)
    for image, result in zip(images, batched):
        (single,) = attributor.attribute([image])
        assert [c.training_id for c in single.credits] == [c.training_id for c in result.credits]
        assert [c.credit for c in single.credits] == pytest.approx([c.credit for c in result.credits])


def test_no_rerank_uses_recall_order(index, digits_collection, heldout):
    plain = Attributor(index, digits_collection[0], Settings(reranker="none"),
                       quality=create_quality("none"))
    (result,) = plain.attribute([heldout[0][0]])
    assert result.quality == 1.0 and len(result.credits) == 10
    assert [c.distance for c in result.credits] == sorted(c.distance for c in result.credits)


def test_reranker_the_collection_lacks_is_refused(index, digits_collection):
    with pytest.raises(IncompatibleCollectionError, match="stores re-rank features for 'l2'"):
        Attributor(index, digits_collection[0], Settings(reranker="lpips"))


@pytest.mark.parametrize("top_k", [0, 101])
def test_bad_top_k(attributor, heldout, top_k):
    with pytest.raises(InvalidArgumentError, match="top_k"):
        attributor.attribute([heldout[0][0]], top_k=top_k)


def test_undecodable_bytes(attributor):
    with pytest.raises(InvalidImageError):
        attributor.attribute_bytes([b"\x89PNG\r\n\x1a\n garbage"])


def test_stage_times_are_recorded(attributor, heldout):
    before = dict(attributor.times.seconds)
    attributor.attribute_bytes([png_bytes(heldout[0][0])])
    assert all(attributor.times.seconds[stage] > before[stage] for stage in ("decode", "embed", "recall", "rerank", "quality"))


def test_flat_images_get_zero_quality_and_zero_credit(attributor):
    """All black and fully transparent (a safety checker's output): PIQE cannot score them (NaN);
    they are legal generations that pass on no credit."""
    from PIL import Image

    black = Image.new("RGB", (64, 64), (0, 0, 0))
    transparent = decode_image(png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 0))))
    for result in attributor.attribute([black, transparent]):
        assert result.quality == 0.0 and len(result.credits) == 10
        assert all(c.credit == 0.0 for c in result.credits)


def test_exif_orientation_is_applied_before_embedding(attributor, heldout):
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90° clockwise to view) gets the
    same top 5 as the upright image."""
    import io

    from PIL import Image

    upright = heldout[0][0].resize((96, 96))
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # how the camera stored the pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    sideways.save(buffer, format="JPEG", quality=95, exif=exif)
    plain = io.BytesIO()
    upright.save(plain, format="JPEG", quality=95)
    (from_exif,), (from_plain,) = attributor.attribute_bytes([buffer.getvalue()]), attributor.attribute_bytes([plain.getvalue()])
    assert [c.training_id for c in from_exif.credits[:5]] == [c.training_id for c in from_plain.credits[:5]]
