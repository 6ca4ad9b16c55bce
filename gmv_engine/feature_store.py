"""The re-rank feature store: each collection's features as float16 matrices on disk, memory-mapped.

Re-ranking needs the stored feature of each of K' = 100 recalled rows. Fetched from a Milvus
collection by primary key that costs 23-43 ms a query at 100k rows, and Milvus holds the
features as float32 in RAM (3-4x their size); a memory-mapped float16 matrix answers in well
under a millisecond from the page cache, and the kernel keeps in memory only what is read.

Layout: ROOT/COLLECTION/ holds shards, each two .npy files written by one insert call:
`<shard>.pk.npy` (int64 primary keys) and `<shard>.f16.npy` (float16, one row per key). A
shard is immutable: written to a temporary name, then renamed, features first and keys last,
so a reader sees a shard only once it is whole. Removing keys (a contributor's opt-out)
writes each affected shard again without them under a new name before deleting the old one,
so a reader always finds every other key. Readers notice new or removed shards by the
directory's change time; keys are looked up in one sorted array of all shards' keys.

ROOT is a local directory, or any URI pyarrow's filesystems open (s3://, gs://, file://):
then shards are copied into a local cache directory once and mapped from there (a replica in a
cluster fills its own disk from the object store Milvus already uses). A training row's
feature never changes once written (ingest refuses a training_id with other content), so a
cached shard never goes stale; only removals do, and they rename.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

KEYS, FEATURES = ".pk.npy", ".f16.npy"
MERGED_ROWS = 262_144  # compaction merges shards up to this many rows (1.5 GiB of 3,072 float16)
REMOTE_LIST_EVERY_S = 2.0  # a replica lists a remote store for new shards at most this often


def is_remote(uri: str) -> bool:
    return "://" in uri


def _shard_name() -> str:
    # Sortable by time (readers list shards in write order), unique across writers.
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


def _write_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as out:
        np.save(out, array, allow_pickle=False)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


@dataclass
class _View:
    """One reader's snapshot of a collection's shards: all keys sorted, and where each lives."""

    signature: tuple
    keys: np.ndarray  # int64, sorted
    shard_of: np.ndarray  # int32: index into `matrices`
    row_of: np.ndarray  # int64: row in that shard
    matrices: list[np.ndarray]  # float16 memory maps
    dim: int
    shards: tuple = ()

    @classmethod
    def empty(cls, signature: tuple = ()) -> "_View":
        return cls(signature, np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64), [], 0)


class FeatureStore:
    """Features of every collection under one root. Thread-safe; one per process is enough."""

    def __init__(self, root: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
        self.uri = str(root)
        self.remote = is_remote(self.uri)
        if self.remote:
            from pyarrow import fs

            self._fs, remote_path = fs.FileSystem.from_uri(self.uri)
            self._remote_root = remote_path.rstrip("/")
            digest = hashlib.sha256(self.uri.encode()).hexdigest()[:16]
            base = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "gmv" / "features"
            self.local_root = (base / digest).absolute()
        else:
            self._fs = None
            self.local_root = Path(root).absolute()
        self._views: dict[str, _View] = {}
        self._listed_at: dict[str, float] = {}
        self._lock = threading.Lock()

    # -- writing --------------------------------------------------------------------------
    def _dir(self, collection: str) -> Path:
        return self.local_root / collection

    def append(self, collection: str, pks: Sequence[int], features: np.ndarray) -> None:
        """Store one batch as a new shard (a key written twice keeps its first feature: both
        are the same feature, as a training row's never changes)."""
        if not len(pks):
            return
        if features.shape[0] != len(pks):
            raise ValueError(f"{len(pks)} keys but {features.shape[0]} features")
        name = _shard_name()
        keys = np.asarray(pks, dtype=np.int64)
        matrix = np.ascontiguousarray(features, dtype=np.float16)
        if self.remote:
            self._put_remote(collection, name, keys, matrix)
            return
        folder = self._dir(collection)
        folder.mkdir(parents=True, exist_ok=True)
        _write_npy(folder / (name + FEATURES), matrix)
        _write_npy(folder / (name + KEYS), keys)  # last: its presence makes the shard visible

    def _put_remote(self, collection: str, name: str, keys: np.ndarray, matrix: np.ndarray) -> None:
        import io

        folder = f"{self._remote_root}/{collection}"
        self._fs.create_dir(folder, recursive=True)
        for suffix, array in ((FEATURES, matrix), (KEYS, keys)):
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            with self._fs.open_output_stream(f"{folder}/{name}{suffix}") as out:
                out.write(buffer.getvalue())

    @contextlib.contextmanager
    def _rewriting(self, collection: str):
        """Held while shards are rewritten (removal, compaction), so that two rewrites of one
        collection never both read a shard the other replaces (a removed row could come back).
        An advisory lock on this machine's copy; appends need none."""
        folder = self._dir(collection)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".rewrite.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def remove(self, collection: str, pks: Iterable[int]) -> int:
        """Delete these keys' features; returns how many rows were removed."""
        doomed = np.unique(np.fromiter(pks, dtype=np.int64))
        if not doomed.size:
            return 0
        with self._rewriting(collection):
            return self._remove(collection, doomed)

    def _remove(self, collection: str, doomed: np.ndarray) -> int:
        removed = 0
        for shard in self._shards(collection, refresh_remote=True):
            keys = self._read_keys(collection, shard)
            hit = np.isin(keys, doomed)
            if not hit.any():
                continue
            kept = ~hit
            matrix = np.load(self._local_file(collection, shard, FEATURES), mmap_mode="r")
            if kept.any():
                self.append(collection, keys[kept].tolist(), np.asarray(matrix[kept]))
            del matrix
            self._delete_shard(collection, shard)
            removed += int(hit.sum())
        with self._lock:
            self._views.pop(collection, None)
        return removed

    def drop(self, collection: str) -> None:
        """Delete a collection's features (with the collection)."""
        with self._lock:
            self._views.pop(collection, None)
        if self.remote:
            from pyarrow import fs

            folder = f"{self._remote_root}/{collection}"
            if self._fs.get_file_info(folder).type != fs.FileType.NotFound:
                self._fs.delete_dir(folder)
        shutil.rmtree(self._dir(collection), ignore_errors=True)

    def _delete_shard(self, collection: str, shard: str) -> None:
        for suffix in (KEYS, FEATURES):  # keys first: the shard disappears whole
            if self.remote:
                self._fs.delete_file(f"{self._remote_root}/{collection}/{shard}{suffix}")
            (self._dir(collection) / (shard + suffix)).unlink(missing_ok=True)

    def compact(self, collection: str, max_shards: int = 8) -> bool:
        """Merge small shards when there are more than max_shards (each shard costs every
        reader a mapped file; ingest writes one per insert call), into shards of up to
        MERGED_ROWS rows, streamed through a memory map (never the whole matrix in memory).
        True when anything was merged."""
        if len(self._shards(collection, refresh_remote=True)) <= max_shards:
            return False
        with self._rewriting(collection):
            return self._compact(collection, max_shards)

    def _compact(self, collection: str, max_shards: int) -> bool:
        shards = self._shards(collection, refresh_remote=True)
        if len(shards) <= max_shards:
            return False
        groups, group, rows = [], [], 0
        for shard in shards:
            keys = self._read_keys(collection, shard)
            if group and rows + len(keys) > MERGED_ROWS:
                groups.append(group)
                group, rows = [], 0
            group.append((shard, keys))
            rows += len(keys)
        groups.append(group)
        merged = False
        for group in groups:
            if len(group) < 2:
                continue
            self._merge(collection, group)
            merged = True
        with self._lock:
            self._views.pop(collection, None)
        return merged

    def _merge(self, collection: str, group: list[tuple[str, np.ndarray]]) -> None:
        keys = np.concatenate([k for _, k in group])
        _, first = np.unique(keys, return_index=True)  # a key written twice (a resumed run) once
        keep = np.zeros(len(keys), bool)
        keep[first] = True
        dim = np.load(self._local_file(collection, group[0][0], FEATURES), mmap_mode="r").shape[1]
        name = _shard_name()
        folder = self._dir(collection)
        tmp = folder / f".{name}{FEATURES}.tmp"
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(int(keep.sum()), dim))
        row = offset = 0
        for shard, shard_keys in group:
            mine = keep[offset:offset + len(shard_keys)]
            matrix = np.load(self._local_file(collection, shard, FEATURES), mmap_mode="r")
            n = int(mine.sum())
            out[row:row + n] = matrix[mine]
            row, offset = row + n, offset + len(shard_keys)
            del matrix
        out.flush()
        del out
        os.replace(tmp, folder / (name + FEATURES))
        _write_npy(folder / (name + KEYS), keys[keep])
        if self.remote:
            self._put_remote(collection, name, keys[keep], np.load(folder / (name + FEATURES), mmap_mode="r"))
        for shard, _ in group:
            self._delete_shard(collection, shard)

    # -- reading --------------------------------------------------------------------------
    def _shards(self, collection: str, refresh_remote: bool = False) -> list[str]:
        if self.remote and refresh_remote:
            self._sync(collection)
        folder = self._dir(collection)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(KEYS)] for n in names if n.endswith(KEYS) and not n.startswith("."))

    def _local_file(self, collection: str, shard: str, suffix: str) -> Path:
        return self._dir(collection) / (shard + suffix)

    def _read_keys(self, collection: str, shard: str) -> np.ndarray:
        return np.load(self._local_file(collection, shard, KEYS))

    def _sync(self, collection: str) -> None:
        """Copy the remote shards this replica lacks, and forget those removed there."""
        from pyarrow import fs

        self._listed_at[collection] = time.monotonic()
        folder = f"{self._remote_root}/{collection}"
        listed = self._fs.get_file_info(fs.FileSelector(folder, allow_not_found=True))
        remote = {Path(info.path).name for info in listed if info.type == fs.FileType.File}
        shards = {name[: -len(KEYS)] for name in remote if name.endswith(KEYS)}
        local = self._dir(collection)
        local.mkdir(parents=True, exist_ok=True)
        for shard in sorted(shards):
            if (local / (shard + KEYS)).exists() or shard + FEATURES not in remote:
                continue
            for suffix in (FEATURES, KEYS):
                tmp = local / f".{shard}{suffix}.{uuid.uuid4().hex[:8]}.tmp"
                with self._fs.open_input_stream(f"{folder}/{shard}{suffix}") as source, open(tmp, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                os.replace(tmp, local / (shard + suffix))
        for name in os.listdir(local):
            if name.endswith(KEYS) and name[: -len(KEYS)] not in shards:
                (local / name).unlink(missing_ok=True)
                (local / (name[: -len(KEYS)] + FEATURES)).unlink(missing_ok=True)

    def _view(self, collection: str, force: bool = False) -> _View:
        if self.remote and (force or time.monotonic() - self._listed_at.get(collection, -1e9) > REMOTE_LIST_EVERY_S):
            self._sync(collection)
        try:
            stat = os.stat(self._dir(collection))
            signature = (stat.st_mtime_ns, stat.st_ino)
        except FileNotFoundError:
            return _View.empty()
        with self._lock:
            view = self._views.get(collection)
            if view is not None and view.signature == signature:
                return view
        view = self._load_view(collection, signature)
        with self._lock:
            self._views[collection] = view
        return view

    def _load_view(self, collection: str, signature: tuple) -> _View:
        keys, shard_of, row_of, matrices, names = [], [], [], [], []
        for shard in self._shards(collection):
            try:
                shard_keys = self._read_keys(collection, shard)
                matrix = np.load(self._local_file(collection, shard, FEATURES), mmap_mode="r")
            except FileNotFoundError:
                continue  # removed while listing: its rows are in a newer shard
            keys.append(shard_keys)
            shard_of.append(np.full(len(shard_keys), len(matrices), dtype=np.int32))
            row_of.append(np.arange(len(shard_keys), dtype=np.int64))
            matrices.append(matrix)
            names.append(shard)
        if not keys:
            return _View.empty(signature)
        all_keys = np.concatenate(keys)
        order = np.argsort(all_keys, kind="stable")
        return _View(signature, all_keys[order], np.concatenate(shard_of)[order], np.concatenate(row_of)[order],
                     matrices, int(matrices[0].shape[1]), tuple(names))

    def get(self, collection: str, pks: Iterable[int]) -> dict[int, np.ndarray]:
        """{pk: float32 feature} for the keys stored; keys not stored are left out."""
        wanted = np.fromiter(pks, dtype=np.int64)
        if not wanted.size:
            return {}
        view = self._view(collection)
        found = self._lookup(view, wanted)
        if len(found) < wanted.size:
            # A shard written since the view was made: the directory's change time has the
            # kernel's clock tick (milliseconds), so two renames within one tick look like one.
            if self.remote:
                self._sync(collection)
            if tuple(self._shards(collection)) != view.shards:
                signature = view.signature + ("relisted", time.monotonic_ns())
                view = self._load_view(collection, signature)
                with self._lock:
                    self._views[collection] = view
                found = self._lookup(view, wanted)
        return found

    @staticmethod
    def _lookup(view: _View, wanted: np.ndarray) -> dict[int, np.ndarray]:
        if not view.keys.size:
            return {}
        at = np.searchsorted(view.keys, wanted)
        at[at >= view.keys.size] = 0
        present = view.keys[at] == wanted
        wanted, at = wanted[present], at[present]
        out = np.empty((wanted.size, view.dim), dtype=np.float32)
        shards, rows = view.shard_of[at], view.row_of[at]
        for shard in np.unique(shards):
            mine = shards == shard
            out[mine] = view.matrices[shard][rows[mine]]
        return dict(zip(wanted.tolist(), out))

    def count(self, collection: str) -> int:
        return int(np.unique(self._view(collection).keys).size)

    def nbytes(self, collection: str) -> int:
        return sum(m.nbytes for m in self._view(collection).matrices)
