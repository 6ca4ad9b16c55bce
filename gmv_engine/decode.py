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

# What a generated image may be (the .proto's promise), and what a training folder may hold
# besides (the operator's own files).
QUERY_FORMATS = ("PNG", "JPEG", "WEBP")
TRAINING_FORMATS = QUERY_FORMATS + ("MPO", "BMP", "GIF", "TIFF")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int
    max_pixels: int
    min_side: int  # PIQE and the encoders need a few pixels to work with

    @classmethod
    def from_settings(cls, settings: Settings) -> "ImageLimits":
        return cls(settings.max_image_bytes, settings.max_image_pixels, settings.min_image_side)


DEFAULT_LIMITS = ImageLimits.from_settings(DEFAULTS)


def decode_image(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, strict: bool = True) -> Image.Image:
    """Decode one image to RGB, or raise InvalidImageError saying what is wrong. strict (a
    generated image from a caller): PNG, JPEG or WebP only, one frame (no animation), and
    nothing after the image's end; else (a training file) also BMP, GIF, TIFF, first frame."""
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
            accepted = QUERY_FORMATS + ("MPO",) if strict else TRAINING_FORMATS  # MPO: a phone's JPEG
            if image.format not in accepted:
                raise InvalidImageError(f"image format {image.format} is not accepted (use PNG, JPEG or WebP)")
            if strict:
                _check_single_image(data, image)
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


def _check_single_image(data: bytes, image: Image.Image) -> None:
    """One still image and nothing after it: an animation has no one image to attribute, and
    bytes after the end are at best waste and at worst a payload riding along."""
    if image.format != "MPO" and getattr(image, "n_frames", 1) > 1:
        raise InvalidImageError(f"animated {image.format} ({image.n_frames} frames) is not accepted; "
                                "send one frame as a still image")
    end = {"PNG": _png_end, "WEBP": _webp_end, "JPEG": _jpeg_end, "MPO": _jpeg_end}[image.format](data)
    if image.format == "MPO":  # a phone's extra pictures (depth, preview) follow the first, each a JPEG
        while end < len(data) and data[end:end + 2] == b"\xff\xd8":
            end += _jpeg_end(data[end:])
    if end < len(data):
        raise InvalidImageError(f"{len(data) - end} bytes follow the end of the {image.format} image; "
                                "send the image alone")


def _png_end(data: bytes) -> int:
    position = 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        position += 12 + length
        if kind == b"IEND":
            return position
    raise InvalidImageError("image could not be decoded: the PNG has no IEND chunk")


def _webp_end(data: bytes) -> int:
    size = int.from_bytes(data[4:8], "little")
    return 8 + size + (size & 1)


def _jpeg_end(data: bytes) -> int:
    """The offset just past the JPEG's EOI marker, walking its segments and scans."""
    position, n = 2, len(data)
    while position + 1 < n:
        if data[position] != 0xFF:
            raise InvalidImageError("image could not be decoded: the JPEG's markers are corrupt")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker == 0xD9:  # EOI
            return position + 2
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            position += 2
            continue
        length = int.from_bytes(data[position + 2:position + 4], "big")
        position += 2 + length
        if marker == 0xDA:  # a scan: entropy-coded data up to the next marker that is not RSTn or a stuffed 0
            while True:
                position = data.find(b"\xff", position)
                if position < 0 or position + 1 >= n:
                    raise InvalidImageError("image could not be decoded: the JPEG ends inside a scan")
                following = data[position + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
                    position += 1 if following == 0xFF else 2
                    continue
                break
    raise InvalidImageError("image could not be decoded: the JPEG has no end marker")


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
    return decode_image(data, limits, strict=False), data
