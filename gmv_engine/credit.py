"""Credit: the GMValuator value function (MISSION.md, step 4).

For a generation j with kept set P_j (the top k after re-ranking) and quality q_j:

    V(x_i, x̂_j) = q_j * exp(-d_ij / T) / sum_{x_k in P_j} exp(-d_kj / T)   for x_i in P_j

and 0 for every other training image. T is a temperature (the paper uses T = 1).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


@dataclass(frozen=True)
class Credit:
    """One kept training image's share of a generation's credit: the one shape of a credit in
    GMV (engine, ledger and CLI); the gRPC and client types are converted at the edges."""

    rank: int  # 1 = the closest
    training_id: str
    contributor_id: str
    credit: float
    distance: float  # the re-ranker's d, lower = closer


@dataclass(frozen=True)
class Attribution:
    """A generation's attribution: its quality q and its credits in rank order (summing to q)."""

    quality: float
    credits: tuple[Credit, ...]

    @property
    def contributors(self) -> list[tuple[str, float]]:
        """Per-contributor sums, largest first."""
        return sum_by_contributor((c.contributor_id for c in self.credits), (c.credit for c in self.credits))


def credits_from_distances(distances: Sequence[float], quality: float, temperature: float = 1.0) -> np.ndarray:
    """Credits for the kept training images of one generation, in the order given.

    A softmax of -d/T scaled by q. Shifting by the smallest distance keeps exp() from
    underflowing to 0/0 when distances are large (or T small): the ratio is unchanged.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= quality <= 1.0:
        raise ValueError(f"quality must lie in [0, 1], got {quality}")
    d = np.asarray(distances, dtype=np.float64)
    if d.size == 0:
        return d
    if not np.all(np.isfinite(d)):
        raise ValueError("distances must be finite")
    logits = -(d - d.min()) / temperature
    weights = np.exp(logits)
    return quality * weights / weights.sum()


def sum_by_contributor(contributor_ids: Iterable[str], credits: Iterable[float]) -> list[tuple[str, float]]:
    """Per-contributor totals, largest first (ties by id so the order is stable)."""
    totals: dict[str, float] = defaultdict(float)
    for contributor, credit in zip(contributor_ids, credits):
        totals[contributor] += float(credit)
    return sorted(totals.items(), key=lambda item: (-item[1], item[0]))
