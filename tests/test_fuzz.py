"""A seeded fuzz of the gRPC API against one real `gmv serve`: thousands of mutated images, odd
ids, malformed messages, out-of-range values and bad windows over every method. Each input's
expected status is decided before it is sent; the server must never answer UNKNOWN, INTERNAL
or UNAVAILABLE, must answer INVALID_ARGUMENT for every bad input, must stay up, and its memory
must come back to within 10% of its warmed-up baseline."""
from __future__ import annotations

import asyncio
import io
import math
import os
import random
import struct
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from PIL import Image

from gmv.v1 import attribution_pb2 as pb
from gmv_client import GMVClient

from helpers import png_header_only, start_server, stop_server

pytestmark = pytest.mark.e2e  # starts a real server

SEED = int(os.environ.get("GMV_FUZZ_SEED", "20251111"))
INPUTS = 5600  # at least 5,000, however the mix falls
SETTLE_S = 3.0  # longer than the server's housekeeping interval
WARM_UP_INPUTS = 1500  # the same kinds of input at the same concurrency: caches and pools at their working size
SERVICE = "gmv.v1.AttributionService"
UNARY_CONCURRENCY = 16
STREAM_CONCURRENCY = 2
MAX_STREAM_ITEMS = 40  # with the concurrency above, far below a tenant's share of the queue: no RESOURCE_EXHAUSTED
MAX_ID_BYTES, MAX_VALUATION_IDS, RECALL_K, MIN_SIDE, MAX_PIXELS = 128, 10_000, 100, 8, 40_000_000
MAX_IMAGE_BYTES = 20 * 1024 * 1024
TS_MIN, TS_MAX = -62135596800, 253402300799  # google.protobuf.Timestamp's range

OK, INVALID, NOT_FOUND = "OK", "INVALID_ARGUMENT", "NOT_FOUND"
ONLY_OK, ONLY_INVALID, ONLY_NOT_FOUND = frozenset({OK}), frozenset({INVALID}), frozenset({NOT_FOUND})
MAYBE = frozenset({OK, INVALID})  # a mutated image that may still decode
NEVER = {"UNKNOWN", "INTERNAL", "UNAVAILABLE"}


# -- wire format by hand: protobuf's own serializer refuses to write what we want to send ------
def varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def length_field(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


# -- what the server must answer, decided from the request alone ------------------------------
def bad_id(value: str, required: bool = False) -> bool:
    if not value:
        return required
    return len(value.encode("utf-8")) > MAX_ID_BYTES or any(ord(ch) < 32 or 127 <= ord(ch) < 160 for ch in value)


def expect_attribute(request: pb.AttributeRequest, image: frozenset, collection: str) -> frozenset:
    """The collection is resolved first (NOT_FOUND), then ids and top_k, then the image."""
    if request.collection not in ("", collection):
        return ONLY_NOT_FOUND
    if bad_id(request.generation_id, required=True) or bad_id(request.tenant_id) or request.top_k > RECALL_K:
        return ONLY_INVALID
    return image


def timestamp_ok(message, name: str) -> bool:
    if not message.HasField(name):
        return True
    stamp = getattr(message, name)
    return TS_MIN <= stamp.seconds <= TS_MAX and 0 <= stamp.nanos < 1_000_000_000


def seconds(message, name: str) -> float | None:
    return getattr(message, name).ToNanoseconds() / 1e9 if message.HasField(name) else None


def expect_ledger(request, collection: str) -> frozenset:
    if not (timestamp_ok(request, "since") and timestamp_ok(request, "until")):
        return ONLY_INVALID
    since, until = seconds(request, "since"), seconds(request, "until")
    if since is not None and until is not None and until <= since:
        return ONLY_INVALID
    if len(getattr(request, "training_ids", ())) > MAX_VALUATION_IDS:
        return ONLY_INVALID
    # The ledger may hold collections this server no longer serves: a name it does not serve is
    # either refused (NOT_FOUND) or answered from the ledger (nothing recorded under it here).
    return ONLY_OK if request.collection in ("", collection) else frozenset({OK, NOT_FOUND})


# -- inputs ----------------------------------------------------------------------------------
@dataclass
class Item:
    """One AttributeRequest on the wire, and what its answer must be."""
    payload: bytes
    expect: frozenset
    result_id: str  # the generation_id its answer carries ("" for a message that does not parse)
    top_k: int
    kind: str
    record: bool = False  # skip_ledger unset: an OK answer is one new row in the ledger


@dataclass
class Case:
    method: str
    kind: str
    expect: frozenset = ONLY_OK
    payload: bytes = b""
    items: list[Item] = field(default_factory=list)  # AttributeStream's requests
    request: object = None  # the parsed request, for checking an OK answer

    @property
    def inputs(self) -> int:
        return max(1, len(self.items))


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, position = [], 8
    while position + 8 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        chunks.append((data[position + 4:position + 8], data[position + 8:position + 8 + length]))
        position += 12 + length
    return chunks


def png_from_chunks(chunks: list[tuple[bytes, bytes]]) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        for kind, body in chunks)


