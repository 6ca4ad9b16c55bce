"""The distributed build: `gmv index build --executor ray`, the local build's ingest on a Ray cluster.

The same rows, vectors, features and content hashes as ingest.py's local build, because every
decision and every number comes from the same functions: each row is checked, read, hashed and
decoded by ingest.load_row, kept or reported by ingest.Planner in manifest order, embedded by
the same encoder and re-ranker, and written through TrainingIndex by ingest's _Inserter; the
index build and the credit temperature are ingest.finish_build. Only where the work runs changes:

1. scan: Ray Data tasks read, hash and decode every row (pixels dropped) and return its hash
   or its problem. The driver then decides, in manifest order, what to embed (Planner: bad
   rows, removed contributors, rows already indexed, duplicate images), exactly as locally.
2. embed: Ray Data tasks read and decode the rows to embed; an actor pool embeds them, each
   actor loading the encoder and re-ranker once (a GPU per actor where the cluster has GPUs).
   The bytes are hashed again: an image changed since the scan is a bad row, not a wrong hash.
3. write: the driver inserts what the actors return, as the local build does (re-rank features
   first, then the rows), in calls of about 16 MB, then builds the index and calibrates.

Why the driver writes and not the workers: Milvus 2.3 does not deduplicate primary keys on
insert, and Ray retries a task or restarts an actor whose node died, so a worker that had
inserted a batch and died before Ray saw its result would insert it again. One writer that
marks each planned row as it commits it keeps every row exactly once whatever Ray retries (a
row delivered twice is dropped), and the re-rank feature store (behind TrainingIndex) is
written from one process. A re-run after the driver was stopped resumes as the local build
does: rows already indexed are found by training_id and skipped, so only the missing ones are
embedded and inserted. What one writer costs, and the bulk-import path that lifts it on
Milvus 2.4+ with object storage, are in docs/SCALE.md ("Distributed build").

Manifests are CSV or Parquet (by suffix), local or any URI pyarrow's filesystems open
(s3://, gs://, file://, ...); relative image paths resolve against the manifest's folder, and
images are read through the same filesystems. Ray is the optional `distributed` extra.
"""
from __future__ import annotations

import functools
import io
import logging
import math
import posixpath
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decode import DEFAULT_LIMITS, ImageLimits, decode_image, load_image_file
from .errors import GMVError, InvalidImageError, ManifestError
from .ingest import (
    BadRow,
    IngestReport,
    Planner,
    SourceRow,
    _Inserter,
    _Loaded,
    check_manifest_columns,
    finish_build,
    load_row,
    parse_manifest_csv,
    read_manifest,
    training_row,
)
from .milvus.index import CollectionInfo, IndexParams, TrainingIndex

log = logging.getLogger(__name__)

EXTRA = "pip install -e '.[distributed]'"
SCAN_BATCH = 64  # rows a scan task reads, hashes and decodes per batch
SHARD_ROWS = 1024  # rows of the plan per Ray Data block of the embed stage: what progress counts as a shard
NODE_CHECK_S = 5.0  # how often the progress line asks Ray how many nodes are alive


class DistributedUnavailableError(GMVError):
    """`--executor ray` without Ray installed (exit 2)."""


def require_ray():
    """The ray module, or an error that names the extra to install."""
    try:
        import ray
        import ray.data  # the `data` part of the extra
    except ImportError as exc:
        raise DistributedUnavailableError(
            f"--executor ray needs Ray, which is the optional `distributed` extra: {EXTRA} "
            f"(or pip install 'gmv[distributed]'); the default --executor local needs none ({exc})") from None
    return ray


# -- manifests and images by URI --------------------------------------------------------------

def is_uri(path: str | Path) -> bool:
    return isinstance(path, str) and "://" in path


