"""Bad images get a clear InvalidImageError; good ones decode to RGB."""
import io
from dataclasses import replace
import struct
import zlib

import pytest
from PIL import Image

from gmv_engine.decode import DEFAULT_LIMITS, decode_image, load_image_file
from gmv_engine.errors import InvalidImageError

from helpers import png_header_only


def encoded(fmt: str, size=(32, 24), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=120 if mode == "L" else (10, 200, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_common_formats_to_rgb(fmt):
    image = decode_image(encoded(fmt))
    assert image.mode == "RGB" and image.size == (32, 24)


def test_grayscale_becomes_rgb():
    assert decode_image(encoded("PNG", mode="L")).mode == "RGB"


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"not an image at all", "could not be decoded"),
    (encoded("PNG")[:40], "could not be decoded"),  # truncated
])
def test_rejects_empty_and_corrupt(data, message):
    with pytest.raises(InvalidImageError, match=message):
        decode_image(data)


def test_rejects_too_many_bytes():
    with pytest.raises(InvalidImageError, match="bytes; the limit"):
        decode_image(encoded("PNG"), replace(DEFAULT_LIMITS, max_bytes=50))


def test_rejects_decompression_bomb_before_decoding():
    bomb = png_header_only(100_000, 100_000)  # 10 gigapixels announced in ~60 bytes
    assert len(bomb) < 100
    with pytest.raises(InvalidImageError, match="pixels"):
        decode_image(bomb)


def test_rejects_too_many_pixels():
    with pytest.raises(InvalidImageError, match="pixels; the limit"):
        decode_image(encoded("PNG", size=(100, 100)), replace(DEFAULT_LIMITS, max_pixels=5_000))


def test_rejects_tiny_images():
    with pytest.raises(InvalidImageError, match="at least"):
        decode_image(encoded("PNG", size=(4, 4)))


def test_rejects_unaccepted_format():
    with pytest.raises(InvalidImageError, match="not accepted"):
        decode_image(encoded("PPM"))


def test_missing_file(tmp_path):
    with pytest.raises(InvalidImageError, match="cannot read"):
        load_image_file(tmp_path / "absent.png")
