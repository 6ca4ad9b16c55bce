"""Encoders, re-rankers and quality scorers: registries, declared facts and the maths of each.

Components that need pretrained weights cannot load here (no network); their logic is tested
through stand-ins that are explicit below, and their missing-weights path for real.
"""
import numpy as np
import pytest
from PIL import Image

from gmv_engine.encoders import ENCODERS, create_encoder
from gmv_engine.errors import MissingWeightsError
from gmv_engine.quality import NoQuality, create_quality, normalise_score
from gmv_engine.rerankers import RERANKERS, create_reranker
from gmv_engine.rerankers.embedding_cosine import EmbeddingCosineReranker


def solid(value: int, size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


def test_registries_name_every_component():
    assert set(ENCODERS) == {"pixels", "vgg16"}
    assert set(RERANKERS) == {"none", "l2", "aligned_l2", "lpips", "dreamsim"}
    with pytest.raises(ValueError, match="unknown encoder"):
        create_encoder("resnet9000")
    with pytest.raises(ValueError, match="unknown re-ranker"):
        create_reranker("magic")


def test_pixel_encoder_is_downsampled_pixels_in_unit_range():
    encoder = create_encoder("pixels")
    assert encoder.dim == 16 * 16 * 3 and not encoder.needs_pretrained_weights
    vectors = encoder.embed([solid(0), solid(255)])
    assert vectors.shape == (2, encoder.dim) and vectors.dtype == np.float32
    assert np.allclose(vectors[0], 0.0) and np.allclose(vectors[1], 1.0)


def photo_crop(size: int = 64) -> Image.Image:
    """A real photograph (scikit-image ships it) cropped off-centre, so it is not symmetric."""
    import skimage.data

    return Image.fromarray(skimage.data.astronaut()[40:300, 120:380]).resize((size, size))


def test_aligned_l2_finds_the_source_after_mirror_crop_rotation_colour_and_grey():
    from PIL import ImageEnhance, ImageOps

    reranker = create_reranker("aligned_l2")
    source = photo_crop()
    others = [Image.fromarray(np.asarray(source)[::-1].copy()),  # upside down: no alignment undoes it
              ImageOps.invert(source), solid(120, 64)]
    stored = reranker.features([source, *others])
    assert stored.shape == (4, reranker.feature_dim) == (4, create_reranker("l2").feature_dim)
    width = source.width
    edits = {
        "mirror": ImageOps.mirror(source),
        "crop": source.crop((6, 4, 6 + int(width * 0.8), 4 + int(width * 0.8))).resize(source.size),
        "rotation": source.rotate(8, resample=Image.Resampling.BILINEAR),
        "colour": ImageEnhance.Brightness(ImageEnhance.Color(source).enhance(1.4)).enhance(0.8),
        "grey": ImageOps.grayscale(source).convert("RGB"),
    }
    plain = create_reranker("l2")
    for edit, query in edits.items():
        (aligned,) = reranker.distances([query], [stored])
        (unaligned,) = plain.distances([query], [stored])
        assert aligned.argmin() == 0, (edit, aligned)
        assert aligned[0] < unaligned[0], edit  # alignment brings the source closer
        assert aligned[0] < 0.5 * aligned[1:].min(), (edit, aligned)
    (itself,) = reranker.distances([source], [stored])
    assert itself[0] < 1e-3 and np.all(np.isfinite(itself))


def test_aligned_l2_distance_comes_from_features_alone():
    reranker = create_reranker("aligned_l2")
    images = [photo_crop(), solid(0, 64), solid(200, 64)]
    stored = reranker.features(images)
    from_images = reranker.distances(images[:1], [stored])[0]
    from_features = reranker.feature_distances(stored[:1], [stored])[0]
    assert np.allclose(from_images, from_features)
    assert reranker.feature_distances(stored[:1], [stored[:0]])[0].shape == (0,)


def test_l2_reranker_is_rms_pixel_distance():
    reranker = create_reranker("l2")
    stored = reranker.features([solid(0), solid(255), solid(51)])
    (distances,) = reranker.distances([solid(0)], [stored])
    # RMS difference of [0,1] pixels: black-black 0, black-white 1, black vs 51/255 = 0.2
    assert distances == pytest.approx([0.0, 1.0, 0.2], abs=1e-6)


def test_embedding_cosine_reranker_is_one_minus_cosine():
    # Stand-in for DreamSim's embedding (explicit: DreamSim's distance is 1 - cos of its embeddings).
    table = {0: [1.0, 0.0], 1: [0.0, 2.0], 2: [1.0, 1.0]}
    reranker = EmbeddingCosineReranker("stand-in", lambda images: np.array([table[im.getpixel((0, 0))[0]] for im in images]), 2)
    stored = reranker.features([solid(0), solid(1), solid(2)])
    (distances,) = reranker.distances([solid(0)], [stored])
    assert distances == pytest.approx([0.0, 1.0, 1 - 1 / np.sqrt(2)], abs=1e-6)


def test_lpips_reranker_code_path_with_random_backbone():
    # backbone_pretrained=False is for tests only: it checks shapes and identity, not perception.
    from gmv_engine.rerankers.lpips_distance import LpipsReranker

    reranker = LpipsReranker(side=32, backbone_pretrained=False)
    stored = reranker.features([solid(10), solid(200)])
    assert stored.shape == (2, 32 * 32 * 3) and stored.min() >= -1 and stored.max() <= 1
    (distances,) = reranker.distances([solid(10)], [stored])
    assert distances.shape == (2,)
    assert distances[0] == pytest.approx(0.0, abs=1e-6) and distances[1] > 0


def test_vgg16_gpu_preprocessing_matches_the_pil_transform_within_one_grey_level():
    """On CUDA the encoder resizes/crops/normalises tensors on the GPU instead of PIL images on
    the CPU; an index built on one must serve queries from the other. (Random weights: this
    checks the preprocessing, which does not depend on them.)"""
    from gmv_engine.encoders.vgg16 import VGG16Encoder

    encoder = VGG16Encoder("cpu", pretrained=False)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in
              [(512, 512, 3), (512, 512, 3), (300, 200, 3), (64, 64, 3)]] + [solid(200, 40).convert("L")]
    by_pil, by_tensors = encoder.preprocess(images), encoder.preprocess_tensors(images)
    assert by_pil.shape == by_tensors.shape == (5, 3, 224, 224)
    one_grey_level = 1 / 255 / min(encoder.transform.std)
    difference = (by_pil - by_tensors).abs()
    assert float(difference.max()) <= one_grey_level * 1.001 and float(difference.mean()) < one_grey_level / 3
    embeddings_pil, embeddings_tensors = encoder.embed_batch(by_pil), encoder.embed_batch(by_tensors)
    assert np.all(np.sum(embeddings_pil * embeddings_tensors, axis=1) > 0.9999)


