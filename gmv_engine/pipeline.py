"""The attribution pipeline: decode -> embed -> recall -> re-rank -> quality -> credit.

An `Attributor` is one collection: the components that built it, its query settings and its
re-rank feature cache. `attribute_batch` runs a batch that may mix collections: images whose
collections share an encoder (or quality model) go through it in one pass, and each
collection's images get one Milvus search and one feature fetch.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from .credit import Attribution, Credit, credits_from_distances
from .decode import ImageLimits, decode_image
from .encoders import Encoder
from .errors import IncompatibleCollectionError, InvalidArgumentError
from .feature_cache import FeatureCache
from .milvus.index import CollectionInfo, Hit, TrainingIndex
from .models import ModelPool
from .profiles import get_profile
from .quality import QualityScorer
from .rerankers import Reranker
from .settings import DEFAULTS, Settings

STAGES = ("decode", "embed", "recall", "rerank", "quality", "credit")


@dataclass
class StageTimes:
    """Seconds spent per stage, summed over calls: for benchmarks and metrics."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @contextmanager
    def stage(self, name: str, into: dict[str, float] | None = None) -> Iterator[None]:
        """Time one stage; `into` also gets this call's seconds (one batch's, for an observer)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] += elapsed
            if into is not None:
                into[name] = into.get(name, 0.0) + elapsed


class Attributor:
    def __init__(
        self,
        index: TrainingIndex,
        collection: str,
        settings: Settings = DEFAULTS,
        device: str = "cpu",
        encoder: Encoder | None = None,
        reranker: Reranker | None = None,
        quality: QualityScorer | None = None,
        models: ModelPool | None = None,
        feature_cache_bytes: int | None = None,
    ):
        settings.check_query()
        self.index = index
        self.collection = collection
        self.settings = settings
        self.limits = ImageLimits.from_settings(settings)
        self.info: CollectionInfo = index.info(collection)
        reranker_name = settings.reranker or self.info.reranker
        if reranker_name not in ("none", self.info.reranker) and not stores_same_features(reranker_name,
                                                                                         self.info.reranker):
            raise IncompatibleCollectionError(
                f"collection '{collection}' stores re-rank features for '{self.info.reranker}', not '{reranker_name}'; "
                f"use --reranker {self.info.reranker} or none, or build a collection with --reranker {reranker_name}"
            )
        models = ModelPool(device) if models is None else models  # (an empty pool is falsy)
        self.encoder = encoder or models.get("encoder", self.info.encoder)
        if self.encoder.name != self.info.encoder or self.encoder.dim != self.info.encoder_dim:
            raise IncompatibleCollectionError(
                f"collection '{collection}' was built with encoder {self.info.encoder} ({self.info.encoder_dim}-d), "
                f"not {self.encoder.name} ({self.encoder.dim}-d)"
            )
        self.reranker = reranker or models.get("reranker", reranker_name)
        self.quality = quality or models.get("quality", settings.quality or _profile_quality(self.info.profile))
        self.times = StageTimes()
        # Called with {stage: seconds} after each batch that succeeded (a server's metrics).
        self.on_batch: Callable[[Mapping[str, float]], None] | None = None
        cache_bytes = settings.feature_cache_mb * 1024 * 1024 if feature_cache_bytes is None else feature_cache_bytes
        self.feature_cache = FeatureCache(cache_bytes)
        index.load(collection)
        self.removals_version = 0
        self.excluded: frozenset[str] = frozenset()  # removed (opted-out) contributors: never credited
        self.refresh_removals()
        self.calibration = None if settings.fixed_temperature is not None else collection_calibration(
            index, collection, self.reranker, settings)
        self.temperature = settings.fixed_temperature or self.calibration.temperature

    @property
    def components(self) -> dict[str, str]:
        """What produces this collection's credits: the record a ledger hashes with each generation."""
        return {"collection": self.collection, "profile": self.info.profile, "encoder": self.encoder.name,
                "reranker": self.reranker.name, "quality": self.quality.name}

    def refresh_removals(self) -> bool:
        """Read the collection's removed contributors; True when they changed since last read.
        Their hits are dropped before re-ranking even while Milvus' delete is not yet visible
        to searches, and the feature cache is emptied of the rows that went."""
        from .milvus.erasure import removals

        state = removals(self.index, self.collection)
        if state.version == self.removals_version:
            return False
        self.excluded = frozenset(state.contributors)
        self.removals_version = state.version
        self.feature_cache.clear()
        return True

    def query_settings(self) -> dict[str, object]:
        """What a server reports and a ledger record hashes: the settings with T as used."""
        return {**self.settings.query_settings(), "temperature": self.temperature,
                "temperature_source": "fixed" if self.calibration is None else "calibrated"}

    def attribute_bytes(self, images: Sequence[bytes], top_k: int | Sequence[int] | None = None) -> list[Attribution]:
        with self.times.stage("decode"):
            decoded = [decode_image(data, self.limits) for data in images]
        return self.attribute(decoded, top_k)

    def attribute(self, images: Sequence[Image.Image], top_k: int | Sequence[int] | None = None) -> list[Attribution]:
        """Attribute a batch. `top_k` is one k for all, one per image (a server's batch mixes
        callers), or None for the settings' default."""
        top_ks = self.check_top_k(top_k, len(images))
        return attribute_batch([self] * len(images), images, top_ks, self.times, self.on_batch)

    def check_top_k(self, top_k: int | Sequence[int] | None, count: int) -> list[int]:
        if top_k is None:
            top_k = self.settings.top_k
        top_ks = [top_k] * count if isinstance(top_k, int) else list(top_k)
        if len(top_ks) != count:
            raise InvalidArgumentError(f"{len(top_ks)} top_k values for {count} images")
        for k in top_ks:
            if not 1 <= k <= self.settings.recall_k:
                raise InvalidArgumentError(f"top_k must be between 1 and {self.settings.recall_k}, got {k}")
        return top_ks

    def recall(self, vectors: np.ndarray, mirrored: np.ndarray | None = None) -> list[list[Hit]]:
        """The K' nearest training rows of each vector; with `mirrored` (the same images flipped
        left to right), the K' nearest of either orientation, in one search."""
        k = self.settings.recall_k
        if mirrored is None:
            return self.index.search(self.collection, vectors, k, self.settings.nprobe)
        found = self.index.search(self.collection, np.concatenate([vectors, mirrored]), k, self.settings.nprobe)
        merged = []
        for plain, flipped in zip(found[:len(vectors)], found[len(vectors):]):
            nearest: dict[int, Hit] = {}
            for hit in (*plain, *flipped):
                if hit.pk not in nearest or hit.distance < nearest[hit.pk].distance:
                    nearest[hit.pk] = hit
            merged.append(sorted(nearest.values(), key=lambda hit: (hit.distance, hit.training_id))[:k])
        return merged

    def rerank(self, images: Sequence[Image.Image], recalled: list[list[Hit]], top_ks: Sequence[int]) -> list[list[Hit]]:
        excluded = self.excluded
        if excluded:
            recalled = [[hit for hit in hits if hit.contributor_id not in excluded] for hits in recalled]
        if self.reranker.name != "none":
            features = self._features({hit.pk for hits in recalled for hit in hits})
            recalled = [[hit for hit in hits if hit.pk in features] for hits in recalled]
            distances = self.reranker.distances(images, [
                np.stack([features[hit.pk] for hit in hits]) if hits else np.zeros((0, self.reranker.feature_dim))
                for hits in recalled
            ])
            recalled = [
                [replace(hit, distance=float(d)) for hit, d in zip(hits, dists)]
                for hits, dists in zip(recalled, distances)
            ]
        # Lower distance first; ties broken by training_id so results are deterministic.
        return [sorted(hits, key=lambda hit: (hit.distance, hit.training_id))[:k] for hits, k in zip(recalled, top_ks)]

    def _features(self, pks: set[int]) -> dict[int, np.ndarray]:
        features = self.feature_cache.get_many(pks)
        missing = pks.difference(features)
        if missing:
            fetched = self.index.fetch_features(self.collection, missing)
            self.feature_cache.put_many(fetched)
            features.update(fetched)
        return features

    def credit(self, kept: list[Hit], quality: float) -> Attribution:
        values = credits_from_distances([hit.distance for hit in kept], quality, self.temperature)
        return Attribution(quality, tuple(
            Credit(rank=i + 1, training_id=hit.training_id, contributor_id=hit.contributor_id,
                   credit=float(value), distance=hit.distance)
            for i, (hit, value) in enumerate(zip(kept, values))
        ))


