"""The evaluation's real data, made on the spot with no download.

- the training split of scikit-learn's digits (datasets.export_digits: 32x32 RGB PNGs, each
  digit's 8x8 pixels as 4x4 blocks), with two measured attributes per image for C2;
- generated images: samples of a class-conditional VAE trained on that split, each
  conditioned on a known class (C1, C2, C4);
- for C3, a copy of the split with a fraction of the images corrupted by Gaussian noise
  (same training ids), and samples of a second VAE trained on that corrupted copy, as the
  paper trains its generator on the noisy MNIST it then values.

The attributes are measured from pixels, the same way for training and generated images, and
relative to the median of the image's class in the training split, so that within each class
about half the images have each value: they are not implied by the class, and C2 then asks
something C1 does not ("thick strokes" and "leans right" for a digit of that class).
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from gmv_engine.datasets import digit_image, export_digits
from gmv_engine.ingest import read_manifest
from .cvae import ConditionalVAE

ATTRIBUTES = ("thickness", "slant")


@dataclass
class EvalData:
    root: Path
    manifest: Path  # clean training split: path,training_id,contributor_id,label,thickness,slant
    generated: Path  # path,generation_id,label,thickness,slant
    corrupted_manifest: Path  # the same training ids, some images corrupted
    corrupted_ids: Path  # one corrupted training_id per line
    corrupted_generated: Path  # path,generation_id,label: samples of the VAE trained on the corrupted copy
    facts: dict = field(default_factory=dict)  # how it was made, for the report


def read_8x8(path: Path) -> np.ndarray:
    """The 8x8 intensities in [0, 1] of a digit PNG (the centre pixel of each 4x4 block)."""
    gray = np.asarray(Image.open(path).convert("L"), dtype=np.float64) / 255.0
    step = gray.shape[0] // 8
    return gray[step // 2 :: step, step // 2 :: step]


def ink(image: np.ndarray) -> float:
    """Total intensity: how much stroke the digit has."""
    return float(image.sum())


def slant(image: np.ndarray) -> float:
    """How far the strokes lean right (positive) or left (negative): minus the intensity-weighted
    covariance of column and row over the row variance (x shifts right as y goes up)."""
    total = image.sum()
    if total <= 0:
        return 0.0
    rows, cols = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    mean_r, mean_c = (image * rows).sum() / total, (image * cols).sum() / total
    var_r = (image * (rows - mean_r) ** 2).sum() / total
    cov = (image * (rows - mean_r) * (cols - mean_c)).sum() / total
    return float(-cov / var_r) if var_r > 0 else 0.0


@dataclass(frozen=True)
class AttributeThresholds:
    """Per-class medians of the training split: an image's attribute is which side it falls."""

    ink: dict[int, float]
    slant: dict[int, float]

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray) -> "AttributeThresholds":
        classes = sorted(set(int(c) for c in labels))
        return cls(
            ink={c: float(np.median([ink(im) for im in images[labels == c]])) for c in classes},
            slant={c: float(np.median([slant(im) for im in images[labels == c]])) for c in classes},
        )

    def attributes(self, image: np.ndarray, label: int) -> dict[str, str]:
        return {
            "thickness": "thick" if ink(image) > self.ink[label] else "thin",
            "slant": "right" if slant(image) > self.slant[label] else "left",
        }


def _render(image_01: np.ndarray) -> Image.Image:
    return digit_image(np.asarray(image_01).reshape(8, 8) * 16.0)


def _relative(path: Path, root: Path) -> str:
    # Manifests resolve relative paths against their own folder: keep the work folder movable.
    return path.resolve().relative_to(root.resolve()).as_posix()


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _sample_set(model: ConditionalVAE, root: Path, folder: str, per_class: int, classes: list[int], seed: int,
                thresholds: AttributeThresholds | None) -> tuple[Path, np.ndarray, np.ndarray]:
    labels = np.repeat(np.array(classes), per_class)
    samples = model.sample(labels, seed=seed)
    rows, written = [], []
    for i, (label, sample) in enumerate(zip(labels, samples)):
        relative = Path(folder) / f"class-{label}" / f"gen-{label}-{i % per_class:03d}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        _render(sample).save(root / relative)
        pixels = read_8x8(root / relative)  # the image as written (quantised), as GMV will see it
        written.append(pixels)
        extra = thresholds.attributes(pixels, int(label)) if thresholds else {}
        rows.append([relative.as_posix(), f"{folder}-{label}-{i % per_class:03d}", int(label),
                     *[extra[a] for a in ATTRIBUTES if thresholds]])
    csv_path = root / f"{folder}.csv"
    _write_csv(csv_path, ["path", "generation_id", "label", *(ATTRIBUTES if thresholds else ())], rows)
    return csv_path, np.stack(written), labels


