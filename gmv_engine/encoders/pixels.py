"""Downsampled pixels as the recall embedding: needs no weights, so it runs anywhere."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image


class PixelEncoder:
    """Resize to side x side RGB, scale to [0, 1], flatten. ℓ2 between these is pixel-space ℓ2."""

    name = "pixels"
    needs_pretrained_weights = False
    metric = "L2"

    def __init__(self, side: int = 16, device: str = "cpu"):
        self.side = side
        self.dim = side * side * 3

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([pixel_vector(image, self.side) for image in images]).astype(np.float32)


def pixel_vector(image: Image.Image, side: int) -> np.ndarray:
    resized = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR, reducing_gap=None)
    return (np.asarray(resized, dtype=np.float32) / 255.0).reshape(-1)
