"""LPIPS as the re-rank distance. LPIPS compares pixels, so the stored feature is the
training image itself at `side` x `side` (in LPIPS' [-1, 1] range)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..encoders.pixels import pixel_vector
from ..models import load_pretrained


class LpipsReranker:
    name = "lpips"
    needs_pretrained_weights = True

    def __init__(self, device: str = "cpu", side: int = 64, net: str = "alex", backbone_pretrained: bool = True):
        """`backbone_pretrained=False` builds a random backbone: for tests of the code path only."""
        import lpips
        import torch

        self._torch = torch
        self.device = device
        self.side = side
        self.feature_dim = side * side * 3
        self.model = load_pretrained(
            "lpips", lambda: lpips.LPIPS(net=net, pnet_rand=not backbone_pretrained, verbose=False)
        ).eval().to(device)

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([pixel_vector(image, self.side) * 2.0 - 1.0 for image in images]).astype(np.float32)

    def _as_images(self, flat: np.ndarray):
        # pixel_vector flattens H x W x C; LPIPS wants N x C x H x W.
        tensor = self._torch.from_numpy(np.ascontiguousarray(flat)).to(self.device)
        return tensor.view(-1, self.side, self.side, 3).permute(0, 3, 1, 2)

    def distances(self, queries: Sequence[Image.Image], candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.feature_distances(self.features(queries), candidates)

    def feature_distances(self, query_features: np.ndarray, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        out = []
        with self._torch.inference_mode():
            for query, stored in zip(query_features, candidates):
                stored_images = self._as_images(stored)
                query_image = self._as_images(query).expand_as(stored_images)
                out.append(self.model(query_image, stored_images).reshape(-1).float().cpu().numpy())
        return out
