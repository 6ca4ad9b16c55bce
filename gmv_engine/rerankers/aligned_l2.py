"""Pixel ℓ2 after alignment: the offline profile's re-ranker, robust to what generators and
editors do to an image (mirroring, cropping, small rotations, colour and greyscale).

The stored feature is the same as the `l2` re-ranker's (the training image at 32x32 RGB in
[0, 1]), so a collection built for either works with either. The distance is

    d(q, c) = min over transforms t of RMS over the overlap of (c - mean) - (warp_t(q) - mean)

at 16x16: the query is warped into the candidate's frame by each of a fixed set of similarity
transforms (mirror or not; the whole frame, or a window of 90, 80 or 70% of its side at 9
positions, as a tighter crop shows; rotated 0 or ±8 degrees: 168 in all), compared only where the warped query has pixels,
after removing each side's mean colour per channel there (brightness and tint changes). A
greyscale query is compared with the candidates' luminance. Plain `l2` stays the paper's re-rank;
docs/EVALUATION.md measures what alignment buys on real photographs.
"""
from __future__ import annotations

import functools
import itertools
from typing import Sequence

import numpy as np
import scipy.sparse
from PIL import Image

from ..encoders.pixels import pixel_vector

STORED_SIDE = 32  # what ingest stores: the same feature as the `l2` re-ranker's
COMPARE_SIDE = 16  # where the comparison happens: 2x2-pooled, so small shifts and blur matter less
MIRRORS = (False, True)
WINDOWS = (1.0, 0.9, 0.8, 0.7)  # part of the candidate's side the query may show (a tighter crop)
WINDOW_POSITIONS = 3  # per axis, for windows under 1.0
ROTATIONS_DEG = (0.0, -8.0, 8.0)
GREY_TOLERANCE = 0.02  # a query whose channels differ by less than this everywhere is greyscale
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's "L"


def similarity_transforms() -> list[tuple[bool, float, float, float, float]]:
    """(mirror, window, x offset, y offset, rotation) of each alignment tried."""
    out = []
    for mirror, window in itertools.product(MIRRORS, WINDOWS):
        margin = (1.0 - window) / 2
        offsets = [0.0] if window == 1.0 else list(np.linspace(-margin, margin, WINDOW_POSITIONS))
        for dx, dy, angle in itertools.product(offsets, offsets, ROTATIONS_DEG):
            out.append((mirror, window, dx, dy, angle))
    return out


