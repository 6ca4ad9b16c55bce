"""Ingest: training images -> recall embeddings and re-rank features in Milvus.

Resumable (a training_id already in the collection with the same content is skipped) and
deduplicating (an image whose exact bytes are already indexed is skipped and counted).
A row that cannot be used (missing or corrupt file, a training_id that already stands for
other content) is reported with its line number and never inserted; the good rows of the
same run are. Each row is inserted whole (its re-rank feature, then its training row) once it
has been embedded, so a failure leaves whole rows or nothing; the rows inserted before it stay,
and a rerun resumes after them. Images of contributors who were removed from the collection
are refused. At the end the index is built and served, and the credit temperature measured.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .calibration import Calibration, calibrate
from .settings import DEFAULTS
from .decode import DEFAULT_LIMITS, ImageLimits, load_image_file
from .encoders import Encoder
from .errors import InvalidImageError, ManifestError
from .milvus.index import (BLOCKED_SUFFIX, BOUNDED_LOOKUPS_AFTER_S, INGEST_CONSISTENCY, MAX_CONTRIBUTOR_ID,
                           MAX_TRAINING_ID, CollectionInfo, IndexParams, TrainingIndex, TrainingRow)
from .rerankers import Reranker

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("path", "training_id", "contributor_id")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class SourceRow:
    """One training image to ingest, and where it was named (manifest line or file)."""

    line: int  # manifest line number (header = 1), or row number of a Parquet manifest; 0 for a folder scan
    path: Path | str  # a str only for a URI (s3://, gs://, file://) that the distributed build reads
    training_id: str
    contributor_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    unit: str = "line"  # what `line` counts: "line" of a CSV, "row" of a Parquet manifest

    @property
    def where(self) -> str:
        return f"{self.unit} {self.line}" if self.line else str(self.path)


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
    # Wall time of each phase: "rows" (read, check, embed, insert), "index" (flush, build, until
    # the index serves), "calibration".
    seconds: dict[str, float] = field(default_factory=dict)

    def timing(self) -> str:
        rows, build, calibration = (self.seconds.get(k, 0.0) for k in ("rows", "index", "calibration"))
        rate = f" ({self.rows / rows:.0f} rows/s)" if rows > 0 else ""
        return (f"rows read, embedded and inserted in {rows:.1f} s{rate}; index built and serving in {build:.1f} s; "
                f"credit temperature measured in {calibration:.1f} s")

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
        return parse_manifest_csv(handle, str(manifest),
                                  lambda text: Path(text) if Path(text).is_absolute() else manifest.parent / text)


def check_manifest_columns(columns: Iterable[str] | None, name: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in (columns or [])]
    if missing:
        raise ManifestError(
            f"manifest {name} lacks column(s) {', '.join(missing)}; "
            f"its header must name {','.join(REQUIRED_COLUMNS)} (other columns are kept as metadata)"
        )


def parse_manifest_csv(handle, name: str, resolve) -> list[SourceRow]:
    """The rows of an open CSV manifest (text, newline=""); resolve(path text) -> the path to read."""
    reader = csv.DictReader(handle)
    check_manifest_columns(reader.fieldnames, name)
    rows = []
    for record in reader:
        line = reader.line_num
        metadata = {k: v for k, v in record.items() if k not in REQUIRED_COLUMNS and k is not None}
        rows.append(SourceRow(
            line=line,
            path=resolve(record["path"] or ""),
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


# How the work is cut up (measured in docs/BENCHMARKS.md, "Ingest throughput"):
INSERT_BYTES = 16 << 20  # vectors per insert call: thousands of small rows, well under Milvus' 64 MiB per message
LOOKUP_ROWS = 4096  # rows checked against Milvus at once when it may hold some (a resumed run, a blocklist)
LOAD_GROUP = 16  # rows read, hashed and decoded per task of the thread pool
AHEAD_BYTES = 128 << 20  # decoded pixels the pool may hold ahead of embedding
INSERTS_IN_FLIGHT = 2  # insert calls queued behind embedding before it waits


def default_workers() -> int:
    """Threads that read, hash and decode: PIL and hashlib release the GIL while they work."""
    return max(2, min(8, os.cpu_count() or 2))


@dataclass
class _Loaded:
    row: SourceRow
    image: Image.Image | None = None
    digest: str = ""
    problem: str | None = None  # why the row cannot be used (then no image)

    @property
    def pixel_bytes(self) -> int:
        return self.image.width * self.image.height * 3 if self.image is not None else 0


def load_row(row: SourceRow, limits: ImageLimits, read=load_image_file) -> _Loaded:
    """Check, read, hash and decode one row; read(path, limits) -> (image, bytes) raises
    InvalidImageError (the distributed build passes one that also reads URIs)."""
    problem = _row_problem(row)
    if problem:
        return _Loaded(row, problem=problem)
    try:
        image, data = read(row.path, limits)
    except InvalidImageError as exc:
        return _Loaded(row, problem=str(exc))
    return _Loaded(row, image, hashlib.sha256(data).hexdigest())


def _load(rows: Sequence[SourceRow], limits: ImageLimits) -> list[_Loaded]:
    return [load_row(row, limits) for row in rows]


class _Loader:
    """Every row read, hashed and decoded by the pool, in manifest order. The pool works ahead
    of the consumer by up to `ahead_rows` rows and AHEAD_BYTES of decoded pixels (as estimated
    from the rows decoded so far), so embedding and decoding overlap with bounded memory;
    fill() starts it before the first row is wanted."""

    def __init__(self, rows: Sequence[SourceRow], limits: ImageLimits, pool: ThreadPoolExecutor, ahead_rows: int):
        self.limits, self.pool, self.ahead_rows = limits, pool, max(ahead_rows, LOAD_GROUP)
        self.groups = (rows[start:start + LOAD_GROUP] for start in range(0, len(rows), LOAD_GROUP))
        self.pending: deque = deque()
        self.decoded_rows = self.decoded_bytes = 0

    def fill(self) -> None:
        per_row = self.decoded_bytes / self.decoded_rows if self.decoded_rows else 0
        while len(self.pending) * LOAD_GROUP < self.ahead_rows and len(self.pending) * LOAD_GROUP * per_row < AHEAD_BYTES:
            group = next(self.groups, None)
            if group is None:
                return
            self.pending.append(self.pool.submit(_load, group, self.limits))

    def __iter__(self) -> Iterator[_Loaded]:
        while True:
            self.fill()
            if not self.pending:
                return
            for loaded in self.pending.popleft().result():
                self.decoded_rows += 1
                self.decoded_bytes += loaded.pixel_bytes
                yield loaded


def _chunks(stream: Iterable[_Loaded], rows: int) -> Iterator[list[_Loaded]]:
    """Up to `rows` loaded rows at a time, fewer where their pixels pass AHEAD_BYTES."""
    chunk: list[_Loaded] = []
    size = 0
    for loaded in stream:
        chunk.append(loaded)
        size += loaded.pixel_bytes
        if len(chunk) >= rows or size >= AHEAD_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _Inserter:
    """Inserts on threads of their own while the caller embeds the next rows, in calls of about
    INSERT_BYTES: one thread stores re-rank features, the other the training rows whose
    features are stored (so Milvus works on the features of one call and the rows of the one
    before at once). A failed insert is raised by the next add() or by close()."""

    def __init__(self, index: TrainingIndex, collection: str, report: IngestReport, bar, replace_features: bool):
        self.index, self.collection, self.report, self.bar = index, collection, report, bar
        self.replace_features = replace_features  # False only for a collection this run made
        self.features_pool = ThreadPoolExecutor(1, thread_name_prefix="gmv-insert-features")
        self.rows_pool = ThreadPoolExecutor(1, thread_name_prefix="gmv-insert-rows")
        self.in_flight: deque = deque()
        self.rows: list[TrainingRow] = []
        self.embeddings: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.bytes = 0

    def add(self, rows: list[TrainingRow], embeddings: np.ndarray, features: np.ndarray) -> None:
        self.rows += rows
        self.embeddings.append(embeddings)
        self.features.append(features)
        self.bytes += embeddings.nbytes + features.nbytes
        if self.bytes >= INSERT_BYTES:
            self.send()

    def send(self) -> None:
        if not self.rows:
            return
        while len(self.in_flight) >= INSERTS_IN_FLIGHT:
            self._collect(self.in_flight.popleft())
        rows, embeddings, features = self.rows, np.concatenate(self.embeddings), np.concatenate(self.features)
        self.rows, self.embeddings, self.features, self.bytes = [], [], [], 0
        stored = self.features_pool.submit(self.index.insert_features, self.collection, [row.pk for row in rows],
                                           features, self.replace_features)

        def insert_rows() -> None:
            stored.result()  # a row goes in only once its feature is in
            self.index.insert_rows(self.collection, rows, embeddings)

        self.in_flight.append((self.rows_pool.submit(insert_rows), rows))

    def _collect(self, entry) -> None:
        future, rows = entry
        future.result()
        self.report.inserted += len(rows)
        for row in rows:
            self.report.per_contributor[row.contributor_id] = self.report.per_contributor.get(row.contributor_id, 0) + 1
        self.bar.set_postfix(inserted=self.report.inserted, refresh=False)

    def close(self) -> None:
        """Send what is buffered and wait for every insert."""
        try:
            self.send()
            while self.in_flight:
                self._collect(self.in_flight.popleft())
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        for pool in (self.features_pool, self.rows_pool):
            pool.shutdown(wait=True, cancel_futures=True)


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
    workers: int | None = None,
) -> IngestReport:
    """Ingest `rows` (see the module). A pipeline: a thread pool reads, hashes and decodes
    ahead; this thread checks each row and embeds `batch_size` images at a time; another
    thread inserts the vectors in large calls. Milvus is asked about duplicates and blocked
    images only when it may hold some (a collection with rows, or with a blocklist), and then
    LOOKUP_ROWS rows at a time; within a run dictionaries find them."""
    report = IngestReport(rows=len(rows))
    pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="gmv-decode")
    loader = _Loader(rows, limits, pool, ahead_rows=max(LOOKUP_ROWS, 4 * batch_size))
    loader.fill()  # decoding starts while Milvus creates and loads the collection (seconds)
    try:
        return _ingest(index, collection, rows, info, encoder, reranker, index_params, batch_size, progress,
                       index_timeout_s, loader, report)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class Planner:
    """Which rows of a run to embed, decided in manifest order, and the report of the others: a
    bad row, an image of a removed contributor, a training_id already indexed (with the same
    content: already present; other content: a bad row) or an image whose exact bytes are
    already indexed under another training_id (a duplicate). Milvus is asked only when it may
    hold such rows (a collection with rows, or with a blocklist), `chunk_rows` rows at a time;
    within a run dictionaries find them. The local build and the distributed one
    (distributed.py) both decide through it, so both keep the same rows."""

    def __init__(self, index: TrainingIndex, collection: str, created: bool, report: IngestReport,
                 batch_size: int, started: float):
        from .milvus.erasure import removals

        self.index, self.collection, self.report, self.started = index, collection, report, started
        self.removed = removals(index, collection).contributors  # opted out: nothing of theirs goes back in
        # A new or empty collection holds no row to resume or duplicate; one without a blocklist
        # blocks nothing: then no row needs a Milvus lookup (the blocklist is made only by a removal).
        self.resuming = not created and index.count(collection) > 0
        self.blocklist = index.exists(collection + BLOCKED_SUFFIX)
        self.chunk_rows = LOOKUP_ROWS if self.resuming or self.blocklist else max(1, batch_size)
        self.seen_ids: dict[str, str] = {}  # training_id -> content hash, earlier in this run
        self.seen_hashes: dict[str, str] = {}  # content hash -> training_id, earlier in this run

    def plan(self, chunk: Sequence[_Loaded]) -> list[_Loaded]:
        """The rows of `chunk` (loaded rows, in manifest order) to embed; the others are counted."""
        from .milvus.erasure import blocked_hashes

        index, collection, report, removed = self.index, self.collection, self.report, self.removed
        good = [item for item in chunk if item.problem is None]
        digests = [item.digest for item in good]
        refused = blocked_hashes(index, collection, digests) if self.blocklist else {}
        # Rows of earlier runs were all written before this run began: once that is longer
        # ago than Milvus' grace time, a Bounded read sees them (~10 ms a call, not ~200).
        consistency = "Bounded" if time.monotonic() - self.started > BOUNDED_LOOKUPS_AFTER_S else INGEST_CONSISTENCY
        in_index = (index.existing(collection, [item.row.training_id for item in good], consistency)
                    if self.resuming else {})
        hashes_in_index = index.existing_hashes(collection, digests, consistency) if self.resuming else {}
        to_embed: list[_Loaded] = []
        for item in chunk:
            row, digest = item.row, item.digest
            if item.problem is not None:
                report.bad.append(BadRow(row.where, row.training_id, item.problem))
                continue
            owner = refused.get(digest) or (row.contributor_id if row.contributor_id in removed else None)
            if owner is not None:
                when = (time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(removed[owner].removed_at))
                        if owner in removed else "?")
                report.bad.append(BadRow(row.where, row.training_id, f"refused: contributor '{owner}' was removed "
                                                                     f"from '{collection}' (opted out, {when})"))
                report.refused += 1
                continue
            known = in_index.get(row.training_id, self.seen_ids.get(row.training_id))
            if known is not None:
                if known == digest:
                    report.already_present += 1
                else:
                    report.bad.append(BadRow(row.where, row.training_id, f"training_id '{row.training_id}' is "
                                                                         "already indexed with different image content"))
                continue
            owner = hashes_in_index.get(digest) or self.seen_hashes.get(digest)
            if owner is not None:
                report.duplicates += 1
                log.info("%s: %s is the same image as %s; skipped", row.where, row.training_id, owner)
                continue
            self.seen_ids[row.training_id] = digest
            self.seen_hashes[digest] = row.training_id
            to_embed.append(item)
        return to_embed


def training_row(item: _Loaded) -> TrainingRow:
    return TrainingRow(item.row.training_id, item.row.contributor_id, item.digest, item.row.metadata)


def _ingest(index: TrainingIndex, collection: str, rows: Sequence[SourceRow], info: CollectionInfo, encoder: Encoder,
            reranker: Reranker, index_params: IndexParams, batch_size: int, progress: bool, index_timeout_s: float,
            loader: _Loader, report: IngestReport) -> IngestReport:
    from tqdm import tqdm

    started = time.monotonic()
    # A new collection stays unloaded until its index is built (finish() loads it): no query
    # node consumes its rows as they arrive, and none has to swap them for indexed ones.
    created = index.create(collection, info, index_params, expected_rows=len(rows), load_new=False)
    planner = Planner(index, collection, created, report, batch_size, started)
    bar = tqdm(total=len(rows), unit="rows", desc=f"indexing {collection}", disable=not progress, smoothing=0.1)
    # In a collection this run made, no feature can be there before its row: plain inserts.
    inserter = _Inserter(index, collection, report, bar, replace_features=not created)
    try:
        for chunk in _chunks(loader, planner.chunk_rows):
            to_embed = planner.plan(chunk)
            done = len(chunk) - len(to_embed)
            for start in range(0, len(to_embed), max(1, batch_size)):
                batch = to_embed[start:start + max(1, batch_size)]
                images = [item.image for item in batch]
                embeddings = encoder.embed(images)
                features = reranker.features(images)
                inserter.add([training_row(item) for item in batch], embeddings, features)
                for item in batch:
                    item.image = None  # embedded: its pixels can go
                bar.update(len(batch) + done)
                done = 0
            bar.update(done)
        inserter.close()
    finally:
        inserter.shutdown()
        bar.close()
    report.seconds["rows"] = time.monotonic() - started
    return finish_build(index, collection, reranker, report, progress, index_timeout_s)


def finish_build(index: TrainingIndex, collection: str, reranker: Reranker, report: IngestReport, progress: bool,
                 index_timeout_s: float) -> IngestReport:
    """After the rows: build the index until it serves, then measure the credit temperature
    (report.seconds "index" and "calibration")."""
    from tqdm import tqdm

    started = time.monotonic()
    building = tqdm(total=max(report.inserted, 1), unit="rows", desc=f"building the index of {collection}",
                    disable=not progress)

    def show(state: dict) -> None:
        building.total = max(state["total_rows"], 1)
        building.update(state["indexed_rows"] - building.n)

    try:
        report.index_state = index.finish(collection, timeout_s=index_timeout_s, progress=show)
    finally:
        building.close()
    report.seconds["index"] = time.monotonic() - started
    # The rows changed, so the distances did: measure the credit temperature again.
    report.calibration = calibrate(index, collection, reranker, DEFAULTS.recall_k, DEFAULTS.nprobe)
    index.save_calibration(collection, report.calibration)
    report.seconds["calibration"] = time.monotonic() - started - report.seconds["index"]
    return report
