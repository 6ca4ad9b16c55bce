"""Ingest: training images -> recall embeddings and re-rank features in Milvus.

Resumable (a training_id already in the collection with the same content is skipped) and
deduplicating (an image whose exact bytes are already indexed is skipped and counted).
A row that cannot be used (missing or corrupt file, a training_id that already stands for
other content) is reported with its line number and never inserted; the good rows of the
same run are. Rows are inserted in batches after every row of the batch has been embedded,
so a failure leaves whole rows or nothing.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image

from .calibration import Calibration, calibrate
from .settings import DEFAULTS
from .decode import DEFAULT_LIMITS, ImageLimits, load_image_file
from .encoders import Encoder
from .errors import InvalidImageError, ManifestError
from .milvus.index import MAX_CONTRIBUTOR_ID, MAX_TRAINING_ID, CollectionInfo, IndexParams, TrainingIndex, TrainingRow
from .rerankers import Reranker

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "training_id", "contributor_id")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class SourceRow:
    """One training image to ingest, and where it was named (manifest line or file)."""

    line: int  # manifest line number (header = 1); 0 for a folder scan
    path: Path
    training_id: str
    contributor_id: str
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line else str(self.path)


@dataclass
class BadRow:
    where: str
    training_id: str
    reason: str


@dataclass
class IngestReport:
    rows: int = 0
    inserted: int = 0
    already_present: int = 0
    duplicates: int = 0  # exact same image bytes as a row already indexed (or earlier in this run)
    refused: int = 0  # images of removed contributors (also in `bad`, with the reason)
    bad: list[BadRow] = field(default_factory=list)
    index_state: dict = field(default_factory=dict)
    per_contributor: dict[str, int] = field(default_factory=dict)  # contributor_id -> rows inserted this run
    calibration: Calibration | None = None  # the collection's credit temperature, measured after this run

    def summary(self) -> str:
        return (
            f"{self.rows} rows: {self.inserted} inserted, {self.already_present} already present, "
            f"{self.duplicates} duplicate images skipped, {len(self.bad)} bad"
            + (f" ({self.refused} refused: removed contributors)" if self.refused else "")
            + (f"; credit temperature T = {self.calibration.temperature:.4g} (median nearest-neighbour distance "
               f"{self.calibration.nearest_distance:.4g} over {self.calibration.sample} images)"
               if self.calibration else "")
        )


def read_manifest(manifest: str | Path) -> list[SourceRow]:
    """Rows of a CSV with columns path,training_id,contributor_id (others kept as metadata).
    Relative paths resolve against the manifest's folder."""
    manifest = Path(manifest)
    try:
        handle = manifest.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {manifest}: {exc.strerror or exc}") from exc
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ManifestError(
                f"manifest {manifest} lacks column(s) {', '.join(missing)}; "
                f"its header must name {','.join(REQUIRED_COLUMNS)} (other columns are kept as metadata)"
            )
        rows = []
        for record in reader:
            line = reader.line_num
            metadata = {k: v for k, v in record.items() if k not in REQUIRED_COLUMNS and k is not None}
            path = Path(record["path"] or "")
            rows.append(SourceRow(
                line=line,
                path=path if path.is_absolute() else manifest.parent / path,
                training_id=(record["training_id"] or "").strip(),
                contributor_id=(record["contributor_id"] or "").strip(),
                metadata=metadata,
            ))
        return rows


def scan_folder(root: str | Path, contributor_depth: int = 1) -> list[SourceRow]:
    """Every image under `root`: training_id = path relative to root, contributor_id = the first
    `contributor_depth` folders under root joined by "/" (alice/2024/may/x.png -> alice).
    Hidden files and folders (".name") are skipped. An image with fewer folders above it gets
    contributor_id "" and so is reported as a bad row."""
    if contributor_depth < 1:
        raise ManifestError(f"contributor depth must be at least 1, got {contributor_depth}")
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"{root} is not a folder")
    rows = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        # Judged on the path below root only: a root that is itself inside a hidden folder still scans.
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        folders = relative.parts[:-1]
        contributor = "/".join(folders[:contributor_depth]) if len(folders) >= contributor_depth else ""
        rows.append(SourceRow(line=0, path=path, training_id=relative.as_posix(), contributor_id=contributor))
    return rows


