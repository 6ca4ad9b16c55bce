"""Profiles: which component does each stage of a new collection. A collection records the
encoder and re-ranker that built it; quality is per query and can differ."""
from __future__ import annotations

from dataclasses import dataclass

from .registry import spec


@dataclass(frozen=True)
class Profile:
    name: str
    encoder: str
    reranker: str
    quality: str
    description: str

    @property
    def components(self) -> dict[str, str]:
        return {"encoder": self.encoder, "reranker": self.reranker, "quality": self.quality}


REGISTRY = {
    "paper": Profile("paper", encoder="vgg16", reranker="dreamsim", quality="maniqa",
                     description="the paper's choices: VGG-16 recall, DreamSim re-rank, MANIQA quality (pretrained weights)"),
    "offline": Profile("offline", encoder="pixels", reranker="aligned_l2", quality="piqe",
                       description="no downloads: 16x16 pixel recall, aligned pixel ℓ2 re-rank (mirror, crop, "
                                   "rotation and colour tolerant), PIQE quality (training-free)"),
}
PROFILES = REGISTRY


def get_profile(name: str) -> Profile:
    return spec("profile", name)
