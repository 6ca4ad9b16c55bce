"""Recall encoders by name. Each declares `dim`, `metric` and `needs_pretrained_weights`.

Adding an encoder is one module with a class that has `embed(images) -> (n, dim) float32`,
plus one entry in REGISTRY.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from ..registry import Component, create


class Encoder(Protocol):
    name: str
    dim: int
    metric: str
    needs_pretrained_weights: bool

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def _pixels(device: str) -> Encoder:
    from .pixels import PixelEncoder

    return PixelEncoder(device=device)


def _vgg16(device: str) -> Encoder:
    from .vgg16 import VGG16Encoder

    return VGG16Encoder(device=device)


REGISTRY = {
    "pixels": Component("pixels", _pixels, "16x16 RGB pixels in [0, 1], 768-d", facts={"dim": 768, "metric": "L2"}),
    "vgg16": Component("vgg16", _vgg16, "VGG-16 (ImageNet) conv features, average-pooled, 512-d",
                       needs_pretrained_weights=True, facts={"dim": 512, "metric": "L2"}),
}
ENCODERS = REGISTRY


def create_encoder(name: str, device: str = "cpu") -> Encoder:
    return create(REGISTRY, "encoder", name, device)
