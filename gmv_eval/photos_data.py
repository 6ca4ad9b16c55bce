"""A real-photo attribution set built with no download: crops of the photographs that
scikit-image and scikit-learn ship, each photo one contributor's, queried with augmented copies.

Each training image is a square crop of one photograph (its "source"); a generated image is a
training crop passed through one augmentation (flip, tighter crop, colour jitter, greyscale,
JPEG, rotation, blur, upscale). The right answer is known: credit should reach the crop it was
made from, and so its contributor. Neighbouring crops of one photograph overlap, which is what
makes the source (not just the contributor) hard to find.
"""
from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

# (package, name): scikit-image's bundled photographs (chelsea is cat under another name, so
# only one of them) and scikit-learn's two sample images. None needs a download.
PHOTOS = (
    "astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "page", "text", "retina", "clock", "grass", "gravel",
    "brick", "cell", "horse", "colorwheel", "logo", "china", "flower",
)
AUGMENTATIONS = ("flip", "crop", "colour", "greyscale", "jpeg", "rotation", "blur", "upscale")


@dataclass(frozen=True)
class PhotoSet:
    manifest: Path  # path,training_id,contributor_id,photo
    generated: Path  # path,generation_id,source_id,contributor_id,augmentation
    photos: tuple[str, ...]
    contributors: int
    training: int
    queries: int


def load_photo(name: str) -> Image.Image:
    """One bundled photograph as RGB."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        array = getattr(skimage.data, name)()
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    image = Image.fromarray(array)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    return image.convert("RGB")


def augment(image: Image.Image, kind: str, rng: random.Random) -> Image.Image:
    """`image` changed the way a generator's output may differ from a training image."""
    width, height = image.size
    if kind == "flip":
        return ImageOps.mirror(image)
    if kind == "crop":  # keep 70-90% of each side, at the original size
        keep = rng.uniform(0.7, 0.9)
        w, h = int(width * keep), int(height * keep)
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        return image.crop((x, y, x + w, y + h)).resize((width, height), Image.Resampling.BICUBIC)
    if kind == "colour":
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.75, 1.25))
        return ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    if kind == "greyscale":
        return ImageOps.grayscale(image).convert("RGB")
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=rng.randint(15, 50))
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "rotation":
        angle = rng.choice((-1, 1)) * rng.uniform(5, 15)
        return image.rotate(angle, resample=Image.Resampling.BILINEAR)
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(rng.uniform(1.0, 2.5)))
    if kind == "upscale":
        factor = rng.uniform(2.0, 3.0)
        return image.resize((int(width * factor), int(height * factor)), Image.Resampling.BICUBIC)
    raise ValueError(f"unknown augmentation '{kind}'; known: {', '.join(AUGMENTATIONS)}")


def build_photo_set(out: str | Path, photos: tuple[str, ...] = PHOTOS[:15], contributors: int = 5,
                    crops_per_photo: int = 13, queries: int = 600, side: int = 128,
                    crop_fraction: tuple[float, float] = (0.35, 0.6), seed: int = 0) -> PhotoSet:
    """Write the training crops, the augmented queries and their two CSVs under `out`."""
    out = Path(out)
    (out / "training").mkdir(parents=True, exist_ok=True)
    (out / "generated").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    training: list[dict] = []
    images: dict[str, Image.Image] = {}
    for p, name in enumerate(photos):
        photo = load_photo(name)
        contributor = f"contributor-{p % contributors}"
        width, height = photo.size
        for c in range(crops_per_photo):
            crop_side = int(min(width, height) * rng.uniform(*crop_fraction))
            x, y = rng.randint(0, width - crop_side), rng.randint(0, height - crop_side)
            crop = photo.crop((x, y, x + crop_side, y + crop_side)).resize((side, side), Image.Resampling.LANCZOS)
            training_id = f"{name}-{c:02d}"
            path = out / "training" / f"{training_id}.png"
            crop.save(path)
            images[training_id] = crop
            # Relative to the CSV's folder, which is how manifests resolve them.
            training.append({"path": str(path.relative_to(out)), "training_id": training_id, "contributor_id": contributor,
                             "photo": name})
    generated: list[dict] = []
    for q in range(queries):
        source = rng.choice(training)
        kind = AUGMENTATIONS[q % len(AUGMENTATIONS)]
        image = augment(images[source["training_id"]], kind, rng)
        generation_id = f"query-{q:04d}-{kind}"
        path = out / "generated" / f"{generation_id}.png"
        image.save(path)
        generated.append({"path": str(path.relative_to(out)), "generation_id": generation_id, "source_id": source["training_id"],
                          "contributor_id": source["contributor_id"], "augmentation": kind})
    manifest, generated_csv = out / "training.csv", out / "generated.csv"
    _write_csv(manifest, training)
    _write_csv(generated_csv, generated)
    return PhotoSet(manifest, generated_csv, tuple(photos), contributors, len(training), len(generated))


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
