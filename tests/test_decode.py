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


def _frames(fmt: str, count: int) -> bytes:
    frames = [Image.new("RGB", (32, 32), (i * 40, 0, 0)) for i in range(count)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=100)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_formats_beyond_the_protos_are_refused_for_queries_but_read_from_training_folders(fmt, tmp_path):
    data = encoded(fmt)
    with pytest.raises(InvalidImageError, match="not accepted"):
        decode_image(data)
    path = tmp_path / f"train.{fmt.lower()}"
    path.write_bytes(data)
    assert load_image_file(path)[0].size == (32, 24)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_trailing_bytes_are_refused(fmt):
    with pytest.raises(InvalidImageError, match="bytes follow the end"):
        decode_image(encoded(fmt) + b"\0" * 100)
    decode_image(encoded(fmt))


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animations_are_refused(fmt):
    with pytest.raises(InvalidImageError, match="animated"):
        decode_image(_frames(fmt, 3))
    decode_image(_frames(fmt, 1))


def test_progressive_and_exif_jpegs_end_where_they_end():
    buffer = io.BytesIO()
    image = Image.effect_noise((64, 48), 60).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(buffer, format="JPEG", progressive=True, exif=exif, quality=90)
    assert decode_image(buffer.getvalue()).size == (48, 64)  # rotated upright, and not refused


def test_a_phones_multi_picture_jpeg_is_read_as_its_first_picture():
    frames = [Image.new("RGB", (32, 32), (200, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="MPO", save_all=True, append_images=frames[1:])
    image = decode_image(buffer.getvalue())
    assert image.size == (32, 32) and image.getpixel((0, 0))[0] > 150
    with pytest.raises(InvalidImageError, match="bytes follow the end"):
        decode_image(buffer.getvalue() + b"junk")