def attribute_batch(attributors: Sequence[Attributor], images: Sequence[Image.Image], top_ks: Sequence[int],
                    times: StageTimes | None = None,
                    on_batch: Callable[[Mapping[str, float]], None] | None = None,
                    checkpoint: Callable[[], None] | None = None) -> list[Attribution]:
    """Attribute image i against attributors[i] with k = top_ks[i]. Models shared by several
    collections (the same object from one ModelPool) run once over all their images.
    `checkpoint` is called before each stage (a server's bulk batch waits there for others)."""
    if not images:
        return []
    times = times or StageTimes()
    checkpoint = checkpoint or (lambda: None)
    batch: dict[str, float] = {}
    count = len(images)
    vectors: list[np.ndarray | None] = [None] * count
    mirrored: list[np.ndarray | None] = [None] * count  # for attributors that recall both orientations
    checkpoint()
    with times.stage("embed", batch):
        for encoder, members in _groups(attributors, lambda a: a.encoder):
            flip = [i for i in members if attributors[i].settings.recall_mirror]
            batch_images = [images[i] for i in members] + [ImageOps.mirror(images[i]) for i in flip]
            embedded = encoder.embed(batch_images)
            for i, vector in zip(members, embedded[:len(members)]):
                vectors[i] = vector
            for i, vector in zip(flip, embedded[len(members):]):
                mirrored[i] = vector
    kept: list[list[Hit] | None] = [None] * count
    by_collection = _groups(attributors, lambda a: a)
    checkpoint()
    with times.stage("recall", batch):
        recalled = {id(a): a.recall(np.stack([vectors[i] for i in members]),
                                    np.stack([mirrored[i] for i in members]) if a.settings.recall_mirror else None)
                    for a, members in by_collection}
    checkpoint()
    with times.stage("rerank", batch):
        for attributor, members in by_collection:
            ranked = attributor.rerank([images[i] for i in members], recalled[id(attributor)],
                                       [top_ks[i] for i in members])
            for i, hits in zip(members, ranked):
                kept[i] = hits
    qualities = np.zeros(count, dtype=np.float64)
    checkpoint()
    with times.stage("quality", batch):
        for scorer, members in _groups(attributors, lambda a: a.quality):
            qualities[members] = scorer.score([images[i] for i in members])
    # A flat image (all black, fully transparent: what a safety checker returns) has no quality a
    # no-reference metric can measure (PIQE gives NaN): it gets q = 0, so it passes on no credit.
    # Every other image gets at least min_quality (0 unless set: the paper's q as measured).
    floors = np.array([a.settings.min_quality for a in attributors])
    qualities = np.where(np.isfinite(qualities), np.maximum(qualities, floors), 0.0)
    with times.stage("credit", batch):
        results = [attributors[i].credit(kept[i], float(qualities[i])) for i in range(count)]
    if on_batch is not None:
        on_batch(batch)
    return results