def _warp_sampler(transform, side_out: int, side_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear sampling of a side_in² query at each of side_out² candidate pixels: indices
    (P, 4), weights (P, 4) and where the query has pixels at all (P,)."""
    mirror, window, dx, dy, angle = transform
    grid = (np.arange(side_out) + 0.5) / side_out - 0.5  # pixel centres in [-0.5, 0.5]
    x, y = np.meshgrid(grid, grid)
    u, v = (x - dx) / window, (y - dy) / window
    theta = np.deg2rad(angle)
    qx = np.cos(theta) * u - np.sin(theta) * v
    qy = np.sin(theta) * u + np.cos(theta) * v
    if mirror:
        qx = -qx
    inside = (np.abs(qx) <= 0.5) & (np.abs(qy) <= 0.5)
    px = np.clip((qx + 0.5) * side_in - 0.5, 0, side_in - 1)
    py = np.clip((qy + 0.5) * side_in - 0.5, 0, side_in - 1)
    x0, y0 = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, side_in - 1), np.minimum(y0 + 1, side_in - 1)
    wx, wy = px - x0, py - y0
    index = np.stack([y0 * side_in + x0, y0 * side_in + x1, y1 * side_in + x0, y1 * side_in + x1], -1)
    weight = np.stack([(1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy], -1)
    return index.reshape(-1, 4), weight.reshape(-1, 4).astype(np.float32), inside.reshape(-1)


class AlignedL2Reranker:
    name = "aligned_l2"
    needs_pretrained_weights = False

    def __init__(self, device: str = "cpu"):
        self.side = STORED_SIDE
        self.feature_dim = STORED_SIDE * STORED_SIDE * 3
        samplers = [_warp_sampler(t, COMPARE_SIDE, STORED_SIDE) for t in similarity_transforms()]
        index = np.stack([s[0] for s in samplers])  # (T, P, 4)
        weight = np.stack([s[1] for s in samplers])  # (T, P, 4)
        self._transforms, self._points = index.shape[:2]
        # All warps as one sparse (T*P, side_in²) matrix, 4 weights a row: one sparse product
        # warps every query of a batch (a gather of the same 4 pixels cost 13x more CPU).
        self._warp = scipy.sparse.csr_matrix(
            (weight.reshape(-1), (np.repeat(np.arange(index.shape[0] * index.shape[1]), 4), index.reshape(-1))),
            shape=(index.shape[0] * index.shape[1], STORED_SIDE * STORED_SIDE))
        self._mask = np.stack([s[2] for s in samplers]).astype(np.float32)  # (T, P)
        self._overlap = self._mask.sum(1)  # (T,) pixels compared per transform
        # The warped query's mean colour over each transform's overlap, as one more product.
        summing = scipy.sparse.csr_matrix(
            ((self._mask / self._overlap[:, None]).reshape(-1),
             (np.repeat(np.arange(self._transforms), self._points), np.arange(self._transforms * self._points))),
            shape=(self._transforms, self._transforms * self._points))
        self._mean_warp = (summing @ self._warp).tocsr()  # (T, side_in²)

    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([pixel_vector(image, self.side) for image in images]).astype(np.float32)

    def distances(self, queries: Sequence[Image.Image], candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.feature_distances(self.features(queries), candidates)

    def feature_distances(self, query_features: np.ndarray, candidates: Sequence[np.ndarray]) -> list[np.ndarray]:
        # These products are small (100 x 768 by 768 x 60): a multi-threaded BLAS spends more
        # time waking its threads than computing, 8 ms against 0.1 ms when the cores are busy.
        if not len(query_features):
            return []
        with _blas_controller().limit(limits=1, user_api="blas"):
            queries = np.asarray(query_features, dtype=np.float32).reshape(len(query_features), -1, 3)
            # (T*P, side²) @ (side², B*3): every query warped by every transform at once.
            warped = (self._warp @ queries.transpose(1, 0, 2).reshape(queries.shape[1], -1)).astype(np.float32)
            warped = warped.reshape(self._transforms, self._points, len(queries), 3).transpose(2, 0, 1, 3)
            means = (self._mean_warp @ queries.transpose(1, 0, 2).reshape(queries.shape[1], -1)).astype(np.float32)
            means = means.reshape(self._transforms, len(queries), 3).transpose(1, 0, 2)
            return [self._distance(pixels, each, mean, stored)
                    for pixels, each, mean, stored in zip(queries, warped, means, candidates)]

    def _distance(self, pixels: np.ndarray, warped: np.ndarray, warped_mean: np.ndarray,
                  stored: np.ndarray) -> np.ndarray:
        """pixels: the query (side², 3); warped: it under every transform (T, P, 3);
        warped_mean: its mean colour over each transform's overlap (T, 3)."""
        if len(stored) == 0:
            return np.zeros(0, dtype=np.float32)
        pooled = _pool(np.asarray(stored, dtype=np.float32), STORED_SIDE, COMPARE_SIDE)  # (N, P, 3)
        if np.abs(pixels - pixels.mean(1, keepdims=True)).max() < GREY_TOLERANCE:
            warped = np.repeat((warped @ LUMINANCE)[..., None], 3, -1)
            warped_mean = np.repeat((warped_mean @ LUMINANCE)[..., None], 3, -1)
            pooled = np.repeat((pooled @ LUMINANCE)[..., None], 3, -1)
        mask, overlap = self._mask, self._overlap
        # Each side minus its own mean colour over the overlap; expanded so that all transforms
        # and candidates are three matrix products: sum m(c - c̄ - (w - w̄))² =
        # sum m c² - n|c̄|² - 2 sum m c (w - w̄) + sum m (w - w̄)²   (w - w̄ is 0 off the overlap).
        centred = (warped - warped_mean[:, None, :]) * mask[..., None]  # (T, P, 3)
        candidate_sums = (pooled.transpose(0, 2, 1).reshape(-1, mask.shape[1]) @ mask.T).reshape(
            len(pooled), 3, -1)  # (N, 3, T), as one product
        squares = (pooled ** 2).sum(2) @ mask.T  # (N, T)
        cross = pooled.reshape(len(pooled), -1) @ centred.reshape(len(centred), -1).T  # (N, T)
        squared = (squares - (candidate_sums ** 2).sum(1) / overlap[None, :] - 2 * cross
                   + (centred ** 2).sum((1, 2))[None, :])
        rms = np.sqrt(np.maximum(squared, 0.0) / (3 * overlap[None, :]))
        return rms.min(1)


@functools.lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _pool(features: np.ndarray, side_in: int, side_out: int) -> np.ndarray:
    """(N, side_in²·3) flattened H x W x C -> (N, side_out², 3) by block averaging (a sum of
    strided views: several times faster than .mean over the reshaped axes)."""
    k = side_in // side_out
    blocks = features.reshape(-1, side_out, k, side_out, k, 3)
    total = sum(blocks[:, :, i, :, j] for i in range(k) for j in range(k))
    return (total / (k * k)).reshape(len(features), -1, 3)
