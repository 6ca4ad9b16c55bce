"""Decode: image bytes or files -> RGB PIL images, with limits on bytes and pixels.

Generated images arrive from callers we do not control, so every decode is bounded:
a byte limit before decoding, a pixel limit read from the header before the pixels
are decompressed (a decompression bomb is a tiny file with a huge header size).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidImageError
from .settings import DEFAULTS, Settings

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    min_side: int  # PIQE and the encoders need a few pixels to work with

    @classmethod
    def from_settings(cls, settings: Settings) -> "ImageLimits":
        return cls(settings.max_image_bytes, settings.max_image_pixels, settings.min_image_side)


DEFAULT_LIMITS = ImageLimits.from_settings(DEFAULTS)


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    """Decode one image to RGB, or raise InvalidImageError saying what is wrong."""
    if not data:
        raise InvalidImageError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise InvalidImageError(f"image is {len(data)} bytes; the limit is {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise InvalidImageError(
                    f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
                )
            if image.format not in ACCEPTED_FORMATS:
                raise InvalidImageError(f"image format {image.format} is not accepted (use PNG, JPEG or WebP)")
            if min(width, height) < limits.min_side:
                raise InvalidImageError(f"image is {width}x{height}; each side must be at least {limits.min_side}")
            image.load()
            # A camera's sideways JPEG is upright once its EXIF orientation is applied: ingest and
            # queries both decode here, so both see the image as a person does.
            return ImageOps.exif_transpose(image).convert("RGB")
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidImageError(f"image rejected as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InvalidImageError(f"image could not be decoded: {exc}") from exc


def load_image_file(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS) -> tuple[Image.Image, bytes]:
    """Read and decode a file; returns the image and its raw bytes (for content hashing)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise InvalidImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size > limits.max_bytes:
        raise InvalidImageError(f"{path} is {size} bytes; the limit is {limits.max_bytes} bytes")
    data = path.read_bytes()
    return decode_image(data, limits), data