def make_digits_eval_data(root: str | Path, per_class: int = 100, corrupt_fraction: float = 0.1,
                          noise_sigma: float = 0.3, epochs: int = 150, seed: int = 0) -> EvalData:
    """Write everything the digits evaluation needs under `root`; the same for the same seed."""
    from sklearn.linear_model import LogisticRegression

    root = Path(root)
    export = export_digits(root / "digits", seed=seed)
    rows = read_manifest(export.manifest)
    images = np.stack([read_8x8(row.path) for row in rows])
    labels = np.array([int(row.metadata["label"]) for row in rows])
    classes = sorted(set(labels.tolist()))
    thresholds = AttributeThresholds.fit(images, labels)

    manifest = root / "train.csv"
    _write_csv(manifest, ["path", "training_id", "contributor_id", "label", *ATTRIBUTES], [
        [_relative(row.path, root), row.training_id, row.contributor_id, int(label),
         *thresholds.attributes(image, int(label)).values()]
        for row, image, label in zip(rows, images, labels)
    ])

    rng = np.random.default_rng(seed)
    corrupted = np.zeros(len(rows), dtype=bool)
    corrupted[rng.choice(len(rows), size=int(round(corrupt_fraction * len(rows))), replace=False)] = True
    noisy = images.copy()
    noisy[corrupted] = np.clip(images[corrupted] + rng.normal(0.0, noise_sigma, images[corrupted].shape), 0.0, 1.0)
    corrupted_rows = []
    for row, image, label, is_corrupted in zip(rows, noisy, labels, corrupted):
        if is_corrupted:
            relative = Path("train_corrupted") / row.path.parent.name / row.path.name
            (root / relative).parent.mkdir(parents=True, exist_ok=True)
            _render(image).save(root / relative)
            path = relative.as_posix()
        else:
            path = _relative(row.path, root)  # unchanged images are the same files
        corrupted_rows.append([path, row.training_id, row.contributor_id, int(label)])
    corrupted_manifest = root / "train_corrupted.csv"
    _write_csv(corrupted_manifest, ["path", "training_id", "contributor_id", "label"], corrupted_rows)
    corrupted_ids = root / "corrupted_ids.txt"
    corrupted_ids.write_text("".join(f"{row.training_id}\n" for row, c in zip(rows, corrupted) if c))
    noisy_written = np.stack([read_8x8(root / r[0]) for r in corrupted_rows])

    # A classifier fitted on the clean split says whether the generator honours its condition.
    classifier = LogisticRegression(max_iter=3000).fit(images.reshape(len(images), -1), labels)
    facts: dict = {"training_images": len(rows), "classes": len(classes), "per_class": per_class,
                   "corrupted": int(corrupted.sum()), "corrupt_fraction": corrupt_fraction,
                   "noise_sigma": noise_sigma, "seed": seed}
    made = {}
    for name, data, folder, attrs in (("clean", images, "generated", thresholds),
                                       ("corrupted", noisy_written, "generated_c3", None)):
        model = ConditionalVAE(seed=seed)
        log = model.fit(data.reshape(len(data), -1), labels, epochs=epochs, seed=seed)
        csv_path, samples, sample_labels = _sample_set(model, root, folder, per_class, classes, seed + 1, attrs)
        agreement = float((classifier.predict(samples.reshape(len(samples), -1)) == sample_labels).mean())
        facts[f"cvae_{name}"] = {**asdict(log), "samples": len(samples), "classifier_agreement": agreement}
        made[name] = csv_path
    return EvalData(root, manifest, made["clean"], corrupted_manifest, corrupted_ids, made["corrupted"], facts)
