"""ℓ2 in pixel space: the paper's plain re-rank, needing no weights.

The stored feature is the training image at `side` x `side` RGB in [0, 1]. The distance is
the root-mean-square pixel difference, ||a - b||_2 / sqrt(D): plain ℓ2 scaled so it lies in
[0, 1] whatever the resolution, which keeps the credit temperature meaningful.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..encoders.pixels import pixel_vector


class PixelL2Reranker:
    name = "l2"
    needs_pretrained_weights = False

    def __init__(self, side: int = 32, device: str = "cpu"):
        self.side = side
        self.feature_dim = side * side * 3

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([pixel_vector(image, self.side) for image in images]).astype(np.float32)

    def distances(self, queries: Sequence[Image.Image], candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.feature_distances(self.features(queries), candidates)

    def feature_distances(self, query_features: np.ndarray, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        scale = np.sqrt(self.feature_dim)
        return [
            np.linalg.norm(stored - query[None, :], axis=1) / scale
            for query, stored in zip(query_features, candidates)
        ]