def _row_problem(row: SourceRow) -> str | None:
    if not row.training_id:
        return "empty training_id"
    if not row.contributor_id:
        return "empty contributor_id" if row.line else "image is not inside a contributor folder"
    if len(row.training_id.encode()) > MAX_TRAINING_ID:
        return f"training_id longer than {MAX_TRAINING_ID} bytes"
    if len(row.contributor_id.encode()) > MAX_CONTRIBUTOR_ID:
        return f"contributor_id longer than {MAX_CONTRIBUTOR_ID} bytes"
    return None


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def ingest(
    index: TrainingIndex,
    collection: str,
    rows: Sequence[SourceRow],
    info: CollectionInfo,
    encoder: Encoder,
    reranker: Reranker,
    index_params: IndexParams = IndexParams(),
    batch_size: int = DEFAULTS.ingest_batch_size,
    limits: ImageLimits = DEFAULT_LIMITS,
    progress: bool = True,
    index_timeout_s: float = 1800.0,
) -> IngestReport:
    from tqdm import tqdm

    from .milvus.erasure import blocked_hashes, removals

    report = IngestReport(rows=len(rows))
    index.create(collection, info, index_params, expected_rows=len(rows))
    removed = removals(index, collection).contributors  # opted out: nothing of theirs goes back in
    seen_ids: dict[str, str] = {}  # training_id -> content hash, earlier in this run
    seen_hashes: dict[str, str] = {}  # content hash -> training_id, earlier in this run
    bar = tqdm(total=len(rows), unit="img", desc=f"indexing {collection}", disable=not progress)
    for batch in _batches(rows, batch_size):
        loaded: list[tuple[SourceRow, Image.Image, str]] = []
        for row in batch:
            problem = _row_problem(row)
            if problem:
                report.bad.append(BadRow(row.where, row.training_id, problem))
                continue
            try:
                image, data = load_image_file(row.path, limits)
            except InvalidImageError as exc:
                report.bad.append(BadRow(row.where, row.training_id, str(exc)))
                continue
            loaded.append((row, image, hashlib.sha256(data).hexdigest()))
        refused = blocked_hashes(index, collection, [digest for _, _, digest in loaded])
        kept = []
        for row, image, digest in loaded:
            owner = refused.get(digest) or (row.contributor_id if row.contributor_id in removed else None)
            if owner is None:
                kept.append((row, image, digest))
                continue
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(removed[owner].removed_at)) if owner in removed else "?"
            report.bad.append(BadRow(row.where, row.training_id, f"refused: contributor '{owner}' was removed from "
                                                                 f"'{collection}' (opted out, {when})"))
            report.refused += 1
        loaded = kept
        in_index = index.existing(collection, [row.training_id for row, _, _ in loaded])
        hashes_in_index = index.existing_hashes(collection, [digest for _, _, digest in loaded])
        to_insert: list[tuple[SourceRow, Image.Image, str]] = []
        for row, image, digest in loaded:
            known = in_index.get(row.training_id, seen_ids.get(row.training_id))
            if known is not None:
                if known == digest:
                    report.already_present += 1
                else:
                    report.bad.append(BadRow(row.where, row.training_id,
                                             f"training_id '{row.training_id}' is already indexed with different image content"))
                continue
            owner = hashes_in_index.get(digest) or seen_hashes.get(digest)
            if owner is not None:
                report.duplicates += 1
                log.info("%s: %s is the same image as %s; skipped", row.where, row.training_id, owner)
                continue
            seen_ids[row.training_id] = digest
            seen_hashes[digest] = row.training_id
            to_insert.append((row, image, digest))
        if to_insert:
            images = [image for _, image, _ in to_insert]
            embeddings = encoder.embed(images)
            features = reranker.features(images)
            index.insert(collection, [
                TrainingRow(row.training_id, row.contributor_id, digest, row.metadata) for row, _, digest in to_insert
            ], embeddings, features)
            report.inserted += len(to_insert)
            for row, _, _ in to_insert:
                report.per_contributor[row.contributor_id] = report.per_contributor.get(row.contributor_id, 0) + 1
        bar.update(len(batch))
    bar.close()
    report.index_state = index.finish(collection, timeout_s=index_timeout_s)
    # The rows changed, so the distances did: measure the credit temperature again.
    report.calibration = calibrate(index, collection, reranker, DEFAULTS.recall_k, DEFAULTS.nprobe)
    index.save_calibration(collection, report.calibration)
    return report
