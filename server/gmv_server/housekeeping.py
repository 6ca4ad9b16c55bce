"""Memory housekeeping: a long-running server gives back the memory a burst of requests used.

Four things kept `gmv serve`'s RSS hundreds of MiB up after a burst of failed, large or odd
calls (a seeded fuzz of the API, tests/test_fuzz.py: +33% after 5,600 inputs; 2.2 GiB after
thirty refused 21 MB images):

- a failed call leaves reference cycles (the abort's exception, its traceback, and the frames
  that hold the request and its image bytes) that only the cyclic garbage collector frees; with
  the models' hundreds of thousands of long-lived objects loaded, CPython runs a full collection
  rarely (and one costs about 200 ms), so the requests wait in garbage;
- glibc's malloc raises its mmap threshold to up to 32 MiB once a large block is freed, so the
  buffers of later large requests (messages, images, tensors) come from its arenas, fragment
  them and stay resident;
- what glibc frees it keeps in its arenas rather than returning it;
- PyTorch's CPU kernels (oneDNN) cache a compiled primitive per input shape, up to 1,024 of
  them, a few hundred KiB each: a quality metric that runs on each image at its own size (PIQE)
  grows that cache with every new image size.

So, before the models load, blocks of 4 MiB or more are always mapped on their own (and
unmapped when freed; at 1 MiB, per-image working buffers such as a re-ranker's stack of
candidate features paid a fresh mapping each and a stream ran 15% slower), and oneDNN keeps at
most 64 primitives (fixed-size models need a few dozen); the environment's MALLOC_MMAP_THRESHOLD_
or ONEDNN_PRIMITIVE_CACHE_CAPACITY win. Once the models are warm, the objects that exist are
frozen (`gc.freeze`: never scanned again, which makes a full collection cost about 1 ms and lets
CPython run them often), and every `interval_s` a full collection runs and glibc is asked to
return its free pages (`malloc_trim`). Where the C library is not glibc, only the collections run.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import os

INTERVAL_S = 2.0
ONEDNN_PRIMITIVE_CACHE_CAPACITY = "64"
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 4 << 20


def _libc(name: str):
    try:
        return getattr(ctypes.CDLL(None), name)  # glibc's; absent on musl and macOS
    except (OSError, AttributeError):
        return None


def bound_native_memory() -> None:
    """Before the models first run: oneDNN reads its cache's capacity when it creates the cache."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    mallopt = _libc("mallopt")
    if mallopt is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)  # also stops glibc raising it


def freeze_startup_objects() -> None:
    """After the warm-up: what exists now (models, modules) lives as long as the process."""
    gc.collect()
    gc.freeze()


async def run(interval_s: float = INTERVAL_S) -> None:
    """Until cancelled: a full collection (garbage cycles holding requests), then free pages back."""
    trim = _libc("malloc_trim")
    while True:
        await asyncio.sleep(interval_s)
        gc.collect()
        if trim is not None:
            await asyncio.to_thread(trim, 0)  # ctypes releases the GIL: the event loop goes on
