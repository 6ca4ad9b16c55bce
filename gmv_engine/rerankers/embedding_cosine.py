"""Cosine distance between embeddings: how DreamSim measures perceptual distance.

DreamSim's distance is 1 - cos(embed(a), embed(b)), so the training side's embeddings are
computed once at ingest and stored; at query time one embedding per generated image and a
few hundred dot products replace the paper's per-pair network passes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from PIL import Image

EmbedFn = Callable[[Sequence[Image.Image]], np.ndarray]


class EmbeddingCosineReranker:
    needs_pretrained_weights = True

    def __init__(self, name: str, embed: EmbedFn, feature_dim: int):
        self.name = name
        self.embed = embed
        self.feature_dim = feature_dim

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return _unit(self.embed(images))

    def distances(self, queries: Sequence[Image.Image], candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.feature_distances(self.features(queries), candidates)

    def feature_distances(self, query_features: np.ndarray, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [1.0 - _unit(stored) @ query for query, stored in zip(query_features, candidates)]


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def dreamsim_reranker(device: str = "cpu", dreamsim_type: str = "ensemble") -> EmbeddingCosineReranker:
    """The paper's best re-ranker, with DreamSim's pretrained weights (never random ones)."""
    import torch
    from dreamsim import dreamsim

    from ..models import dreamsim_cache_dir, load_pretrained

    model, preprocess = load_pretrained(
        "dreamsim",
        lambda: dreamsim(pretrained=True, device=device, cache_dir=dreamsim_cache_dir(), dreamsim_type=dreamsim_type),
    )

    def embed(images: Sequence[Image.Image]) -> np.ndarray:
        batch = torch.cat([preprocess(image) for image in images]).to(device)
        with torch.inference_mode():
            return model.embed(batch).float().cpu().numpy()

    probe = embed([Image.new("RGB", (224, 224))])
    return EmbeddingCosineReranker("dreamsim", embed, probe.shape[1])
