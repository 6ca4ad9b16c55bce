"""An opt-in, size-bounded store of generated-image thumbnails, for contributors' statements.

A statement shows, for the generations that credited a contributor most, the generated image
next to the training image it was credited for, so the contributor can see why they were paid.
GMV keeps no generated image unless asked: `gmv serve --thumbnails-mb N` keeps a small JPEG of
each generation it records, under DATA_DIR/thumbnails, and drops the oldest past N MiB. Each
node keeps its own (a statement run on a node shows what that node recorded).
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from PIL import Image

SIDE = 160  # longest side of a thumbnail, in pixels
QUALITY = 80  # JPEG quality


def thumbnail_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "thumbnails"


def _name(tenant_id: str, generation_id: str) -> str:
    digest = hashlib.sha256(f"{tenant_id}\0{generation_id}".encode("utf-8")).hexdigest()
    return f"{digest[:2]}/{digest}.jpg"


class ThumbnailStore:
    def __init__(self, root: str | Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._bytes: int | None = None  # counted on first put

    def path(self, tenant_id: str, generation_id: str) -> Path | None:
        """The thumbnail of a generation, when kept."""
        path = self.root / _name(tenant_id, generation_id)
        return path if path.is_file() else None

    def put(self, tenant_id: str, generation_id: str, image: Image.Image) -> None:
        thumb = image.convert("RGB")
        thumb.thumbnail((SIDE, SIDE))
        path = self.root / _name(tenant_id, generation_id)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = path.with_suffix(".partial")
        thumb.save(partial, format="JPEG", quality=QUALITY)
        with self._lock:
            if self._bytes is None:
                self._bytes = sum(p.stat().st_size for p in self.root.glob("*/*.jpg"))
            previous = path.stat().st_size if path.exists() else 0
            os.replace(partial, path)
            self._bytes += path.stat().st_size - previous
            if self._bytes > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        """Drop the oldest thumbnails until the store is at 90% of its bound (not one per put)."""
        files = sorted(self.root.glob("*/*.jpg"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for path in files:
            if total <= 0.9 * self.max_bytes:
                break
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            total -= size
        self._bytes = total
