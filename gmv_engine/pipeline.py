"""The attribution pipeline: decode -> embed -> recall -> re-rank -> quality -> credit.

One `Attributor` serves one collection. It works on batches so that a server can hand it
many generations at once: one encoder pass, one Milvus search, one feature fetch.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from PIL import Image

from .config import PipelineSettings, get_profile
from .credit import credits_from_distances, sum_by_contributor
from .decode import DEFAULT_LIMITS, ImageLimits, decode_image
from .encoders import Encoder, create_encoder
from .errors import IncompatibleCollectionError, InvalidArgumentError
from .feature_cache import FeatureCache
from .index import CollectionInfo, Hit, TrainingIndex
from .quality import QualityScorer, create_quality
from .rerankers import Reranker, create_reranker

STAGES = ("decode", "embed", "recall", "rerank", "quality", "credit")


@dataclass
class Credit:
    rank: int
    training_id: str
    contributor_id: str
    credit: float
    distance: float


@dataclass
class Attribution:
    quality: float
    credits: list[Credit]
    contributors: list[tuple[str, float]]


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
        settings: PipelineSettings = PipelineSettings(),
        device: str = "cpu",
        encoder: Encoder | None = None,
        reranker: Reranker | None = None,
        quality: QualityScorer | None = None,
        limits: ImageLimits = DEFAULT_LIMITS,
        feature_cache_bytes: int = 256 * 1024 * 1024,
    ):
        settings.check()
        self.index = index
        self.collection = collection
        self.settings = settings
        self.limits = limits
        self.info: CollectionInfo = index.info(collection)
        reranker_name = settings.reranker or self.info.reranker
        if reranker_name not in ("none", self.info.reranker):
            raise IncompatibleCollectionError(
                f"collection '{collection}' stores re-rank features for '{self.info.reranker}', not '{reranker_name}'; "
                f"use --reranker {self.info.reranker} or none, or build a collection with --reranker {reranker_name}"
            )
        self.encoder = encoder or create_encoder(self.info.encoder, device=device)
        if self.encoder.name != self.info.encoder or self.encoder.dim != self.info.encoder_dim:
            raise IncompatibleCollectionError(
                f"collection '{collection}' was built with encoder {self.info.encoder} ({self.info.encoder_dim}-d), "
                f"not {self.encoder.name} ({self.encoder.dim}-d)"
            )
        self.reranker = reranker or create_reranker(reranker_name, device=device)
        quality_name = settings.quality or _profile_quality(self.info.profile)
        self.quality = quality or create_quality(quality_name, device=device)
        self.times = StageTimes()
        # Called with {stage: seconds} after each batch that succeeded (a server's metrics).
        self.on_batch: Callable[[Mapping[str, float]], None] | None = None
        self.feature_cache = FeatureCache(feature_cache_bytes)
        index.load(collection)

    def attribute_bytes(self, images: Sequence[bytes], top_k: int | Sequence[int] | None = None) -> list[Attribution]:
        with self.times.stage("decode"):
            decoded = [decode_image(data, self.limits) for data in images]
        return self.attribute(decoded, top_k)

    def attribute(self, images: Sequence[Image.Image], top_k: int | Sequence[int] | None = None) -> list[Attribution]:
        """Attribute a batch. `top_k` is one k for all, one per image (a server's batch mixes
        callers), or None for the settings' default."""
        if not images:
            return []
        settings = self.settings
        top_ks = self.check_top_k(top_k, len(images))
        batch: dict[str, float] = {}
        with self.times.stage("embed", batch):
            vectors = self.encoder.embed(images)
        with self.times.stage("recall", batch):
            recalled = self.index.search(self.collection, vectors, settings.recall_k, settings.nprobe)
        with self.times.stage("rerank", batch):
            ranked = self._rerank(images, recalled, top_ks)
        with self.times.stage("quality", batch):
            qualities = self.quality.score(images)
        with self.times.stage("credit", batch):
            results = [self._credit(kept, float(q), settings.temperature) for kept, q in zip(ranked, qualities)]
        if self.on_batch is not None:
            self.on_batch(batch)
        return results

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

    def _rerank(self, images: Sequence[Image.Image], recalled: list[list[Hit]], top_ks: list[int]) -> list[list[Hit]]:
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

    @staticmethod
    def _credit(kept: list[Hit], quality: float, temperature: float) -> Attribution:
        values = credits_from_distances([hit.distance for hit in kept], quality, temperature)
        credits = [
            Credit(rank=i + 1, training_id=hit.training_id, contributor_id=hit.contributor_id,
                   credit=float(value), distance=hit.distance)
            for i, (hit, value) in enumerate(zip(kept, values))
        ]
        contributors = sum_by_contributor((c.contributor_id for c in credits), (c.credit for c in credits))
        return Attribution(quality=quality, credits=credits, contributors=contributors)


def _profile_quality(profile: str) -> str:
    try:
        return get_profile(profile).quality
    except ValueError:
        return "none"