@functools.lru_cache(maxsize=32)
def _filesystem(scheme_and_host: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(scheme_and_host + "/")[0]


def _open(uri: str):
    """(pyarrow filesystem, path inside it) of a URI; one filesystem object per bucket and process."""
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme == "file":
        from pyarrow import fs

        return fs.LocalFileSystem(), parts.path
    return _filesystem(f"{parts.scheme}://{parts.netloc}"), f"{parts.netloc}{parts.path}"


def read_source(manifest: str | Path) -> list[SourceRow]:
    """Rows of a CSV or Parquet manifest (.parquet/.pq: Parquet), a local path or a URI. A CSV on
    local disk is read by ingest.read_manifest itself. Image paths with a scheme are used as
    they are; relative ones resolve against the manifest's folder; absolute ones are local."""
    text = str(manifest)
    parquet = text.lower().endswith((".parquet", ".pq"))
    if not is_uri(text) and not parquet:
        return read_manifest(text)
    if is_uri(text):
        base = text.rsplit("/", 1)[0]

        def resolve(path: str) -> Path | str:
            if is_uri(path) or path.startswith("/"):
                return path if is_uri(path) else Path(path)
            return f"{base}/{posixpath.normpath(path)}"
    else:
        folder = Path(text).parent

        def resolve(path: str) -> Path | str:
            return path if is_uri(path) else (Path(path) if Path(path).is_absolute() else folder / path)
    try:
        if parquet:
            import pyarrow.parquet as pq

            if is_uri(text):
                filesystem, inner = _open(text)
                table = pq.read_table(inner, filesystem=filesystem)
            else:
                table = pq.read_table(text)
        else:
            filesystem, inner = _open(text)
            with filesystem.open_input_stream(inner) as raw, \
                    io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as handle:
                return parse_manifest_csv(handle, text, resolve)
    except (OSError, ValueError) as exc:  # pyarrow: FileNotFoundError, ArrowInvalid (a ValueError)...
        raise ManifestError(f"cannot read manifest {text}: {exc}") from exc
    check_manifest_columns(table.column_names, text)
    rows = []
    for number, record in enumerate(table.to_pylist(), start=1):
        metadata = {k: "" if v is None else str(v) for k, v in record.items() if k not in ("path", "training_id",
                                                                                              "contributor_id")}
        rows.append(SourceRow(line=number, path=resolve(str(record["path"] or "")),
                              training_id=str(record["training_id"] or "").strip(),
                              contributor_id=str(record["contributor_id"] or "").strip(),
                              metadata=metadata, unit="row"))
    return rows


def read_image(path: str | Path, limits: ImageLimits = DEFAULT_LIMITS):
    """(image, bytes) of a local file (decode.load_image_file) or a URI, with the same limits."""
    if not is_uri(path):
        return load_image_file(path, limits)
    from pyarrow import fs

    filesystem, inner = _open(str(path))
    try:
        info = filesystem.get_file_info(inner)
        if info.type == fs.FileType.NotFound:
            raise InvalidImageError(f"cannot read {path}: No such file or directory")
        if info.size is not None and info.size > limits.max_bytes:
            raise InvalidImageError(f"{path} is {info.size} bytes; the limit is {limits.max_bytes} bytes")
        with filesystem.open_input_file(inner) as handle:
            data = handle.read()
    except OSError as exc:
        raise InvalidImageError(f"cannot read {path}: {exc}") from exc
    return decode_image(data, limits, strict=False), data


# -- what runs on the cluster -----------------------------------------------------------------

def _source_row(batch: dict, i: int) -> SourceRow:
    path = str(batch["path"][i])
    return SourceRow(line=int(batch["line"][i]), path=path if is_uri(path) else Path(path),
                     training_id=str(batch["training_id"][i]), contributor_id=str(batch["contributor_id"][i]))


def scan_batch(batch: dict, limits: ImageLimits) -> dict:
    """Ray Data task: check, read, hash and decode each row (ingest.load_row); keep the hash or
    the problem, drop the pixels."""
    digests, problems = [], []
    for i in range(len(batch["seq"])):
        loaded = load_row(_source_row(batch, i), limits, read_image)
        digests.append(loaded.digest)
        problems.append(loaded.problem or "")
    return {"seq": batch["seq"], "digest": np.array(digests, dtype=object), "problem": np.array(problems, dtype=object)}


def decode_batch(batch: dict, limits: ImageLimits) -> dict:
    """Ray Data task: read and decode the rows to embed (RGB pixels, any size per row), hashing
    the bytes again; a row that cannot be read now, or whose bytes changed since the scan, gets
    a problem and no pixels."""
    import hashlib

    images, problems = [], []
    for i in range(len(batch["seq"])):
        try:
            image, data = read_image(str(batch["path"][i]), limits)
        except InvalidImageError as exc:
            images.append(np.zeros((1, 1, 3), np.uint8))
            problems.append(f"{exc} (in the embed stage, after the scan had read it)")
            continue
        if hashlib.sha256(data).hexdigest() != batch["digest"][i]:
            images.append(np.zeros((1, 1, 3), np.uint8))
            problems.append("the image changed while the build ran (its bytes differ from the scan's)")
            continue
        images.append(np.asarray(image, dtype=np.uint8))
        problems.append("")
    return {"seq": batch["seq"], "image": images, "problem": np.array(problems, dtype=object)}


class Embedder:
    """Ray Data actor: the encoder and re-ranker, built once per actor, embed a batch of decoded
    images. Rows with a problem pass through with zero vectors (the driver reports them)."""

    def __init__(self, encoder: str, reranker: str, device: str, model_dir: str):
        from .models import ModelPool, configure_model_dir, pick_device

        configure_model_dir(model_dir or None)
        models = ModelPool(pick_device(device))
        self.encoder = models.get("encoder", encoder)
        self.reranker = models.get("reranker", reranker)

    def __call__(self, batch: dict) -> dict:
        from PIL import Image

        ok = [i for i, problem in enumerate(batch["problem"]) if not problem]
        images = [Image.fromarray(np.asarray(batch["image"][i], dtype=np.uint8)) for i in ok]  # H x W x 3: RGB
        rows = len(batch["seq"])
        embeddings = np.zeros((rows, self.encoder.dim), np.float32)
        features = np.zeros((rows, self.reranker.feature_dim), np.float32)
        if images:
            embeddings[ok] = self.encoder.embed(images)
            features[ok] = self.reranker.features(images)
        return {"seq": batch["seq"], "problem": batch["problem"], "embedding": embeddings, "feature": features}


# -- the driver -------------------------------------------------------------------------------

@dataclass(frozen=True)
class RayOptions:
    address: str = ""  # "" : ray.init()'s own choice (RAY_ADDRESS, else a local Ray); "auto"; ray://host:10001
    actors: int = 0  # embedding actors; 0: one per GPU of the cluster, else one per CPU
    device: str = "auto"  # the actors' torch device (settings.device)
    model_dir: str = ""
    shard_rows: int = SHARD_ROWS


class _Progress:
    """One progress bar per stage, with rows/s, shards done, failures and nodes alive."""

    def __init__(self, ray, total: int, desc: str, enabled: bool, shards: int = 0):
        from tqdm import tqdm

        self.ray, self.shards, self.done_shards, self.failures = ray, shards, 0, 0
        self.bar = tqdm(total=total, unit="rows", desc=desc, disable=not enabled, smoothing=0.1)
        self.nodes, self.checked = "", 0.0
        self.enabled = enabled

    def update(self, rows: int, inserted: int | None = None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.checked > NODE_CHECK_S:
            alive = [node for node in self.ray.nodes() if node.get("Alive")]
            self.nodes, self.checked = f"{len(alive)}/{len(self.ray.nodes())}", now
        postfix = {"failures": self.failures, "nodes alive": self.nodes}
        if self.shards:
            postfix["shards"] = f"{self.done_shards}/{self.shards}"
        if inserted is not None:
            postfix["inserted"] = inserted
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()


def _connect(ray, address: str) -> bool:
    """Connect (or start a local Ray); True when this call started it, so it shuts it down."""
    if ray.is_initialized():
        return False
    ray.init(address=address or None, logging_level=logging.WARNING, log_to_driver=True,
             include_dashboard=False if not address else None)
    return True


def _configure_data(ray, progress: bool) -> None:
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own bars say rows/s, shards and failures
    context.print_on_execution_start = False
    if hasattr(context, "enable_operator_progress_bars"):
        context.enable_operator_progress_bars = False


def _scan(ray, rows: Sequence[SourceRow], limits: ImageLimits, progress: bool) -> list[_Loaded]:
    """Every row checked, read, hashed and decoded on the cluster; the results in manifest order."""
    items = [{"seq": seq, "path": str(row.path), "line": row.line, "training_id": row.training_id,
              "contributor_id": row.contributor_id} for seq, row in enumerate(rows)]
    blocks = max(1, min(len(items), math.ceil(len(items) / SCAN_BATCH)))
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        scan_batch, fn_kwargs={"limits": limits}, batch_size=SCAN_BATCH, batch_format="numpy")
    digests: list[str | None] = [None] * len(rows)
    problems: list[str] = [""] * len(rows)
    bar = _Progress(ray, len(rows), "scanning (read, hash, decode)", progress)
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            new = 0
            for seq, digest, problem in zip(batch["seq"], batch["digest"], batch["problem"]):
                if digests[int(seq)] is None:  # Ray may deliver a retried block's rows again: once each
                    digests[int(seq)], problems[int(seq)] = str(digest), str(problem)
                    new += 1
            bar.failures = sum(1 for p in problems if p)
            bar.update(new)
    finally:
        bar.close()
    missing = [seq for seq, digest in enumerate(digests) if digest is None]
    if missing:
        raise GMVError(f"the scan returned no result for {len(missing)} rows (first: {rows[missing[0]].where})")
    return [_Loaded(row, None, digest or "", problem or None) for row, digest, problem in zip(rows, digests, problems)]


def ingest_on_ray(
    index: TrainingIndex,
    collection: str,
    rows: Sequence[SourceRow],
    info: CollectionInfo,
    encoder,
    reranker,
    index_params: IndexParams | None = None,
    batch_size: int = 64,
    limits: ImageLimits = DEFAULT_LIMITS,
    progress: bool = True,
    index_timeout_s: float = 1800.0,
    options: RayOptions | None = None,
) -> IngestReport:
    """ingest.ingest on a Ray cluster (see the module): the same IngestReport. `encoder` and
    `reranker` are the driver's own instances (their names build the actors' copies; the
    re-ranker also calibrates at the end)."""
    ray = require_ray()
    options = options or RayOptions()
    started_ray = _connect(ray, options.address)
    try:
        _configure_data(ray, progress)
        return _ingest_on_ray(ray, index, collection, rows, info, encoder, reranker, index_params or IndexParams(),
                              batch_size, limits, progress, index_timeout_s, options)
    finally:
        if started_ray:
            ray.shutdown()


def _ingest_on_ray(ray, index: TrainingIndex, collection: str, rows: Sequence[SourceRow], info: CollectionInfo,
                   encoder, reranker, index_params: IndexParams, batch_size: int, limits: ImageLimits,
                   progress: bool, index_timeout_s: float, options: RayOptions) -> IngestReport:
    report = IngestReport(rows=len(rows))
    started = time.monotonic()
    created = index.create(collection, info, index_params, expected_rows=len(rows), load_new=False)
    planner = Planner(index, collection, created, report, batch_size, started)
    scanned = _scan(ray, rows, limits, progress) if rows else []
    plan: list[_Loaded] = []
    groups: list[range] = []  # the rows of each inserter.add() call of the local build, as plan positions
    for start in range(0, len(scanned), planner.chunk_rows):
        to_embed = planner.plan(scanned[start:start + planner.chunk_rows])
        for first in range(0, len(to_embed), max(1, batch_size)):
            groups.append(range(len(plan) + first, len(plan) + min(first + max(1, batch_size), len(to_embed))))
        plan += to_embed
    report.seconds["scan"] = time.monotonic() - started  # the distributed build's own: create, scan and plan
    log.info("%d rows scanned in %.1f s: %d to embed (%d already present, %d duplicates, %d bad)", len(rows),
             time.monotonic() - started, len(plan), report.already_present, report.duplicates, len(report.bad))
    if plan:
        _embed_and_write(ray, index, collection, plan, groups, report, encoder, reranker, batch_size, limits,
                         progress, options, replace_features=not created)
    report.seconds["rows"] = time.monotonic() - started
    return finish_build(index, collection, reranker, report, progress, index_timeout_s)


def _actors(ray, options: RayOptions) -> tuple[int, float]:
    """(actors, GPUs per actor)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if options.device not in ("auto",) and not options.device.startswith("cuda"):
        gpus = 0  # --device cpu: no GPU asked of Ray even where there are some
    if options.actors:
        return options.actors, 1.0 if gpus else 0.0
    return (gpus, 1.0) if gpus else (max(1, int(resources.get("CPU", 1))), 0.0)


def _embed_and_write(ray, index: TrainingIndex, collection: str, plan: list[_Loaded], groups: list[range],
                     report: IngestReport, encoder, reranker, batch_size: int, limits: ImageLimits, progress: bool,
                     options: RayOptions, replace_features: bool) -> None:
    """Embed the plan on the cluster and insert it in plan order, in the local build's groups:
    the same insert calls with the same rows in the same order, so Milvus cuts the same segments
    and trains the same IVF_PQ quantizers as for the local build (10k rows inserted in another
    order gave other top-10s for a third of the queries: docs/SCALE.md)."""
    actors, gpus = _actors(ray, options)
    shard_rows = max(1, options.shard_rows)
    shards = math.ceil(len(plan) / shard_rows)
    items = [{"seq": seq, "path": str(item.row.path), "digest": item.digest} for seq, item in enumerate(plan)]
    decode_args = {"num_cpus": 1} if gpus else {}  # with GPUs decoding runs as CPU tasks; else inside the actors
    # Blocks of at most a shard, and enough of them to keep every actor busy (Ray retries a block as a whole).
    blocks = min(len(plan), max(shards, 4 * actors))
    context = ray.data.DataContext.get_current()
    preserve_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # blocks come back in plan order: little waits in `arrived`
    dataset = (ray.data.from_items(items, override_num_blocks=blocks)
               .map_batches(decode_batch, fn_kwargs={"limits": limits}, batch_size=max(1, batch_size),
                            batch_format="numpy", **decode_args)
               .map_batches(Embedder, fn_constructor_kwargs={"encoder": encoder.name, "reranker": reranker.name,
                                                             "device": options.device,
                                                             "model_dir": options.model_dir},
                            batch_size=max(1, batch_size), batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus))
    log.info("embedding %d rows in %d shards on %d actor(s)%s", len(plan), shards, actors,
             " with a GPU each" if gpus else " on CPUs")
    received = np.zeros(len(plan), dtype=bool)
    arrived: dict[int, tuple[np.ndarray, np.ndarray] | None] = {}  # seq -> (embedding, feature), None: bad row
    next_group = 0
    bar = _Progress(ray, len(plan), f"indexing {collection} on Ray", progress, shards=shards)
    inserter = _Inserter(index, collection, report, bar.bar, replace_features=replace_features)
    left_in_shard = [min(shard_rows, len(plan) - shard * shard_rows) for shard in range(shards)]
    queued: deque = deque()  # the shard of each row given to the inserter, in order (inserts complete in order)
    committed = 0  # rows of `queued` counted as inserted so far

    def settle(shard: int) -> None:
        left_in_shard[shard] -= 1
        if left_in_shard[shard] == 0:
            bar.done_shards += 1

    repeats = 0
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            new = 0
            for i, seq in enumerate(batch["seq"]):
                seq = int(seq)
                if received[seq]:
                    repeats += 1  # a retried task's output delivered again: kept once
                    continue
                received[seq], new = True, new + 1
                problem = str(batch["problem"][i])
                if problem:
                    report.bad.append(BadRow(plan[seq].row.where, plan[seq].row.training_id, problem))
                    bar.failures += 1
                    arrived[seq] = None
                else:
                    arrived[seq] = (np.asarray(batch["embedding"][i], dtype=np.float32),
                                    np.asarray(batch["feature"][i], dtype=np.float32).reshape(-1))
            # Every group whose rows are all here goes to the inserter, in plan order.
            while next_group < len(groups) and all(seq in arrived for seq in groups[next_group]):
                done = [(seq, arrived.pop(seq)) for seq in groups[next_group]]
                keep = [(seq, vectors) for seq, vectors in done if vectors is not None]
                for seq, vectors in done:
                    if vectors is None:
                        settle(seq // shard_rows)
                if keep:
                    inserter.add([training_row(plan[seq]) for seq, _ in keep],
                                 np.stack([vectors[0] for _, vectors in keep]),
                                 np.stack([vectors[1] for _, vectors in keep]))
                    queued.extend(seq // shard_rows for seq, _ in keep)
                next_group += 1
            while queued and committed < report.inserted:
                committed += 1
                settle(queued.popleft())
            bar.update(new, inserted=report.inserted)
        inserter.close()
        while queued:
            settle(queued.popleft())
    finally:
        context.execution_options.preserve_order = preserve_order
        inserter.shutdown()
        bar.close()
    if repeats:
        log.info("%d rows were delivered again by retried Ray tasks and kept once", repeats)
    missing = int((~received).sum())
    if missing:  # Ray Data returned without them (it raises when a task fails for good): never silent
        raise GMVError(f"{missing} planned rows were never returned by the cluster; run the same command again to "
                       "index them (rows already inserted are skipped)")

