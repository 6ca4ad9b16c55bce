"""Re-rankers by name. Each declares `feature_dim` (what ingest stores per training image;
0 = nothing) and `needs_pretrained_weights`, and offers

    features(images) -> (n, feature_dim)                  at ingest, for training images
    distances(queries, candidate_features) -> [(K',), ...] at query time; lower = closer
    feature_distances(query_features, candidate_features)  the same from features(queries):
                                                          what calibrates a collection's temperature

`none` keeps the recall order and distances (the paper's "no re-rank" variant).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from ..registry import Component, create


class Reranker(Protocol):
    name: str
    feature_dim: int
    needs_pretrained_weights: bool

    def features(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def distances(self, queries: Sequence[Image.Image], candidates: Sequence[np.ndarray]) -> list[np.ndarray]: ...

    def feature_distances(self, query_features: np.ndarray, candidates: Sequence[np.ndarray]) -> list[np.ndarray]: ...


class NoReranker:
    """Keep the recall distances: no stored feature, no extra work."""

    name = "none"
    feature_dim = 0
    needs_pretrained_weights = False

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.zeros((len(images), 0), dtype=np.float32)

    def distances(self, queries, candidates):
        raise RuntimeError("the 'none' re-ranker uses the recall distances; the pipeline never calls this")

    feature_distances = distances


def _none(device: str) -> Reranker:
    return NoReranker()


def _l2(device: str) -> Reranker:
    from .pixel_l2 import PixelL2Reranker

    return PixelL2Reranker(device=device)


def _aligned_l2(device: str) -> Reranker:
    from .aligned_l2 import AlignedL2Reranker

    return AlignedL2Reranker(device=device)


def _lpips(device: str) -> Reranker:
    from .lpips_distance import LpipsReranker

    return LpipsReranker(device=device)


def _dreamsim(device: str) -> Reranker:
    from .embedding_cosine import dreamsim_reranker

    return dreamsim_reranker(device=device)


# facts: `measures` is "distance" (lower = closer) for every re-ranker; `stored` is what ingest
# keeps per training image for it.
REGISTRY = {
    "none": Component("none", _none, "keep the recall order and distances (the paper's no-re-rank variant)",
                      facts={"measures": "distance", "stored": "nothing", "feature_dim": 0}),
    "l2": Component("l2", _l2, "RMS pixel ℓ2 at 32x32",
                    facts={"measures": "distance", "stored": "32x32 RGB pixels", "feature_dim": 3072}),
    "aligned_l2": Component("aligned_l2", _aligned_l2,
                            "RMS pixel ℓ2 at 16x16 after the best of 168 alignments (mirror, windows of 90/80/70%, ±8°), "
                            "mean colour removed; greyscale queries compared in luminance",
                            facts={"measures": "distance", "stored": "32x32 RGB pixels", "feature_dim": 3072}),
    "lpips": Component("lpips", _lpips, "LPIPS (AlexNet) at 64x64", needs_pretrained_weights=True,
                       facts={"measures": "distance", "stored": "64x64 RGB pixels", "feature_dim": 12288}),
    "dreamsim": Component("dreamsim", _dreamsim, "DreamSim (ensemble): cosine distance of stored embeddings",
                          needs_pretrained_weights=True,
                          facts={"measures": "distance", "stored": "DreamSim embedding", "feature_dim": 1792}),
}
RERANKERS = REGISTRY


def create_reranker(name: str, device: str = "cpu") -> Reranker:
    return create(REGISTRY, "re-ranker", name, device)
