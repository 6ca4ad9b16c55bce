"""The paper's four criteria as plain functions over attribution results (no Milvus, no models).

C1 identical class and C2 identical attributes: for each generation, the share of its top-k
credited training images whose label (class, or one attribute) equals the generation's,
averaged over generations.
C3 data cleansing: the data value phi_i = sum_j V(x_i, x̂_j) of every training image, and
where the corrupted ones fall in the ranking of values from the lowest up.
C4 efficiency: seconds per generated sample, end to end and per stage.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np


# -- C1 / C2 ------------------------------------------------------------------------------------
def identical_shares(ranked_labels: Sequence[Sequence[str | None]], own_labels: Sequence[str | None],
                     k: int) -> np.ndarray:
    """Per generation: the share of its first k credited training images whose label equals the
    generation's own. `ranked_labels[j]` lists the labels of generation j's credits in rank
    order (None: that training image has no such label, which never matches). Generations
    whose own label is None or empty are left out (NaN)."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(ranked_labels) != len(own_labels):
        raise ValueError(f"{len(ranked_labels)} ranked lists for {len(own_labels)} generations")
    shares = np.full(len(own_labels), np.nan)
    for j, (ranked, own) in enumerate(zip(ranked_labels, own_labels)):
        if own is None or own == "":
            continue
        if len(ranked) < k:
            raise ValueError(f"generation {j} has {len(ranked)} credited training images, fewer than k={k}")
        shares[j] = sum(label == own for label in ranked[:k]) / k
    return shares


def mean_identical_share(ranked_labels, own_labels, ks: Iterable[int]) -> dict[int, float]:
    """C1 (labels = classes) or C2 (labels = one attribute): the averaged share for each k."""
    out = {}
    for k in ks:
        shares = identical_shares(ranked_labels, own_labels, k)
        out[k] = float(np.nanmean(shares)) if np.any(~np.isnan(shares)) else float("nan")
    return out


def chance_share(training_labels: Iterable[str | None], own_labels: Sequence[str | None]) -> float:
    """What C1/C2 would give if each generation's top k were drawn at random from the training
    set: the mean, over labelled generations, of the share of training images with its label."""
    counts: dict = {}
    total = 0
    for label in training_labels:
        total += 1
        if label:
            counts[label] = counts.get(label, 0) + 1
    labelled = [own for own in own_labels if own]
    if not total or not labelled:
        return float("nan")
    return float(np.mean([counts.get(own, 0) / total for own in labelled]))


def topk_overlap(approximate: Sequence[Sequence[str]], exact: Sequence[Sequence[str]], k: int) -> float:
    """Mean share of exact search's top-k training ids that approximate search also returns in
    its top-k: how much IVF_PQ's lossy recall changes who gets credit."""
    if len(approximate) != len(exact):
        raise ValueError("both searches must rank the same generations")
    return float(np.mean([len(set(a[:k]) & set(e[:k])) / min(k, len(e)) for a, e in zip(approximate, exact)]))


# -- C3 -----------------------------------------------------------------------------------------
def data_values(attributions: Iterable[Iterable[tuple[str, float]]], training_ids: Iterable[str]) -> dict[str, float]:
    """phi_i: each training image's credit summed over all generations (0 if never credited).
    `attributions` yields, per generation, its (training_id, credit) pairs."""
    phi = dict.fromkeys(training_ids, 0.0)
    for credits in attributions:
        for training_id, credit in credits:
            if training_id not in phi:
                raise ValueError(f"credit for '{training_id}', which is not in the training set evaluated")
            phi[training_id] += float(credit)
    return phi


@dataclass
class CleansingResult:
    training_images: int
    corrupted: int
    bottom_fraction: float
    bottom_share: float  # expected share of corrupted images in the lowest `bottom_fraction` of the ranking
    zero_value_share: float  # share of corrupted images with phi = 0 (never in any generation's top k)
    zero_value_share_all: float  # the same over all training images
    mean_percentile: float  # mean position of corrupted images in the ranking, 0 = lowest value, 1 = highest
    auc: float  # P(a corrupted image has lower value than a clean one), ties counting one half
    mean_value_corrupted: float
    mean_value_clean: float
    curve_x: np.ndarray  # share of the ranking inspected from the lowest value up
    curve_y: np.ndarray  # expected share of the corrupted images found by then
    percentiles: np.ndarray  # each corrupted image's (mid-rank) percentile

    def found_at(self, inspected: float) -> float:
        return float(np.interp(inspected, self.curve_x, self.curve_y))


