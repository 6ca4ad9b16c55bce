"""Any pyiqa no-reference metric as the quality q_j (the paper uses MANIQA)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..models import load_pretrained
from . import normalise_score


def metric_facts(name: str) -> tuple[float, float, bool]:
    """(low, high, lower_better) from pyiqa's own model card for `name`."""
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    if name not in DEFAULT_CONFIGS:
        raise ValueError(f"unknown quality metric '{name}': not a pyiqa metric (see pyiqa.list_models())")
    card = DEFAULT_CONFIGS[name]
    if card.get("metric_mode") != "NR":
        raise ValueError(f"pyiqa metric '{name}' needs a reference image; quality needs a no-reference (NR) metric")
    low, high = (float(part.strip().lstrip("~")) for part in card["score_range"].split(","))
    return low, high, bool(card.get("lower_better", False))


class PyiqaQuality:
    def __init__(self, name: str, device: str = "cpu", needs_pretrained_weights: bool = True):
        import pyiqa
        import torch

        self.name = name
        self.low, self.high, self.lower_better = metric_facts(name)
        self.metric = load_pretrained(name, lambda: pyiqa.create_metric(name, device=device, as_loss=False))
        self.needs_pretrained_weights = needs_pretrained_weights
        self.device = device
        self._torch = torch

    def raw_scores(self, images: Sequence[Image.Image]) -> np.ndarray:
        torch = self._torch
        scores = np.empty(len(images), dtype=np.float64)
        # pyiqa takes N x 3 x H x W in [0, 1]; images of one size go through in one batch.
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, image in enumerate(images):
            by_size.setdefault(image.size, []).append(i)
        with torch.inference_mode():
            for indices in by_size.values():
                batch = torch.stack(
                    [torch.from_numpy(np.asarray(images[i].convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
                     for i in indices]
                ).to(self.device)
                scores[indices] = self.metric(batch).reshape(-1).float().cpu().numpy()
        return scores

    def score(self, images: Sequence[Image.Image]) -> np.ndarray:
        return normalise_score(self.raw_scores(images), self.low, self.high, self.lower_better)
