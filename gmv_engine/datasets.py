"""Real labelled images that ship inside a package: scikit-learn's digits (UCI, 1,797 8x8
images of 10 classes), written out as 32x32 RGB PNGs for the demo, tests and benchmarks.

Upscaling is nearest-neighbour: it keeps the digits' real pixels as crisp blocks. (Smooth
upscaling makes PIQE, a blind metric for natural photos, rate them at its worst score.)
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 32


@dataclass
class DigitsExport:
    root: Path
    manifest: Path  # training split: path,training_id,contributor_id,label
    heldout: Path  # held-out split: path,generation_id,label
    train_count: int
    heldout_count: int


def digit_image(pixels_8x8: np.ndarray, side: int = SIDE) -> Image.Image:
    gray = Image.fromarray((pixels_8x8 * (255.0 / 16.0)).round().astype(np.uint8))
    return gray.resize((side, side), Image.Resampling.NEAREST).convert("RGB")


def export_digits(root: str | Path, heldout_fraction: float = 0.1, seed: int = 0) -> DigitsExport:
    """Write the digits as PNGs: train/digit-K/NNNN.png (contributor = the class folder) and
    heldout/NNNN.png, with CSV manifests. A stratified split, the same for the same seed."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        from .errors import GMVError

        raise GMVError("the digits data set needs scikit-learn: pip install -e '.[eval]'") from None

    root = Path(root)
    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, heldout_idx = train_test_split(
        indices, test_size=heldout_fraction, random_state=seed, stratify=digits.target
    )
    manifest, heldout = root / "train.csv", root / "heldout.csv"
    (root / "heldout").mkdir(parents=True, exist_ok=True)
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "training_id", "contributor_id", "label"])
        for i in sorted(train_idx):
            label = int(digits.target[i])
            relative = Path("train") / f"digit-{label}" / f"{i:04d}.png"
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            digit_image(digits.images[i]).save(root / relative)
            writer.writerow([relative.as_posix(), f"digits-{i:04d}", f"digit-{label}", label])
    with heldout.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "generation_id", "label"])
        for i in sorted(heldout_idx):
            label = int(digits.target[i])
            relative = Path("heldout") / f"{i:04d}.png"
            digit_image(digits.images[i]).save(root / relative)
            writer.writerow([relative.as_posix(), f"{i:04d}", label])
    return DigitsExport(root, manifest, heldout, len(train_idx), len(heldout_idx))


def read_heldout(path: str | Path) -> list[tuple[Path, str, int]]:
    path = Path(path)
    with path.open(newline="") as handle:
        return [(path.parent / r["path"], r["generation_id"], int(r["label"])) for r in csv.DictReader(handle)]
