"""The credit temperature of a collection, calibrated from its own distances.

V = q · exp(-d/T) / Σ exp(-d/T) only separates the kept images when T is on the scale of the
distances: with the paper's T = 1 and distances of 0.01–0.2 every kept image gets about 1/k of
the credit, even one at distance 0. So `--temperature auto` (the default) sets

    T = median over a sample of training images of (distance to the nearest OTHER training image) / SHARPNESS

measured through the collection's own recall and re-ranker, exactly as a query would be. A
generated image as close to one training image as training images are to each other then
gives the next one about e^-SHARPNESS of its weight; a novel image spreads credit over the
images its distances cannot tell apart. The result is stored with the collection, per
re-ranker, and reported by GetIndexInfo; `--temperature 1` is the paper's formula.
"""
from __future__ import annotations

import logging
import random
from dataclasses import asdict, dataclass
from statistics import median

import numpy as np

log = logging.getLogger(__name__)

SHARPNESS = 8.0  # docs/EVALUATION.md: the share of credit to the right photo for 3, 5, 8
SAMPLE_SIZE = 256  # training images whose nearest neighbours are measured
PAPER_TEMPERATURE = 1.0  # what a collection too small or too uniform to calibrate falls back to


@dataclass(frozen=True)
class Calibration:
    reranker: str
    temperature: float
    nearest_distance: float  # the median distance to the nearest other training image (0: none measured)
    sample: int  # training images measured
    rows: int  # rows in the collection when measured

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Calibration | None":
        try:
            calibration = cls(**data)
        except TypeError:
            return None
        return calibration if calibration.temperature > 0 else None


def calibrate(index, collection: str, reranker, recall_k: int, nprobe: int, sample_size: int = SAMPLE_SIZE,
              seed: int = 0) -> Calibration:
    """Measure the collection's temperature for `reranker` (an object from the registry, or one
    named "none" for the recall distances). Reads only; `index.save_calibration` stores it."""
    rows = index.count(collection)
    sample = index.sample_rows(collection, sample_size, seed=seed)  # {pk: embedding}
    if not sample:
        return Calibration(reranker.name, PAPER_TEMPERATURE, 0.0, 0, rows)
    pks = list(sample)
    # One more than usual: the nearest hit is normally the image itself.
    hits = index.search(collection, np.stack([sample[pk] for pk in pks]), min(recall_k + 1, 16384), nprobe)
    nearest: list[float] = []
    if reranker.name == "none":
        for pk, found in zip(pks, hits):
            others = [hit.distance for hit in found if hit.pk != pk]
            if others:
                nearest.append(min(others))
    else:
        features = index.fetch_features(collection, {pk for pk in pks} | {hit.pk for found in hits for hit in found})
        for pk, found in zip(pks, hits):
            others = [hit for hit in found if hit.pk != pk and hit.pk in features]
            if pk not in features or not others:
                continue
            (distances,) = reranker.feature_distances(features[pk][None, :],
                                                      [np.stack([features[hit.pk] for hit in others])])
            nearest.append(float(np.min(distances)))
    # Exact duplicates under other ids (refused at ingest, but a copy may differ by a byte) say
    # nothing about the spread: only positive distances count.
    positive = [d for d in nearest if d > 1e-9 and np.isfinite(d)]
    if not positive:
        log.warning("collection '%s': no distances to calibrate the temperature from; using T = %g",
                    collection, PAPER_TEMPERATURE)
        return Calibration(reranker.name, PAPER_TEMPERATURE, 0.0, len(nearest), rows)
    typical = float(median(positive))
    return Calibration(reranker.name, typical / SHARPNESS, typical, len(positive), rows)


def sample_keys(keys: list[int], count: int, seed: int) -> list[int]:
    """A reproducible sample of `count` keys (all of them when there are fewer)."""
    if len(keys) <= count:
        return sorted(keys)
    return sorted(random.Random(seed).sample(sorted(keys), count))
