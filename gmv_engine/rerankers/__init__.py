"""Re-rankers by name. Each declares `feature_dim` (what ingest stores per training image;
0 = nothing) and `needs_pretrained_weights`, and offers

    features(images) -> (n, feature_dim)                  at ingest, for training images
    distances(queries, candidate_features) -> [(K',), ...] at query time; lower = closer

`none` keeps the recall order and distances (the paper's "no re-rank" variant).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from ..registry import create


class Reranker(Protocol):
    name: str
    feature_dim: int
    needs_pretrained_weights: bool

    def features(self, images: Sequence[Image.Image]) -> np.ndarray: ...

    def distances(self, queries: Sequence[Image.Image], candidates: Sequence[np.ndarray]) -> list[np.ndarray]: ...


class NoReranker:
    """Keep the recall distances: no stored feature, no extra work."""

    name = "none"
    feature_dim = 0
    needs_pretrained_weights = False

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.zeros((len(images), 0), dtype=np.float32)

    def distances(self, queries, candidates):
        raise RuntimeError("the 'none' re-ranker uses the recall distances; the pipeline never calls this")


def _none(device: str) -> Reranker:
    return NoReranker()


def _l2(device: str) -> Reranker:
    from .pixel_l2 import PixelL2Reranker

    return PixelL2Reranker(device=device)


def _lpips(device: str) -> Reranker:
    from .lpips_distance import LpipsReranker

    return LpipsReranker(device=device)


def _dreamsim(device: str) -> Reranker:
    from .embedding_cosine import dreamsim_reranker

    return dreamsim_reranker(device=device)


RERANKERS = {"none": _none, "l2": _l2, "lpips": _lpips, "dreamsim": _dreamsim}


def create_reranker(name: str, device: str = "cpu") -> Reranker:
    return create(RERANKERS, "re-ranker", name, device)