def jpeg_sof_offset(data: bytes) -> int | None:
    """Where the JPEG's frame header (SOF0/1/2) starts, if it has one before its scan."""
    position = 2
    while position + 4 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker in (0xC0, 0xC1, 0xC2):
            return position
        if marker == 0xDA:
            return None
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    return None


class Inputs:
    """Every input from one seeded random.Random: the same seed, the same inputs."""

    def __init__(self, seed: int, bases: list[Image.Image], collection: str):
        self.rng = random.Random(seed)
        self.seed = seed
        self.collection = collection
        self.counter = 0
        rng = self.rng
        self.bases = list(bases)
        for _ in range(12):  # noise of odd sizes, down to the smallest legal side
            w, h = rng.randint(MIN_SIDE, 80), rng.randint(MIN_SIDE, 80)
            self.bases.append(Image.frombytes("RGB", (w, h), rng.randbytes(w * h * 3)))
        self.bases.append(Image.linear_gradient("L").resize((96, 64)).convert("RGB"))
        self.bases.append(Image.new("RGB", (64, 64), (0, 0, 0)))  # flat: q = 0, still legal
        self.bases.append(Image.new("RGBA", (48, 40), (0, 0, 0, 0)))
        self.bases.append(Image.frombytes("RGBA", (40, 40), rng.randbytes(40 * 40 * 4)))
        # Legal images in each accepted format and several modes: these must come back OK.
        self.valid: list[tuple[str, bytes]] = []
        for _ in range(120):
            self.valid.append(self.encode_valid(rng.choice(self.bases)))
        self.known = {data: ONLY_OK for _, data in self.valid}

    def encode_valid(self, image: Image.Image) -> tuple[str, bytes]:
        rng = self.rng
        fmt = rng.choice(["PNG", "PNG", "JPEG", "JPEG", "WEBP"])
        if fmt == "PNG":
            mode = rng.choice(["RGB", "RGB", "RGBA", "L", "P", "LA", "1"])
            return fmt, encode(image.convert(mode), "PNG", optimize=rng.random() < 0.3)
        if fmt == "JPEG":
            mode = rng.choice(["RGB", "RGB", "L", "CMYK"])
            return fmt, encode(image.convert(mode), "JPEG", quality=rng.randint(30, 98),
                               progressive=rng.random() < 0.3, subsampling=rng.choice([0, 1, 2]))
        if rng.random() < 0.5:
            return fmt, encode(image.convert("RGBA"), "WEBP", lossless=True)
        return fmt, encode(image.convert("RGB"), "WEBP", quality=rng.randint(10, 95))

    def next_id(self, prefix: str = "fz") -> str:
        self.counter += 1
        return f"{prefix}{self.seed}-{self.counter}"

    # -- images: (bytes, class, kind) --------------------------------------------------------
    def image(self) -> tuple[bytes, frozenset, str]:
        rng = self.rng
        fmt, data = rng.choice(self.valid)
        roll = rng.random()
        if roll < 0.22:
            return data, ONLY_OK, f"valid-{fmt.lower()}"
        if roll < 0.40:
            flipped = bytearray(data)
            for _ in range(rng.choice([1, 1, 2, 4, 8, 32])):
                position = rng.randrange(len(flipped))
                flipped[position] ^= 1 << rng.randrange(8)
            return bytes(flipped), MAYBE, "bit-flips"
        if roll < 0.50:
            keep_at_most = len(data) - {"PNG": 12, "JPEG": 2, "WEBP": 1}[fmt]
            cut = rng.choice([rng.randint(0, 32), rng.randint(0, keep_at_most)])
            return data[:min(cut, keep_at_most)], ONLY_INVALID, f"truncated-{fmt.lower()}"
        if roll < 0.57:
            tail = rng.choice([rng.randbytes(rng.randint(1, 64)), b"\x00", data, b"\xff\xd8\xff\xd9",
                               b"IEND\xaeB`\x82", b"<script>alert(1)</script>"])
            return data + tail, ONLY_INVALID, "trailing-bytes"
        if roll < 0.66:
            return self.corrupt_chunk(fmt, data)
        if roll < 0.72:
            return self.huge_header()
        if roll < 0.77:
            return self.tiny()
        if roll < 0.82:
            return self.animated()
        if roll < 0.88:
            return self.other_format()
        if roll < 0.94:
            junk = rng.choice([rng.randbytes(rng.randint(0, 3000)), b"", b"\x89PNG\r\n\x1a\n",
                               b"\xff\xd8\xff" + rng.randbytes(rng.randint(0, 200)),
                               b"RIFF\x10\x00\x00\x00WEBPVP8 " + rng.randbytes(rng.randint(0, 64)),
                               "ünïcödé text, not an image".encode()])
            return junk, ONLY_INVALID, "garbage"
        return self.reencoded()

    def reencoded(self) -> tuple[bytes, frozenset, str]:
        """A fresh legal image: a base cropped, resized or rotated, in a random format."""
        rng = self.rng
        image = rng.choice(self.bases)
        w, h = image.size
        side = lambda n: max(MIN_SIDE, n)  # noqa: E731
        image = rng.choice([
            lambda: image.resize((side(rng.randint(4, 200)), side(rng.randint(4, 200)))),
            lambda: image.crop((0, 0, side(rng.randint(1, w)), side(rng.randint(1, h)))),
            lambda: image.rotate(rng.choice([90, 180, 270]), expand=True),
            lambda: image,
        ])()
        fmt, data = self.encode_valid(image)
        return data, ONLY_OK, f"reencoded-{fmt.lower()}"

    def corrupt_chunk(self, fmt: str, data: bytes) -> tuple[bytes, frozenset, str]:
        rng = self.rng
        if fmt == "PNG":
            chunks = png_chunks(data)
            action = rng.choice(["scramble", "scramble", "drop", "duplicate", "swap", "unknown-critical", "ihdr"])
            if action == "scramble":  # new bytes in a chunk, CRC made right (or left wrong)
                index = rng.randrange(len(chunks))
                kind, body = chunks[index]
                body = bytearray(body)
                for _ in range(rng.randint(1, 8)):
                    if body:
                        body[rng.randrange(len(body))] = rng.randrange(256)
                chunks[index] = (kind, bytes(body))
                fixed = png_from_chunks(chunks)
                if rng.random() < 0.3:  # leave the CRC wrong
                    fixed = fixed[:-16] + bytes([fixed[-16] ^ 0xFF]) + fixed[-15:] if len(fixed) > 16 else fixed
                return fixed, MAYBE, "png-chunk-scrambled"
            if action == "drop":
                index = rng.randrange(len(chunks))
                kind = chunks[index][0]
                expect = ONLY_INVALID if kind in (b"IHDR", b"IDAT", b"IEND") else MAYBE
                return png_from_chunks(chunks[:index] + chunks[index + 1:]), expect, "png-chunk-dropped"
            if action == "duplicate":
                index = rng.randrange(len(chunks) - 1)
                return png_from_chunks(chunks[:index + 1] + chunks[index:]), MAYBE, "png-chunk-duplicated"
            if action == "swap":
                i, j = rng.randrange(len(chunks)), rng.randrange(len(chunks))
                chunks[i], chunks[j] = chunks[j], chunks[i]
                return png_from_chunks(chunks), MAYBE, "png-chunks-swapped"
            if action == "unknown-critical":  # an upper-case (critical) chunk no decoder knows
                chunks.insert(1, (b"ZZZZ", rng.randbytes(rng.randint(0, 32))))
                return png_from_chunks(chunks), MAYBE, "png-unknown-critical-chunk"
            width, height, depth, color, *rest = struct.unpack(">IIBBBBB", chunks[0][1])
            choice = rng.randrange(4)
            if choice == 0:
                width, height = rng.choice([(0, height), (width, 0), (0, 0)])
                expect = ONLY_INVALID
            elif choice == 1:
                depth = rng.choice([0, 3, 5, 7, 9, 32, 255])
                expect = ONLY_INVALID
            elif choice == 2:
                color = rng.choice([1, 5, 7, 8, 255])
                expect = ONLY_INVALID
            else:  # other dimensions than the data holds (a decoder may fill in what is missing)
                width, height = width + rng.randint(1, 500), height + rng.randint(1, 500)
                expect = MAYBE
            chunks[0] = (b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, *rest))
            return png_from_chunks(chunks), expect, "png-ihdr-corrupt"
        if fmt == "JPEG":
            corrupted = bytearray(data)
            sof = jpeg_sof_offset(data)
            if sof is not None and rng.random() < 0.5:  # other dimensions in the frame header
                height, width = rng.choice([(0, 0), (0, 32), (65535, 65535), (rng.randint(1, 7), 40),
                                            (rng.randint(8, 1500), rng.randint(8, 1500))])
                corrupted[sof + 5:sof + 9] = struct.pack(">HH", height, width)
                expect = ONLY_INVALID if height * width > MAX_PIXELS or min(height, width) < MIN_SIDE else MAYBE
                return bytes(corrupted), expect, "jpeg-sof-dimensions"
            end = min(len(data), 400)  # the headers: quantisation and Huffman tables
            for _ in range(rng.randint(1, 16)):
                corrupted[rng.randrange(2, end)] = rng.randrange(256)
            return bytes(corrupted), MAYBE, "jpeg-headers-scrambled"
        corrupted = bytearray(data)  # WebP: the RIFF size, or bytes inside the bitstream
        if rng.random() < 0.5:
            corrupted[4:8] = struct.pack("<I", rng.choice([0, 1, len(data) + rng.randint(1, 99), 2**32 - 1]))
            return bytes(corrupted), MAYBE, "webp-riff-size"
        for _ in range(rng.randint(1, 16)):
            corrupted[rng.randrange(12, len(corrupted))] = rng.randrange(256)
        return bytes(corrupted), MAYBE, "webp-scrambled"

    def huge_header(self) -> tuple[bytes, frozenset, str]:
        rng = self.rng
        choice = rng.randrange(4)
        if choice == 0:  # more pixels than the limit announced in a few bytes
            width = rng.randint(6400, 2**31 - 1)
            height = rng.randint(MAX_PIXELS // width + 1, 2**31 - 1)
            return png_header_only(width, height), ONLY_INVALID, "png-header-huge"
        if choice == 1:
            data = rng.choice([v for v in self.valid if v[0] == "JPEG"])[1]
            sof = jpeg_sof_offset(data)
            data = bytearray(data)
            data[sof + 5:sof + 9] = struct.pack(">HH", rng.randint(6400, 65535), rng.randint(6400, 65535))
            return bytes(data), ONLY_INVALID, "jpeg-header-huge"
        if choice == 2:  # under the pixel limit, but the data stops after a few rows: truncated
            side = rng.choice([512, 1000, 2000, 3000])
            return png_header_only(side, side), ONLY_INVALID, "png-header-large-truncated"
        gif = bytearray(encode(Image.new("P", (16, 16)), "GIF"))
        gif[6:10] = struct.pack("<HH", 65535, 65535)
        return bytes(gif), ONLY_INVALID, "gif-header-huge"

    def tiny(self) -> tuple[bytes, frozenset, str]:
        rng = self.rng
        width, height = rng.choice([(1, 1), (1, 64), (64, 1), (7, 7), (7, 100), (2, 3), (MIN_SIDE, MIN_SIDE)])
        image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
        fmt = rng.choice(["PNG", "JPEG", "WEBP"])
        expect = ONLY_OK if min(width, height) >= MIN_SIDE else ONLY_INVALID
        if rng.random() < 0.15:
            return png_header_only(0, 0), ONLY_INVALID, "png-0x0"
        return encode(image, fmt), expect, f"tiny-{width}x{height}"

    def animated(self) -> tuple[bytes, frozenset, str]:
        rng = self.rng
        base = rng.choice(self.bases).convert("RGB").resize((24, 24))
        frames = [base] + [Image.frombytes("RGB", (24, 24), rng.randbytes(24 * 24 * 3)) for _ in range(rng.randint(1, 3))]
        fmt = rng.choice(["GIF", "PNG", "WEBP"])
        return (encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0),
                ONLY_INVALID, f"animated-{fmt.lower()}")

    def other_format(self) -> tuple[bytes, frozenset, str]:
        rng = self.rng
        image = rng.choice(self.bases).convert("RGB")
        fmt = rng.choice(["BMP", "TIFF", "GIF", "ICO", "PPM", "TGA", "PCX", "DIB", "IM", "SGI"])
        return encode(image, fmt), ONLY_INVALID, f"format-{fmt.lower()}"

    # -- ids, tenants, collections, top_k: (value, kind) ---------------------------------------
    def generation_id(self, prefix: str = "fz") -> tuple[str, str]:
        rng = self.rng
        if rng.random() < 0.85:
            return self.next_id(prefix), "id"
        choice = rng.randrange(7)
        if choice == 0:
            return "", "id-empty"
        if choice == 1:
            return self.next_id(prefix) + rng.choice(["x", "é"]) * rng.randint(MAX_ID_BYTES, 5000), "id-too-long"
        if choice == 2:
            return "é" * (MAX_ID_BYTES // 2), "id-128-bytes"  # at the limit: accepted
        if choice == 3:
            return self.next_id(rng.choice(["生成", "😀", "\u202e", "\u00a0", "\u200b", "Ω≈ç", "é" * 20])), "id-unicode"
        if choice == 4:
            return self.next_id("😀" * 40), "id-unicode-too-long"
        control = rng.choice(["line\nforged", "tab\t", "nul\x00", "del\x7f", "nel\x85", "esc\x1b[2J", "cr\r"])
        return self.next_id(control), "id-control"

    def tenant(self) -> str:
        rng = self.rng
        return rng.choice(["", "", "fuzz-a", "fuzz-b", "ténant", "t" * MAX_ID_BYTES, "t" * (MAX_ID_BYTES + 1),
                           "bad\ntenant", "\x00", "😀" * 33])

    def collection_name(self) -> str:
        rng = self.rng
        if rng.random() < 0.9:
            return rng.choice(["", self.collection])
        return rng.choice(["no_such_collection", self.collection.upper(), self.collection + " ", "../etc/passwd",
                           "☃", "x" * rng.randint(100, 20000), "c\nd"])

    def top_k(self) -> int:
        rng = self.rng
        if rng.random() < 0.9:
            return rng.choice([0, 0, 0, 1, 5, 10, RECALL_K, rng.randint(1, RECALL_K)])
        return rng.choice([RECALL_K + 1, 1000, 2**31, 2**32 - 1])

    # -- AttributeRequests, as bytes on the wire -----------------------------------------------
    def attribute_item(self) -> Item:
        rng = self.rng
        if rng.random() < 0.06:
            return self.malformed_item()
        image, image_class, image_kind = self.image()
        if rng.random() < 0.02:  # over the byte limit
            image, image_class, image_kind = rng.randbytes(16) * (MAX_IMAGE_BYTES // 16 + 1), ONLY_INVALID, "too-many-bytes"
        record = rng.random() < 0.15 and image_class == ONLY_OK  # a few are recorded; most are previews
        generation_id, id_kind = (self.next_id("rec"), "id") if record else self.generation_id()
        request = pb.AttributeRequest(generation_id=generation_id, image=image, top_k=self.top_k(),
                                      tenant_id=self.tenant(), skip_ledger=not record,
                                      collection=self.collection_name())
        expect = expect_attribute(request, image_class, self.collection)
        kind = image_kind if id_kind == "id" else f"{id_kind}+{image_kind}"
        return Item(request.SerializeToString(), expect, generation_id, request.top_k or 10, kind, record)

    def malformed_item(self) -> Item:
        """Bytes that are not an AttributeRequest, or only nearly one."""
        rng = self.rng
        image = rng.choice(self.valid)[1]
        # A random id: a flipped bit may turn skip_ledger off, and the id it records must be new.
        good = pb.AttributeRequest(generation_id="pb-" + rng.randbytes(8).hex(), image=image,
                                   skip_ledger=True).SerializeToString()
        bad_utf8 = rng.choice([b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"abc\x80"])
        choice = rng.randrange(7)
        if choice == 0:  # a string field that is not UTF-8
            number = rng.choice([1, 4, 6])
            payload = good + length_field(number, bad_utf8)
            kind = "invalid-utf8"
        elif choice == 1:  # a length past the end
            payload = good + varint(1 << 3 | 2) + varint(rng.randint(10, 2**31))
            kind = "length-past-end"
        elif choice == 2:  # a varint that never ends, a group that never closes, field number 0
            payload = good + rng.choice([b"\x18" + b"\xff" * 11, b"\x0b\x0a\x01a", b"\x02\x01a", b"\x07"])
            kind = "malformed-wire"
        elif choice == 3:
            payload = rng.randbytes(rng.randint(1, 200))
            kind = "random-bytes"
        else:  # a valid request with bits flipped anywhere
            payload = bytearray(good)
            for _ in range(rng.randint(1, 4)):
                position = rng.randrange(len(payload))
                payload[position] ^= 1 << rng.randrange(8)
            payload = bytes(payload)
            kind = "request-bit-flips"
        try:
            request = pb.AttributeRequest.FromString(payload)
        except Exception:  # noqa: BLE001 - the server must say INVALID_ARGUMENT, as for any malformed message
            return Item(payload, ONLY_INVALID, "", 10, kind)
        image_class = self.known.get(request.image, MAYBE)
        return Item(payload, expect_attribute(request, image_class, self.collection), request.generation_id,
                    request.top_k or 10, f"{kind}-parsed", not request.skip_ledger)

    # -- ledger and index queries ---------------------------------------------------------------
    def timestamp(self, message, name: str) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.35:
            return
        stamp = getattr(message, name)
        if roll < 0.85:
            stamp.seconds, stamp.nanos = rng.randint(0, 2_000_000_000), rng.choice([0, rng.randint(0, 999_999_999)])
        else:  # outside Timestamp's range
            stamp.seconds, stamp.nanos = rng.choice([(TS_MAX + 1, 0), (TS_MIN - 1, 0), (2**62, 0), (-2**63, 0),
                                                     (5, -1), (5, 1_000_000_000), (0, 2**31 - 1)])

    def ledger_request(self, method: str):
        rng = self.rng
        request = pb.GetValuationRequest() if method == "GetValuation" else pb.TopContributorsRequest()
        self.timestamp(request, "since")
        self.timestamp(request, "until")
        if rng.random() < 0.2 and request.HasField("since") and timestamp_ok(request, "since"):  # empty or reversed
            request.until.CopyFrom(request.since)
            request.until.seconds -= rng.choice([0, 1, 1000])
        request.limit = rng.choice([0, 0, 1, 3, 10, 2**32 - 1, rng.randint(0, 100)])
        request.tenant_id = self.tenant()
        request.collection = self.collection_name()
        kind = "ledger-window"
        if method == "GetValuation":
            roll = rng.random()
            if roll < 0.03:
                count = rng.choice([MAX_VALUATION_IDS, MAX_VALUATION_IDS + 1, rng.randint(MAX_VALUATION_IDS + 1, 30_000)])
                request.training_ids.extend(f"digit-{i % 10}/{i:05d}.png" for i in range(count))
                kind = "valuation-many-ids"
            elif roll < 0.3:
                request.training_ids.extend(rng.choice(["digit-1/0001.png", "", "\n", "ü", "x" * 5000, "' OR 1=1 --"])
                                            for _ in range(rng.randint(1, 20)))
                kind = "valuation-odd-ids"
        return request, kind

    def ledger_case(self) -> Case:
        rng = self.rng
        method = rng.choice(["GetValuation", "TopContributors"])
        request, kind = self.ledger_request(method)
        if rng.random() < 0.1:  # the same message with a string that is not UTF-8, or broken bytes
            payload = request.SerializeToString() + rng.choice([length_field(5 if method == "GetValuation" else 4,
                                                                            b"\xff\xfe"),
                                                               varint(3 << 3 | 2) + varint(99999), b"\x07"])
            with pytest.raises(Exception):  # noqa: B017 - it must not parse here either
                type(request).FromString(payload)
            return Case(method, "ledger-malformed", ONLY_INVALID, payload)
        return Case(method, kind, expect_ledger(request, self.collection), request.SerializeToString(), request=request)

    def index_case(self) -> Case:
        rng = self.rng
        roll = rng.random()
        if roll < 0.15:
            method = rng.choice(["GetIndexInfo", "ListCollections"])
            payload = rng.choice([length_field(1, b"\xc3\x28"), rng.randbytes(rng.randint(1, 64)), b"\x0a\x05ab",
                                  varint(1 << 3 | 2) + varint(2**20)])
            message = pb.GetIndexInfoRequest if method == "GetIndexInfo" else pb.ListCollectionsRequest
            try:
                request = message.FromString(payload)
            except Exception:  # noqa: BLE001
                return Case(method, "index-malformed", ONLY_INVALID, payload)
            expect = ONLY_OK if getattr(request, "collection", "") in ("", self.collection) else ONLY_NOT_FOUND
            return Case(method, "index-random-parsed", expect, payload, request=request)
        if roll < 0.25:
            return Case("ListCollections", "list", ONLY_OK, b"", request=pb.ListCollectionsRequest())
        request = pb.GetIndexInfoRequest(collection=self.collection_name())
        expect = ONLY_OK if request.collection in ("", self.collection) else ONLY_NOT_FOUND
        return Case("GetIndexInfo", "index-info", expect, request.SerializeToString(), request=request)

    def case(self) -> Case:
        roll = self.rng.random()
        if roll < 0.52:
            item = self.attribute_item()
            return Case("Attribute", item.kind, item.expect, item.payload, items=[], request=item)
        if roll < 0.56:
            items = [self.attribute_item() for _ in range(self.rng.choice([0, 1, 5, 20, MAX_STREAM_ITEMS,
                                                                          self.rng.randint(1, MAX_STREAM_ITEMS)]))]
            return Case("AttributeStream", "stream", ONLY_OK, items=items)
        if roll < 0.82:
            return self.ledger_case()
        return self.index_case()

    def ordinary(self, count: int) -> list[Case]:
        """Plain previews of legal images, and the ledger's totals."""
        cases = []
        for _ in range(count):
            request = pb.AttributeRequest(generation_id=self.next_id("plain"), image=self.rng.choice(self.valid)[1],
                                          skip_ledger=True)
            item = Item(request.SerializeToString(), ONLY_OK, request.generation_id, 10, "plain")
            cases.append(Case("Attribute", item.kind, item.expect, item.payload, request=item))
        request = pb.GetValuationRequest()
        return cases + [Case("GetValuation", "plain", ONLY_OK, request.SerializeToString(), request=request)]

    def cases(self, inputs: int) -> list[Case]:
        made, total = [], 0
        while total < inputs:
            made.append(self.case())
            total += made[-1].inputs
        return made


# -- sending them ------------------------------------------------------------------------------
RESPONSES = {"Attribute": pb.Credit, "AttributeStream": pb.AttributionResult, "GetValuation": pb.GetValuationResponse,
             "TopContributors": pb.TopContributorsResponse, "GetIndexInfo": pb.IndexInfo,
             "ListCollections": pb.ListCollectionsResponse}


CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def finite(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def check_credits(quality: float, credits, top_k: int, generation_id: str) -> str:
    """'' when an attribution is sound, else what is wrong with it."""
    if not (finite(quality) and 0.0 <= quality <= 1.0):
        return f"quality {quality}"
    if not 1 <= len(credits) <= top_k or [c.rank for c in credits] != list(range(1, len(credits) + 1)):
        return f"{len(credits)} credits, ranks {[c.rank for c in credits]}, top_k {top_k}"
    if any(c.generation_id != generation_id for c in credits):
        return "a credit names another generation"
    if not all(finite(c.credit) and c.credit >= 0 and finite(c.distance) for c in credits):
        return "a credit or distance is not finite"
    if abs(sum(c.credit for c in credits) - quality) > 1e-6:
        return f"credits sum to {sum(c.credit for c in credits)}, quality {quality}"
    return ""


class Fuzzer:
    def __init__(self, target: str, collection: str):
        self.target = target
        self.collection = collection
        self.tally: Counter = Counter()  # (method, status)
        self.failures: list[str] = []
        self.inputs = 0
        self.recorded = 0  # OK answers to requests that did not set skip_ledger

    def outcome(self, case_kind: str, method: str, expect: frozenset, status: str, problem: str = "",
                details: str = "") -> None:
        """One input's answer: `problem` is what is wrong with an OK answer, `details` an error's message."""
        self.inputs += 1
        self.tally[(method, status)] += 1
        if status not in expect or problem:
            self.failures.append(f"{method} {case_kind}: expected {sorted(expect)}, got {status}: {problem}{details}"[:600])

    async def run(self, cases: list[Case]) -> None:
        identity = lambda data: data  # noqa: E731 - the bytes go as they are
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024),
                   ("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        async with grpc.aio.insecure_channel(self.target, options=options) as channel:
            calls = {}
            for method, response in RESPONSES.items():
                kind = {"Attribute": channel.unary_stream, "AttributeStream": channel.stream_stream}.get(
                    method, channel.unary_unary)
                calls[method] = kind(f"/{SERVICE}/{method}", request_serializer=identity,
                                     response_deserializer=response.FromString)
            unary_slots, stream_slots = asyncio.Semaphore(UNARY_CONCURRENCY), asyncio.Semaphore(STREAM_CONCURRENCY)

            async def one(case: Case) -> None:
                slots = stream_slots if case.method == "AttributeStream" else unary_slots
                async with slots:
                    await getattr(self, "_" + case.method.lower() if case.method in ("Attribute", "AttributeStream")
                                  else "_unary")(calls[case.method], case)

            await asyncio.gather(*(one(case) for case in cases))

    async def _attribute(self, call, case: Case) -> None:
        item: Item = case.request
        try:
            credits = [credit async for credit in call(item.payload, timeout=120)]
        except grpc.aio.AioRpcError as error:
            self.outcome(item.kind, "Attribute", item.expect, error.code().name, details=(error.details() or "")[:300])
            return
        problem = check_credits(credits[0].quality if credits else -1.0, credits, item.top_k, item.result_id)
        self.recorded += item.record
        self.outcome(item.kind, "Attribute", item.expect, OK, problem)

    async def _attributestream(self, call, case: Case) -> None:
        try:
            results = [result async for result in call(iter([item.payload for item in case.items]), timeout=120)]
        except grpc.aio.AioRpcError as error:
            self.outcome("stream", "AttributeStream", ONLY_OK, error.code().name, details=error.details() or "")
            return
        by_id: dict[str, list[pb.AttributionResult]] = {}
        for result in results:
            by_id.setdefault(result.generation_id, []).append(result)
        expected: dict[str, list[Item]] = {}
        for item in case.items:
            expected.setdefault(item.result_id, []).append(item)
        if len(results) != len(case.items) or set(by_id) != set(expected):
            self.outcome("stream", "AttributeStream", ONLY_OK, OK,
                         f"{len(results)} results for {len(case.items)} requests")
            return
        if not case.items:
            self.outcome("stream-empty", "AttributeStream", ONLY_OK, OK)
        for generation_id, items in expected.items():
            # Results of one id (e.g. "" for messages that did not parse) in any order: those that
            # must be one status take theirs first, the rest go to those that may be either.
            got = by_id[generation_id]
            items = sorted(items, key=lambda item: len(item.expect))
            for item in items:
                match = next((r for r in got if self._status(r) in item.expect), got[0])
                got.remove(match)
                status = self._status(match)
                problem = ""
                if status == OK:
                    self.recorded += item.record
                    problem = check_credits(match.quality, match.credits, item.top_k, generation_id)
                    if not problem and abs(sum(c.credit for c in match.contributors) - match.quality) > 1e-6:
                        problem = "contributors do not sum to the quality"
                self.outcome(f"stream:{item.kind}", "AttributeStream", item.expect, status, problem,
                             details=match.error.message[:300])

    @staticmethod
    def _status(result: pb.AttributionResult) -> str:
        return CODE_NAMES.get(result.error.code, str(result.error.code)) if result.HasField("error") else OK

    async def _unary(self, call, case: Case) -> None:
        try:
            reply = await call(case.payload, timeout=120)
        except grpc.aio.AioRpcError as error:
            self.outcome(case.kind, case.method, case.expect, error.code().name, details=(error.details() or "")[:300])
            return
        problem = ""
        if case.method in ("GetValuation", "TopContributors"):
            items = reply.values if case.method == "GetValuation" else reply.contributors
            values = [v.value for v in items]
            limit = case.request.limit if case.request is not None else 0
            if not finite(reply.total_credit) or not all(finite(v) for v in values):
                problem = "a value is not finite"
            elif values != sorted(values, reverse=True):
                problem = "values are not largest first"
            elif case.method == "TopContributors" and len(values) > (limit or 10):
                problem = f"{len(values)} contributors for limit {limit}"
            elif case.method == "GetValuation" and limit and len(values) > limit:
                problem = f"{len(values)} values for limit {limit}"
            elif case.request is not None and case.request.collection not in ("", self.collection) and reply.generations:
                problem = "generations counted for a collection that is not served"
        elif case.method == "GetIndexInfo" and reply.collection != self.collection:
            problem = f"info for {reply.collection!r}"
        elif case.method == "ListCollections" and [c.collection for c in reply.collections] != [self.collection]:
            problem = "wrong collections listed"
        self.outcome(case.kind, case.method, case.expect, OK, problem)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(milvus, digits_collection, tmp_path_factory):
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    running = start_server(milvus, digits_collection[0], log)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def bases(digits):
    from gmv_engine.datasets import read_heldout

    return [Image.open(path).convert("RGB") for path, _, _ in read_heldout(digits.heldout)[:40]]


def test_fuzz_the_api(server, bases, digits_collection):
    started = time.monotonic()
    collection = digits_collection[0]
    pid = server["process"].pid

    # Warm up on inputs of the same kinds (another seed) at the same concurrency, then take the
    # baseline once the server has tidied up (it collects garbage and trims every 2 s).
    warm = Fuzzer(server["target"], collection)
    asyncio.run(warm.run(Inputs(SEED + 1, bases, collection).cases(WARM_UP_INPUTS)))
    assert not warm.failures, "\n".join(warm.failures[:30])
    time.sleep(SETTLE_S)
    baseline = rss_kib(pid)

    generated = time.monotonic()
    cases = Inputs(SEED, bases, collection).cases(INPUTS)
    generated = time.monotonic() - generated
    fuzz = Fuzzer(server["target"], collection)
    sent = time.monotonic()
    asyncio.run(fuzz.run(cases))
    sent = time.monotonic() - sent

    # Let it settle, send a few ordinary requests, let it settle again, and measure.
    time.sleep(SETTLE_S)
    settle = Fuzzer(server["target"], collection)
    asyncio.run(settle.run(Inputs(SEED + 2, bases, collection).ordinary(10)))
    time.sleep(SETTLE_S)
    after = rss_kib(pid)
    wall = time.monotonic() - started

    statuses = Counter()
    for (method, status), count in fuzz.tally.items():
        statuses[status] += count
    print(f"\nfuzz seed {SEED}: {fuzz.inputs} inputs in {len(cases)} calls; generated in {generated:.1f} s, "
          f"sent in {sent:.1f} s; test wall time {wall:.1f} s (warm-up {WARM_UP_INPUTS} inputs included)")
    print("per status:", dict(sorted(statuses.items())))
    print("per method and status:", {f"{m}/{s}": n for (m, s), n in sorted(fuzz.tally.items())})
    print(f"recorded in the ledger: {fuzz.recorded} of the fuzz's generations (the rest skip_ledger)")
    print(f"server RSS: baseline {baseline / 1024:.1f} MiB, after {after / 1024:.1f} MiB "
          f"({100 * (after - baseline) / baseline:+.1f}%)")

    assert server["process"].poll() is None, "the server died:\n" + server["log"].read_text()[-5000:]
    assert fuzz.inputs >= 5000
    assert not fuzz.failures, f"{len(fuzz.failures)} unexpected answers:\n" + "\n".join(fuzz.failures[:40])
    assert not statuses.keys() & NEVER, statuses
    assert not settle.failures, settle.failures
    # The ledger holds each recorded generation once: one row per OK answer that was recorded.
    recorded = warm.recorded + fuzz.recorded + settle.recorded
    with GMVClient(server["target"]) as client:
        assert client.valuation().generations == recorded > 0
    assert after <= baseline * 1.10, f"RSS {after} KiB after the fuzz, {baseline} KiB before"
    assert wall < 120, f"the fuzz took {wall:.0f} s"
