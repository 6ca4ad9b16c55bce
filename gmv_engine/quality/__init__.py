"""Quality scorers by name: `none` (q = 1) or a registered pyiqa no-reference metric (`maniqa`,
`piqe`, `musiq`, ...). Every scorer returns q in [0, 1], higher = better, whatever the metric's
own range and direction: see `normalise_score`. Each entry states its range and direction as
pyiqa's model card does (a test checks them against pyiqa); adding a pyiqa metric is one entry."""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from ..registry import Component, create


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


def _pyiqa(name: str, description: str, low: float, high: float, lower_better: bool, pretrained: bool) -> Component:
    def build(device: str) -> QualityScorer:
        from .pyiqa_metric import PyiqaQuality

        return PyiqaQuality(name, device=device, needs_pretrained_weights=pretrained)

    return Component(name, build, description, needs_pretrained_weights=pretrained,
                     facts={"range": (low, high), "lower_better": lower_better, "library": "pyiqa"})


REGISTRY = {
    "none": Component("none", lambda device: NoQuality(), "q = 1 for every generation",
                      facts={"range": (1.0, 1.0), "lower_better": False}),
    "piqe": _pyiqa("piqe", "PIQE, training-free", 0.0, 100.0, True, False),
    "niqe": _pyiqa("niqe", "NIQE, natural-scene statistics (parameter file fetched by pyiqa)", 0.0, 100.0, True, True),
    "brisque": _pyiqa("brisque", "BRISQUE, a fitted SVR (weights fetched by pyiqa)", 0.0, 150.0, True, True),
    "maniqa": _pyiqa("maniqa", "MANIQA (the paper's), pretrained", 0.0, 1.0, False, True),
    "musiq": _pyiqa("musiq", "MUSIQ (KonIQ), pretrained", 0.0, 100.0, False, True),
    "clipiqa": _pyiqa("clipiqa", "CLIP-IQA, pretrained", 0.0, 1.0, False, True),
}


def create_quality(name: str, device: str = "cpu") -> QualityScorer:
    return create(REGISTRY, "quality metric", name, device)
