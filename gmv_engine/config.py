"""Profiles and pipeline settings, with their defaults written down in one place."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    """Which component does each stage. A collection records the encoder and re-ranker that
    built it; quality is per query and can differ."""

    name: str
    encoder: str
    reranker: str
    quality: str
    description: str


PROFILES = {
    "paper": Profile("paper", encoder="vgg16", reranker="dreamsim", quality="maniqa",
                     description="the paper's choices: VGG-16 recall, DreamSim re-rank, MANIQA quality (pretrained weights)"),
    "offline": Profile("offline", encoder="pixels", reranker="l2", quality="piqe",
                       description="no downloads: 16x16 pixel recall, pixel ℓ2 re-rank, PIQE quality (training-free)"),
}
DEFAULT_PROFILE = "paper"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile '{name}'; choose one of {sorted(PROFILES)}") from None


@dataclass(frozen=True)
class PipelineSettings:
    recall_k: int = 100  # K': candidates recalled from Milvus per generated image
    top_k: int = 10  # k: training images kept after re-ranking; all others get zero credit
    nprobe: int = 32  # IVF lists Milvus visits per query
    temperature: float = 1.0  # T in exp(-d/T); the paper's formula is T = 1
    reranker: str | None = None  # None: the collection's re-ranker
    quality: str | None = None  # None: the profile's quality metric
    batch_size: int = 32  # images per model batch

    def check(self) -> None:
        from .errors import InvalidArgumentError

        if not 1 <= self.top_k <= self.recall_k:
            raise InvalidArgumentError(f"top_k must be between 1 and recall_k={self.recall_k}, got {self.top_k}")
        if not 1 <= self.recall_k <= 16384:
            raise InvalidArgumentError(f"recall_k must be between 1 and 16384 (Milvus' limit), got {self.recall_k}")
        if self.nprobe < 1:
            raise InvalidArgumentError(f"nprobe must be at least 1, got {self.nprobe}")
        if not self.temperature > 0:
            raise InvalidArgumentError(f"temperature must be > 0, got {self.temperature}")
