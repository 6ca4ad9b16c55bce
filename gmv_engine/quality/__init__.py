"""Quality scorers by name: `none` (q = 1) or any pyiqa no-reference metric (`maniqa`, `piqe`,
`musiq`, ...). Every scorer returns q in [0, 1], higher = better, whatever the metric's own
range and direction: see `normalise_score`."""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
from PIL import Image


class QualityScorer(Protocol):
    name: str
    needs_pretrained_weights: bool

    def score(self, images: Sequence[Image.Image]) -> np.ndarray: ...


class NoQuality:
    """Every generation passes on full credit (q = 1)."""

    name = "none"
    needs_pretrained_weights = False

    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.ones(len(images), dtype=np.float64)


def normalise_score(raw: np.ndarray, low: float, high: float, lower_better: bool) -> np.ndarray:
    """Map a metric's raw score onto [0, 1] with 1 = best: linear in its declared range, clipped."""
    if not high > low:
        raise ValueError(f"score range must have high > low, got [{low}, {high}]")
    q = np.clip((np.asarray(raw, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    return 1.0 - q if lower_better else q


def create_quality(name: str, device: str = "cpu") -> QualityScorer:
    if name == "none":
        return NoQuality()
    from .pyiqa_metric import PyiqaQuality

    return PyiqaQuality(name, device=device)