def _groups(attributors: Sequence[Attributor], key) -> list[tuple[object, list[int]]]:
    """Indices grouped by the identity of key(attributor), in first-seen order."""
    groups: dict[int, tuple[object, list[int]]] = {}
    for i, attributor in enumerate(attributors):
        value = key(attributor)
        groups.setdefault(id(value), (value, []))[1].append(i)
    return list(groups.values())


def stores_same_features(reranker: str, other: str) -> bool:
    """Whether two re-rankers keep the same feature per training image (`l2` and `aligned_l2`),
    so a collection built for one serves the other."""
    from .registry import spec

    try:
        a, b = spec("reranker", reranker).facts, spec("reranker", other).facts
    except ValueError:
        return False
    return (a.get("stored"), a.get("feature_dim")) == (b.get("stored"), b.get("feature_dim"))


def collection_calibration(index: TrainingIndex, collection: str, reranker: Reranker, settings: Settings):
    """The collection's stored calibration for `reranker`; measured and stored now for a
    collection built before calibration existed (or re-ranked another way)."""
    from .calibration import calibrate

    stored = index.calibrations(collection).get(reranker.name)
    if stored is not None:
        return stored
    calibration = calibrate(index, collection, reranker, settings.recall_k, settings.nprobe)
    try:
        index.save_calibration(collection, calibration)
    except Exception as exc:  # a read-only Milvus user: use it, measured again at the next start
        import logging

        logging.getLogger(__name__).warning("could not store the calibration of '%s': %s", collection, exc)
    return calibration


def _profile_quality(profile: str) -> str:
    try:
        return get_profile(profile).quality
    except ValueError:
        return "none"