def test_none_reranker_stores_nothing():
    reranker = create_reranker("none")
    assert reranker.feature_dim == 0 and reranker.features([solid(0)]).shape == (1, 0)


@pytest.mark.parametrize("raw, low, high, lower_better, expected", [
    ([0.0, 50.0, 100.0], 0, 100, True, [1.0, 0.5, 0.0]),  # PIQE: lower is better
    ([0.0, 0.25, 1.0], 0, 1, False, [0.0, 0.25, 1.0]),  # MANIQA: higher is better
    ([-3.0, 140.0], 0, 100, False, [0.0, 1.0]),  # out of the declared range: clipped
])
def test_normalise_score(raw, low, high, lower_better, expected):
    assert normalise_score(np.array(raw), low, high, lower_better) == pytest.approx(expected)


def test_quality_facts_come_from_pyiqa_model_cards():
    from gmv_engine.quality.pyiqa_metric import metric_facts

    assert metric_facts("piqe") == (0.0, 100.0, True)
    assert metric_facts("maniqa") == (0.0, 1.0, False)
    with pytest.raises(ValueError, match="not a pyiqa metric"):
        metric_facts("no-such-metric")
    with pytest.raises(ValueError, match="no-reference"):
        metric_facts("lpips")  # full-reference: needs the original image


def test_piqe_scores_in_unit_range_and_penalises_heavy_noise():
    # A real photograph shipped with scikit-image. (PIQE is a blind metric for natural photos:
    # on 32x32 digits, and for mild noise, its direction is unreliable; see docs/BENCHMARKS.md.)
    from skimage.data import astronaut

    photo = Image.fromarray(astronaut()).resize((256, 256))
    rng = np.random.default_rng(0)
    noisy = [Image.fromarray(np.clip(np.asarray(photo, dtype=np.float64) + rng.normal(0, sigma, (256, 256, 3)), 0, 255)
                             .astype(np.uint8)) for sigma in (30, 60)]
    q_photo, q_30, q_60 = create_quality("piqe").score([photo, *noisy])
    assert all(0 <= q <= 1 for q in (q_photo, q_30, q_60))
    assert q_photo > q_30 > q_60


def test_no_quality_is_one():
    assert isinstance(create_quality("none"), NoQuality)
    assert list(create_quality("none").score([solid(0), solid(1)])) == [1.0, 1.0]


@pytest.mark.parametrize("build, model", [
    (lambda: create_encoder("vgg16"), "vgg16"),
    (lambda: create_reranker("dreamsim"), "dreamsim"),
    (lambda: create_quality("maniqa"), "maniqa"),
])
def test_missing_pretrained_weights_fail_clearly(build, model):
    try:
        build()
    except MissingWeightsError as exc:
        assert f"'{model}'" in str(exc) and "gmv models download" in str(exc)
    else:
        pytest.skip(f"{model} weights are cached on this machine, so the missing-weights path cannot be shown")