def cleansing(phi: Mapping[str, float], corrupted: Iterable[str], bottom_fraction: float = 0.1) -> CleansingResult:
    """Rank training images by value, lowest first, and see where the corrupted ones fall.

    Many images share a value (most often 0: in no generation's top k), so their order is
    arbitrary. Every figure here is its expectation over a random order within ties: inspecting
    m images of a tied group of n that holds c corrupted ones finds c*m/n of them on average.
    So the curve is exact and piecewise linear between the ends of tied groups, and a group
    straddling the decile boundary counts in proportion."""
    corrupted = set(corrupted)
    unknown = corrupted - set(phi)
    if unknown:
        raise ValueError(f"{len(unknown)} corrupted id(s) are not training images, e.g. {sorted(unknown)[0]}")
    if not corrupted:
        raise ValueError("no corrupted training images to look for")
    if not 0 < bottom_fraction <= 1:
        raise ValueError(f"bottom_fraction must lie in (0, 1], got {bottom_fraction}")
    ids = list(phi)
    values = np.array([phi[i] for i in ids], dtype=np.float64)
    is_corrupted = np.array([i in corrupted for i in ids])
    n, c = len(ids), int(is_corrupted.sum())
    unique, group, sizes = np.unique(values, return_inverse=True, return_counts=True)
    corrupted_per_group = np.bincount(group, weights=is_corrupted, minlength=len(unique))
    ends = np.cumsum(sizes)
    starts = ends - sizes
    curve_x = np.concatenate([[0.0], ends / n])
    curve_y = np.concatenate([[0.0], np.cumsum(corrupted_per_group) / c])
    # A tied group covering positions [s, s+n) puts each member at s + n/2 on average.
    percentiles = ((starts + sizes / 2.0) / n)[group[is_corrupted]]
    # Mann-Whitney: with mid-ranks, the corrupted images' rank sum counts each (corrupted,
    # clean) pair where the corrupted one is higher as 1 and a tie as 1/2.
    midranks = (starts + (sizes + 1) / 2.0)[group]
    higher = midranks[is_corrupted].sum() - c * (c + 1) / 2.0
    auc = 1.0 - higher / (c * (n - c)) if c < n else float("nan")
    return CleansingResult(
        training_images=n, corrupted=c, bottom_fraction=bottom_fraction,
        bottom_share=float(np.interp(bottom_fraction, curve_x, curve_y)),
        zero_value_share=float(np.mean(values[is_corrupted] == 0.0)),
        zero_value_share_all=float(np.mean(values == 0.0)),
        mean_percentile=float(percentiles.mean()), auc=float(auc),
        mean_value_corrupted=float(values[is_corrupted].mean()),
        mean_value_clean=float(values[~is_corrupted].mean()) if c < n else float("nan"),
        curve_x=curve_x, curve_y=curve_y, percentiles=percentiles,
    )


# -- C4 -----------------------------------------------------------------------------------------
@dataclass
class EfficiencyResult:
    samples: int  # generations timed one at a time end to end
    end_to_end_mean_s: float
    end_to_end_p50_s: float
    end_to_end_p95_s: float
    stage_mean_s: dict[str, float]  # seconds per generated sample in each pipeline stage, mean
    stage_p50_s: dict[str, float]  # ... and median (robust to a busy machine's spikes)
    pipeline_p50_s: float  # the stage medians summed
    outside_pipeline_p50_s: float  # end-to-end median minus that: RPC, serialisation, batching wait
    streamed_s: float | None  # seconds per sample when the generations stream through one call


def efficiency(latencies_s: Sequence[float], stage_samples: Sequence[Mapping[str, float]],
               stream_seconds: float | None = None, stream_samples: int = 0) -> EfficiencyResult:
    """Aggregate C4. `latencies_s`: one end-to-end time per generation (sequential calls);
    `stage_samples`: per generation, seconds in each stage (every dict names the same stages);
    `stream_seconds`: wall time of streaming `stream_samples` generations."""
    latencies = np.asarray(latencies_s, dtype=np.float64)
    if latencies.size == 0 or not stage_samples:
        raise ValueError("C4 needs at least one timed generation")
    stages = list(stage_samples[0])
    if any(set(sample) != set(stages) for sample in stage_samples):
        raise ValueError("every timed generation must report the same stages")
    table = np.array([[sample[stage] for stage in stages] for sample in stage_samples], dtype=np.float64)
    means, medians = table.mean(axis=0), np.median(table, axis=0)
    streamed = None
    if stream_seconds is not None:
        if stream_samples < 1:
            raise ValueError("a timed stream needs its number of generations")
        streamed = float(stream_seconds) / stream_samples
    p50 = float(np.percentile(latencies, 50))
    return EfficiencyResult(
        samples=int(latencies.size), end_to_end_mean_s=float(latencies.mean()), end_to_end_p50_s=p50,
        end_to_end_p95_s=float(np.percentile(latencies, 95)),
        stage_mean_s=dict(zip(stages, map(float, means))), stage_p50_s=dict(zip(stages, map(float, medians))),
        pipeline_p50_s=float(medians.sum()), outside_pipeline_p50_s=p50 - float(medians.sum()), streamed_s=streamed,
    )
