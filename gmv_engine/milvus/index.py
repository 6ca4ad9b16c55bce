"""The training index in Milvus. This is the only module that talks to Milvus.

Two collections per training set, both keyed by the same primary key:
- NAME: one row per training image: pk, training_id, contributor_id, content_hash, metadata
  (JSON) and the recall embedding, indexed with IVF_PQ. What built it (profile, encoder,
  re-ranker, dims) is recorded as JSON in the collection's description.
- The re-rank features (DreamSim embedding, or the pixels LPIPS/ℓ2 need), fetched by primary
  key for the K' recalled rows: in a feature store on disk (gmv_engine/feature_store.py:
  float16, memory-mapped, under a folder named in CollectionInfo.feature_store), or, for
  collections built without one, in the Milvus collection NAME__rerank (Milvus 2.3 allows one
  vector field per collection; a primary-key query for 100 rows takes 10-40 ms, and Milvus
  keeps the features in RAM as float32).

The primary key is derived from training_id (63 bits of its SHA-256), so a resumed ingest
can ask "is this training_id in?" by key, with no string escaping in filter expressions.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..settings import DEFAULTS
from ..errors import CollectionNotFoundError, GMVError, IncompatibleCollectionError, IndexUnavailableError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FEATURES_SUFFIX = "__rerank"
BLOCKED_SUFFIX = "__blocked"  # content hashes of removed contributors' images (milvus/erasure.py)
INFO_PROPERTY = "gmv.info"  # where CollectionInfo lives on servers that keep no description (Milvus Lite)
CALIBRATION_PROPERTY = "gmv.calibration"  # {reranker: Calibration} (gmv_engine/calibration.py)
MAX_TRAINING_ID = 1024
MAX_CONTRIBUTOR_ID = 256
# Attribution reads rows that never change once written, so it reads with Bounded consistency
# (Strong makes every search wait for a timestamp sync: ~200 ms a call on the embedded
# Milvus). "Is this row already in?" about recent writes needs Strong; Bounded sees every write
# older than Milvus' common.gracefulTime (5 s by default), which ingest uses for its lookups once
# its run is older than BOUNDED_LOOKUPS_AFTER_S (its own writes it remembers itself).
INGEST_CONSISTENCY = "Strong"
BOUNDED_LOOKUPS_AFTER_S = 10.0
# Milvus 2.3's segment sizes (dataCoord.segment.*, indexCoord.segment.*): written into the
# embedded Milvus' milvus.yaml (milvus/embedded.py) and the defaults of any other 2.3 server. A
# growing segment is sealed when Milvus' estimate of its size reaches SEGMENT_MAX_MB *
# SEAL_PROPORTION; each sealed segment gets an IVF index of its own (so nlist is chosen for the
# rows of one segment: segment_rows), except segments under MIN_INDEXED_ROWS rows, which are
# searched brute force.
SEGMENT_MAX_MB = 512
SEAL_PROPORTION = 0.23
MIN_INDEXED_ROWS = 1024
FETCH_BYTES = 48 << 20  # re-rank features per query of fetch_features()
FIRST_FETCH_ROWS = 512  # keys in a collection's first fetch, before its feature size is known
LOOKUP_KEYS = 4096  # primary keys per `get` of existing()
LOOKUP_HASHES = 4096  # hashes per `in` filter of existing_hashes() (a 270 KB filter: 35 ms on Milvus 2.3.5)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,180}$")

# A MilvusException's `code` -> the error GMV raises; any other code is IndexUnavailableError.
# Measured on the embedded Milvus 2.3.5 (tests/test_milvus_errors.py): describe_collection,
# query, search, get, load_collection, flush, describe_index, insert and upsert on a missing
# collection all give code 100 (legacy error_code 4, or 1 where pymilvus describes first).
ERROR_CODES: dict[int, type[GMVError]] = {100: CollectionNotFoundError}  # 100: CollectionNotFound
# Servers before 2.3.2 set no `code` (0), only the legacy error_code, read from `compatible_code`.
LEGACY_ERROR_CODES: dict[int, type[GMVError]] = {4: CollectionNotFoundError}  # 4: CollectionNotExists


def milvus_error_class(exc: BaseException) -> type[GMVError]:
    """The GMVError a failed Milvus call stands for, by the server's error code."""
    from pymilvus.exceptions import MilvusException

    if not isinstance(exc, MilvusException):
        return IndexUnavailableError  # grpc/connection errors surface as many types
    # pymilvus' retry wrapper puts a grpc.StatusCode (not an int) in `code` when it gives up.
    code, legacy = exc.code, exc.compatible_code
    if isinstance(code, int) and code:
        return ERROR_CODES.get(code, IndexUnavailableError)
    if isinstance(legacy, int):
        return LEGACY_ERROR_CODES.get(legacy, IndexUnavailableError)
    return IndexUnavailableError


def _varint(value: int) -> bytes:
    """A protobuf varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def training_pk(training_id: str) -> int:
    return int.from_bytes(hashlib.sha256(training_id.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class CollectionInfo:
    """What built a collection: the pipeline must embed and re-rank queries the same way."""

    profile: str
    encoder: str
    encoder_dim: int
    reranker: str
    feature_dim: int
    metric: str = "L2"
    schema_version: int = SCHEMA_VERSION
    # Where the re-rank features are: "" in Milvus (NAME__rerank), else this folder of the
    # feature store (unique per collection made: a store may be shared by several Milvus, and
    # a dropped and re-made collection must not see its predecessor's features). Not part of
    # how a collection was built, so not compared.
    feature_store: str = field(default="", compare=False)

    def to_json(self) -> str:
        return json.dumps({"gmv": asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CollectionInfo | None":
        try:
            data = json.loads(text)["gmv"]
            return cls(**data)
        except (ValueError, KeyError, TypeError):
            return None


INDEX_TYPES = ("IVF_PQ", "FLAT")


@dataclass(frozen=True)
class IndexParams:
    """IVF_PQ parameters. Zero means "choose from the row count and dim" (see `resolve`).
    index_type "FLAT" builds exact brute-force search instead: the reference an evaluation
    compares IVF_PQ's approximate recall against."""

    nlist: int = DEFAULTS.nlist
    m: int = DEFAULTS.m
    nbits: int = DEFAULTS.nbits
    index_type: str = DEFAULTS.index_type

    def resolve(self, rows: int, dim: int) -> "IndexParams":
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index type must be one of {INDEX_TYPES}, got '{self.index_type}'")
        # Each sealed segment is clustered on its own: lists are filled by one segment's rows.
        return IndexParams(
            nlist=self.nlist or default_nlist(min(rows, segment_rows(dim))),
            m=self.m or default_pq_m(dim),
            nbits=self.nbits,
            index_type=self.index_type,
        )


def segment_rows(dim: int) -> int:
    """Rows of a `dim`-d training collection in a segment when Milvus seals it: Milvus
    estimates a row as its fields' sizes, each VARCHAR at min(max_length, 256) bytes and JSON at
    512, plus 16 bytes of row id and timestamp (checked: 29,512 rows at 768-d on Milvus 2.3.5)."""
    row = 8 + min(MAX_TRAINING_ID, 256) + min(MAX_CONTRIBUTOR_ID, 256) + 64 + 512 + 4 * dim + 16
    return int(SEGMENT_MAX_MB * 2**20 * SEAL_PROPORTION) // row


def default_nlist(rows: int) -> int:
    # The usual 4*sqrt(N) lists, but at least ~39 training points per centroid for k-means.
    return int(max(1, min(65536, round(4 * math.sqrt(max(rows, 1))), rows // 39 or 1)))


def default_pq_m(dim: int) -> int:
    """Sub-quantizers of about 4 dimensions each (dim must divide evenly): fine enough that PQ
    keeps the true neighbours inside the K' recalled (measured in docs/BENCHMARKS.md)."""
    target = max(1, dim // 4)
    for m in range(target, 0, -1):
        if dim % m == 0:
            return m
    return 1


@dataclass
class Hit:
    pk: int
    training_id: str
    contributor_id: str
    distance: float  # ℓ2 in the recall embedding space


@dataclass
class TrainingRow:
    training_id: str
    contributor_id: str
    content_hash: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def pk(self) -> int:
        return training_pk(self.training_id)


def is_lite_uri(uri: str) -> bool:
    return not uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:"))


class TrainingIndex:
    """All Milvus calls. Construct with any Milvus URI: embedded, standalone or cluster."""

    def __init__(self, uri: str, token: str = "", timeout_s: float = 30.0, feature_store: str | None = None,
                 feature_cache_dir: str | None = None):
        """feature_store: where new collections keep their re-rank features, and where those of
        collections that keep them in a store are found (a directory or a pyarrow filesystem
        URI; gmv_engine/feature_store.py); None: in Milvus (NAME__rerank)."""
        from pymilvus import MilvusClient

        from ..feature_store import FeatureStore

        # pymilvus logs every failed RPC with a traceback (its logging config is applied on
        # import, so this must follow it); we wrap those errors in clear ones instead.
        logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
        self.uri = uri
        self.timeout_s = timeout_s
        # Told of every Milvus call: (operation, seconds, error or None); a server's metrics.
        self.call_observer: Callable[[str, float, BaseException | None], None] | None = None
        self.lite = is_lite_uri(uri)
        self.embedded = None  # the EmbeddedMilvus this index was opened on, if any: gmv serve supervises it
        self._feature_dims: dict[str, int] = {}  # collection -> its re-rank feature's size, as fetched
        self.feature_store = FeatureStore(feature_store, feature_cache_dir) if feature_store else None
        self._feature_folders: dict[str, str] = {}  # collection -> its folder in the store, "" for Milvus
        if self.lite:
            try:
                import milvus_lite  # noqa: F401
            except ImportError:
                raise IndexUnavailableError(
                    f"'{uri}' is a Milvus Lite file URI, but milvus-lite is not installed "
                    "(`pip install milvus-lite`); note that Lite cannot build IVF_PQ, so GMV would use IVF_FLAT. "
                    "Use an http:// URI for a Milvus server, or omit --milvus-uri for the embedded one."
                ) from None
        try:
            self.client = MilvusClient(uri=uri, token=token, timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - pymilvus raises several types for "cannot connect"
            raise IndexUnavailableError(f"cannot connect to Milvus at {uri}: {exc}") from exc

    def close(self) -> None:
        self.client.close()

    # -- errors ---------------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs):
        """Every Milvus call: errors made clear, and each call reported to `call_observer`
        (operation = the pymilvus method's name, seconds, the error raised or None)."""
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            return self._call_unobserved(what, fn, *args, **kwargs)
        except Exception as exc:
            error = exc
            raise
        finally:
            if self.call_observer is not None:
                self.call_observer(getattr(fn, "__name__", what), time.perf_counter() - start, error)

    def _call_unobserved(self, what: str, fn, *args, **kwargs):
        from pymilvus.exceptions import MilvusException

        try:
            return fn(*args, **kwargs)
        except GMVError:
            raise
        except MilvusException as exc:
            if milvus_error_class(exc) is CollectionNotFoundError:
                raise CollectionNotFoundError(f"{what}: {exc.message}") from exc
            raise IndexUnavailableError(f"Milvus at {self.uri} failed to {what}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - grpc/connection errors surface as many types
            raise IndexUnavailableError(f"Milvus at {self.uri} failed to {what}: {type(exc).__name__}: {exc}") from exc

    # -- collections ----------------------------------------------------------------------
    @staticmethod
    def check_name(name: str) -> None:
        if not _NAME.match(name):
            raise ValueError(
                f"collection name '{name}' is not valid: use letters, digits and underscores, starting with a letter"
            )

    def exists(self, name: str) -> bool:
        return bool(self._call("list collections", self.client.has_collection, name))

    def ping(self, name: str, timeout_s: float) -> bool:
        """Whether Milvus answers within timeout_s (a cheap call; a health probe)."""
        return bool(self._call("list collections", self.client.has_collection, name, timeout=timeout_s))

    def list_collections(self) -> list[str]:
        names = self._call("list collections", self.client.list_collections)
        return sorted(n for n in names if not n.endswith((FEATURES_SUFFIX, BLOCKED_SUFFIX)))

    def info(self, name: str) -> CollectionInfo:
        if not self.exists(name):
            raise CollectionNotFoundError(
                f"collection '{name}' does not exist in Milvus at {self.uri}; build it with `gmv index build`"
            )
        description = self._call("describe collection", self.client.describe_collection, name)
        info = CollectionInfo.from_json(description.get("description", "")
                                        or (description.get("properties") or {}).get(INFO_PROPERTY, ""))
        if info is None:
            raise IncompatibleCollectionError(f"collection '{name}' was not built by GMV (no GMV description)")
        return info

    def create(self, name: str, info: CollectionInfo, params: IndexParams, expected_rows: int,
               load_new: bool = True) -> bool:
        """Create both collections with their indexes, and load them; True when they were made
        now, False when they existed (and are loaded). An existing collection must have been
        built the same way. The IVF_PQ index is declared now (Milvus builds it per sealed
        segment) with parameters resolved from the rows expected, because Milvus 2.3 only
        loads, and so only queries, an indexed collection. load_new=False leaves new
        collections unloaded: inserts need no load, and finish() loads them once indexed, so
        the query node never holds their rows unindexed (ingest: seconds saved twice over)."""
        from pymilvus import DataType, MilvusClient

        self.check_name(name)
        self._feature_dims.pop(name, None)
        self._feature_folders.pop(name, None)
        if self.exists(name):
            existing = self.info(name)
            if existing != info:
                raise IncompatibleCollectionError(
                    f"collection '{name}' exists and was built with {existing}; this build asks for {info}. "
                    "Use another --collection name, or the same profile/encoder/re-ranker."
                )
            self.load(name)
            return False
        if info.feature_dim and self.feature_store is not None:
            info = replace(info, feature_store=f"{name}.{uuid.uuid4().hex[:12]}")
        elif info.feature_dim:
            features = MilvusClient.create_schema(auto_id=False, description=f"re-rank features of {name}")
            features.add_field("pk", DataType.INT64, is_primary=True)
            features.add_field("feature", DataType.FLOAT_VECTOR, dim=info.feature_dim)
            # Features are fetched by key, never searched: FLAT costs nothing to build.
            feature_index = self.client.prepare_index_params()
            feature_index.add_index(field_name="feature", index_type="FLAT", metric_type="L2")
            # Created without index_params, which would load it (seconds): load() loads both at once.
            self._call("create collection", self.client.create_collection, name + FEATURES_SUFFIX,
                       schema=features, consistency_level="Bounded")
            self._call("create index", self.client.create_index, name + FEATURES_SUFFIX, feature_index)
        schema = MilvusClient.create_schema(auto_id=False, description=info.to_json())
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("training_id", DataType.VARCHAR, max_length=MAX_TRAINING_ID)
        schema.add_field("contributor_id", DataType.VARCHAR, max_length=MAX_CONTRIBUTOR_ID)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=info.encoder_dim)
        resolved = params.resolve(expected_rows, info.encoder_dim)
        index_type = "FLAT" if resolved.index_type == "FLAT" else self.index_type_for_server()
        if index_type == "IVF_PQ":
            build = {"nlist": resolved.nlist, "m": resolved.m, "nbits": resolved.nbits}
        elif index_type == "FLAT":
            build = {}  # exact search: nothing to train
        else:
            log.warning("Milvus Lite cannot build IVF_PQ; building %s (nlist=%d) instead", index_type, resolved.nlist)
            build = {"nlist": resolved.nlist}
        index_params = self.client.prepare_index_params()
        index_params.add_index(field_name="embedding", index_type=index_type, metric_type=info.metric, params=build)
        # The main collection last: its existence is what marks the pair as created.
        self._call("create collection", self.client.create_collection, name, schema=schema,
                   consistency_level="Bounded")
        self._call("create index", self.client.create_index, name, index_params)
        if self.lite:  # Milvus Lite keeps no collection description: the same JSON as a property
            self._call("alter collection", self.client.alter_collection_properties, name,
                       properties={INFO_PROPERTY: info.to_json()})
        if load_new:
            self.load(name)
        return True

    def drop(self, name: str) -> None:
        self._feature_dims.pop(name, None)
        folder = self._feature_folder(name, required=False) if self.exists(name) else ""
        self._feature_folders.pop(name, None)
        for collection in (name + FEATURES_SUFFIX, name + BLOCKED_SUFFIX, name):
            if self._call("list collections", self.client.has_collection, collection):
                self._call("drop collection", self.client.drop_collection, collection)
        if folder and self.feature_store is not None:
            self.feature_store.drop(folder)

    # -- ingest ---------------------------------------------------------------------------
    def existing(self, name: str, training_ids: Sequence[str], consistency: str = INGEST_CONSISTENCY) -> dict[str, str]:
        """training_id -> content_hash for those already in the collection (any number of ids:
        LOOKUP_KEYS a call)."""
        found: dict[str, str] = {}
        ids = sorted(set(training_ids))
        for start in range(0, len(ids), LOOKUP_KEYS):
            rows = self._call(
                "look up training ids", self.client.get, name,
                ids=[training_pk(t) for t in ids[start:start + LOOKUP_KEYS]],
                output_fields=["training_id", "content_hash"], consistency_level=consistency,
            )
            found.update((row["training_id"], row["content_hash"]) for row in rows)
        return found

    def existing_hashes(self, name: str, content_hashes: Sequence[str],
                        consistency: str = INGEST_CONSISTENCY) -> dict[str, str]:
        """content_hash -> training_id for images already in the collection (hex, so safe to
        quote; any number of hashes: LOOKUP_HASHES a call)."""
        hashes = sorted(set(content_hashes))
        assert all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes)
        found: dict[str, str] = {}
        for start in range(0, len(hashes), LOOKUP_HASHES):
            rows = self._call(
                "look up content hashes", self.client.query, name,
                filter=f"content_hash in {json.dumps(hashes[start:start + LOOKUP_HASHES])}",
                output_fields=["training_id", "content_hash"], consistency_level=consistency,
            )
            found.update((row["content_hash"], row["training_id"]) for row in rows)
        return found

    def insert(self, name: str, rows: Sequence[TrainingRow], embeddings: np.ndarray, features: np.ndarray) -> None:
        """Insert one batch. Features go first: a main row is only ever visible with its feature."""
        if not rows:
            return
        self.insert_features(name, [row.pk for row in rows], features)
        self.insert_rows(name, rows, embeddings)

    def insert_features(self, name: str, pks: Sequence[int], features: np.ndarray, replace: bool = True) -> None:
        """Store the re-rank features of these keys; call before insert_rows() for the same rows.
        replace (an upsert): a run cut off between the two inserts may have left features of
        these keys. Only a caller that made the collection itself and inserts each key once
        may pass False (a plain insert: Milvus skips an upsert's delete, ~15% of its work)."""
        if not len(pks) or not features.shape[1]:
            return
        folder = self._feature_folder(name)
        if folder:
            self.feature_store.append(folder, pks, features)
            return
        stub = self._grpc_stub()
        if stub is not None:
            self._call("insert re-rank features", self._write_vectors, stub, name + FEATURES_SUFFIX, "feature",
                       list(pks), features, replace)
            return
        self._call("insert re-rank features", self.client.upsert if replace else self.client.insert,
                   name + FEATURES_SUFFIX,
                   [{"pk": pk, "feature": vector} for pk, vector in zip(pks, features.astype(np.float32).tolist())])

    def delete_features(self, name: str, pks: Sequence[int]) -> None:
        """Delete these keys' re-rank features (a contributor's opt-out)."""
        folder = self._feature_folder(name)
        if folder:
            self.feature_store.remove(folder, pks)
        else:
            self._call("delete re-rank features", self.client.delete, name + FEATURES_SUFFIX, ids=list(pks))

    def _feature_folder(self, name: str, required: bool = True) -> str:
        """The collection's folder in the feature store, or "" when its features are in Milvus
        (required: fail clearly when they are in a store and none is configured here)."""
        folder = self._feature_folders.get(name)
        if folder is None:
            try:
                folder = self.info(name).feature_store
            except IncompatibleCollectionError:
                if required:
                    raise
                return ""
            self._feature_folders[name] = folder
        if folder and self.feature_store is None and required:
            raise IndexUnavailableError(
                f"collection '{name}' keeps its re-rank features in a feature store (folder '{folder}'), but no "
                "store is configured here: set feature_store (--feature-store, GMV_FEATURE_STORE) to the one it "
                "was built with")
        return folder

    def _grpc_stub(self):
        """pymilvus' stub of Milvus' gRPC service (pymilvus 2.4 to 3.x), or None: Milvus Lite, a
        URI naming a database (the stub would write to the default one), or a pymilvus laid out
        otherwise (then the caller uses MilvusClient's API)."""
        from urllib.parse import urlparse

        if self.lite or urlparse(self.uri).path.strip("/"):
            return None
        try:
            stub = self.client._get_connection()._stub
        except Exception:  # noqa: BLE001 - any layout but the known one: use the public API
            return None
        return stub if hasattr(stub, "Upsert") and hasattr(stub, "Insert") else None

    def _write_vectors(self, stub, collection: str, field: str, pks: list[int], vectors: np.ndarray,
                       replace: bool) -> None:
        """Upsert (or insert) (pk, vector) rows with one request built from the arrays, the
        vectors as their raw little-endian floats. pymilvus' row API turns each float into a Python object and
        back (~0.2 ms of held GIL per 3,072-float row: a third of ingest's own CPU on 2 cores).
        The request is Milvus' public UpsertRequest (InsertRequest), sent through the client's
        own stub, so the same channel, credentials and TLS."""
        from pymilvus.exceptions import MilvusException
        from pymilvus.grpc_gen import milvus_pb2, schema_pb2

        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        request = (milvus_pb2.UpsertRequest if replace else milvus_pb2.InsertRequest)(collection_name=collection,
                                                                                      num_rows=len(pks))
        keys = request.fields_data.add(field_name="pk", type=schema_pb2.DataType.Int64)
        keys.scalars.long_data.data.extend(pks)
        column = request.fields_data.add(field_name=field, type=schema_pb2.DataType.FloatVector)
        column.vectors.dim = vectors.shape[1]
        raw = vectors.tobytes()
        column.vectors.float_vector.MergeFromString(b"\x0a" + _varint(len(raw)) + raw)  # FloatArray.data, packed
        status = (stub.Upsert if replace else stub.Insert)(request, timeout=self.timeout_s).status
        if status.code or status.error_code:
            raise MilvusException(code=status.code, message=status.reason, compatible_code=status.error_code)

    def insert_rows(self, name: str, rows: Sequence[TrainingRow], embeddings: np.ndarray) -> None:
        """Insert training rows (their features stored already: insert_features)."""
        if not rows:
            return
        data = [
            {
                "pk": row.pk,
                "training_id": row.training_id,
                "contributor_id": row.contributor_id,
                "content_hash": row.content_hash,
                "metadata": row.metadata,
                "embedding": vector,
            }
            for row, vector in zip(rows, embeddings.astype(np.float32).tolist())
        ]
        self._call("insert training rows", self.client.insert, name, data)

    def count(self, name: str) -> int:
        rows = self._call("count rows", self.client.query, name, filter="", output_fields=["count(*)"],
                          consistency_level=INGEST_CONSISTENCY)
        return int(rows[0]["count(*)"])

    # -- index ----------------------------------------------------------------------------
    def index_type_for_server(self) -> str:
        return "IVF_FLAT" if self.lite else "IVF_PQ"

    def finish(self, name: str, timeout_s: float = 1800.0, progress=None) -> dict:
        """Flush (seal) what was inserted, wait until Milvus has indexed every row, then until
        searches are served by that index (wait_served), then until Bounded reads (what
        attribution uses) see every row: for a few seconds after a write they may not, and a
        search or feature fetch then would silently miss new rows."""
        deadline = time.monotonic() + timeout_s
        self._call("flush", self.client.flush, name)
        names = [name] + self._feature_collections(name)
        for collection in names[1:]:
            self._call("flush", self.client.flush, collection)
        if self._feature_folder(name):
            self.feature_store.compact(self._feature_folder(name))
        state = self.wait_for_index(name, timeout_s, progress)
        self.load(name)  # a collection made unloaded (create(load_new=False)) loads its indexed segments now
        self.wait_served(name, timeout_s=max(1.0, deadline - time.monotonic()))
        for collection in names:
            self.wait_visible(collection, timeout_s=60.0)
        return state

    def wait_served(self, name: str, timeout_s: float) -> None:
        """Wait until every sealed segment that Milvus indexes is loaded with its index.

        An index that is built is not yet one that serves: the query node keeps serving a
        segment as it was loaded (growing rows, or sealed rows without their index, searched
        brute force or through Milvus' interim index, whatever nprobe asks) until the query
        coordinator hands the indexed segment over, which Milvus 2.3 does on timers of 10 s
        (the embedded Milvus' are set to about a second: milvus/embedded.py). Segments under
        MIN_INDEXED_ROWS rows are never indexed and are searched exactly however they are served."""
        if self.lite or (self.index_state(name)["index_type"] or "FLAT") == "FLAT":
            return  # Lite has no query nodes to hand over; FLAT is exact search however it is served
        if not all(hasattr(self.client, m) for m in ("list_persistent_segments", "list_loaded_segments")):
            log.info("this pymilvus cannot list segments: not waiting for '%s' to be served by its index", name)
            return
        deadline = time.monotonic() + timeout_s
        while True:
            lagging = self.segments_not_served(name)
            if not lagging:
                return
            if time.monotonic() > deadline:
                raise IndexUnavailableError(f"the index of '{name}' was built but does not yet serve searches after "
                                            f"{timeout_s:.0f} s: {lagging}")
            time.sleep(0.25)

    def segments_not_served(self, name: str) -> list[str]:
        """What still keeps the built index from serving: each persisted segment of at least
        MIN_INDEXED_ROWS rows that the query nodes have not loaded, or loaded without an index."""
        persisted = self._call("list segments", self.client.list_persistent_segments, name)
        loaded = {segment.segment_id: segment
                  for segment in self._call("list loaded segments", self.client.list_loaded_segments, name)}
        lagging = []
        for segment in persisted:
            if segment.num_rows < MIN_INDEXED_ROWS or getattr(segment, "level_name", "") == "L0":
                continue  # too small to index; or (Milvus 2.4+) deletes only, never loaded as rows
            served = loaded.get(segment.segment_id)
            if served is None:
                lagging.append(f"segment {segment.segment_id} ({segment.num_rows} rows) not loaded yet")
            elif not served.index_id:
                lagging.append(f"segment {segment.segment_id} ({segment.num_rows} rows) loaded without its index")
        return lagging

    def wait_visible(self, name: str, timeout_s: float) -> None:
        """Wait until a Bounded-consistency count sees every row a Strong one does (loaded collection)."""
        expected = self.count(name)
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self._call("count rows", self.client.query, name, filter="", output_fields=["count(*)"],
                              consistency_level="Bounded")
            if int(rows[0]["count(*)"]) >= expected:
                return
            if time.monotonic() > deadline:
                raise IndexUnavailableError(f"'{name}' still shows fewer than {expected} rows to searches "
                                            f"after {timeout_s:.0f} s")
            time.sleep(0.5)

    def wait_for_index(self, name: str, timeout_s: float, progress=None) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.index_state(name)
            if progress:
                progress(state)
            if state["indexed_rows"] >= state["total_rows"] and state["pending_index_rows"] == 0:
                # No rows indexed may mean none flushed yet, or none at all (stats need no load).
                if state["total_rows"] > 0 or self.flushed_rows(name) == 0:
                    return state
            if state["state"] == "Failed":
                raise IndexUnavailableError(f"Milvus failed to build the index of '{name}': {state}")
            if time.monotonic() > deadline:
                raise IndexUnavailableError(f"the index of '{name}' was not built within {timeout_s:.0f} s: {state}")
            time.sleep(0.5)

    def flushed_rows(self, name: str) -> int:
        """Rows Milvus has persisted (deleted ones included until compaction); no load needed."""
        stats = self._call("count rows", self.client.get_collection_stats, name)
        return int(stats.get("row_count", 0))

    def index_state(self, name: str) -> dict:
        described = self._call("describe index", self.client.describe_index, name, "embedding")
        if not described:
            return {"index_type": None, "state": "None", "total_rows": self.count(name), "indexed_rows": 0,
                    "pending_index_rows": 0, "params": {}}
        params = {k: described[k] for k in ("nlist", "m", "nbits") if k in described}
        return {
            "index_type": described.get("index_type"),
            "metric_type": described.get("metric_type"),
            "state": described.get("state"),
            "total_rows": int(described.get("total_rows", 0)),
            "indexed_rows": int(described.get("indexed_rows", 0)),
            "pending_index_rows": int(described.get("pending_index_rows", 0)),
            "params": {k: int(v) for k, v in params.items()},
        }

    def _feature_collections(self, name: str) -> list[str]:
        """[NAME__rerank] where the features are kept in Milvus, else []."""
        info = self.info(name)
        return [name + FEATURES_SUFFIX] if info.feature_dim and not info.feature_store else []

    def load(self, name: str) -> None:
        """Load the collection and its re-rank features, both at once (a new collection takes
        seconds to load; one loaded already, milliseconds)."""
        names = [name] + self._feature_collections(name)
        with ThreadPoolExecutor(len(names), thread_name_prefix="gmv-load") as pool:
            loads = [pool.submit(self._call, "load collection", self.client.load_collection, each) for each in names]
            for done in loads:
                done.result()

    # -- query ----------------------------------------------------------------------------
    def search(self, name: str, vectors: np.ndarray, limit: int, nprobe: int) -> list[list[Hit]]:
        """The `limit` nearest training rows of each vector (approximate: IVF_PQ)."""
        params = {"metric_type": "L2", "params": {"nprobe": nprobe}}
        results = self._call(
            f"search '{name}'", self.client.search, name,
            data=vectors.astype(np.float32).tolist(), limit=limit, search_params=params,
            output_fields=["training_id", "contributor_id"],
        )
        return [
            [
                # The key is `id` from Milvus 2.3 and 2.4, the key field's name (`pk`) from Lite 3.x.
                Hit(pk=int(hit["id"] if "id" in hit else hit["pk"]), training_id=hit["entity"]["training_id"],
                    contributor_id=hit["entity"]["contributor_id"],
                    distance=float(math.sqrt(max(hit["distance"], 0.0))))  # Milvus L2 is squared
                for hit in hits
            ]
            for hits in results
        ]

    def sample_rows(self, name: str, count: int, seed: int = 0) -> dict[int, np.ndarray]:
        """{pk: embedding} of up to `count` training rows, chosen reproducibly from (at most) the
        first 16,384 keys Milvus returns: enough spread to calibrate on, one bounded query."""
        from ..calibration import sample_keys

        rows = self._call(f"list keys of '{name}'", self.client.query, name, filter="", output_fields=["pk"],
                          limit=16384)
        chosen = sample_keys([int(row["pk"]) for row in rows], count, seed)
        if not chosen:
            return {}
        found = self._call(f"fetch embeddings of '{name}'", self.client.query, name, filter=f"pk in {chosen}",
                           output_fields=["embedding"])
        return {int(row["pk"]): np.asarray(row["embedding"], dtype=np.float32) for row in found}

    def calibrations(self, name: str) -> dict:
        """{reranker name: Calibration} stored with the collection."""
        from ..calibration import Calibration

        description = self._call("describe collection", self.client.describe_collection, name)
        try:
            stored = json.loads((description.get("properties") or {}).get(CALIBRATION_PROPERTY, "{}"))
        except ValueError:
            return {}
        found = {reranker: Calibration.from_dict(data) for reranker, data in stored.items() if isinstance(data, dict)}
        return {reranker: calibration for reranker, calibration in found.items() if calibration is not None}

    def save_calibration(self, name: str, calibration) -> None:
        """Store (replace) the calibration of one re-ranker, keeping the others'."""
        stored = {reranker: c.to_dict() for reranker, c in self.calibrations(name).items()}
        stored[calibration.reranker] = calibration.to_dict()
        self._call("alter collection", self.client.alter_collection_properties, name,
                   properties={CALIBRATION_PROPERTY: json.dumps(stored, sort_keys=True)})

    def fetch_features(self, name: str, pks: Iterable[int]) -> dict[int, np.ndarray]:
        """{pk: feature} of those keys, in queries of up to FETCH_BYTES of features each (Milvus
        refuses a query whose result passes quotaAndLimits.limits.maxOutputSize, 100 MB by
        default: a calibration fetches some 20,000 features). A collection's first fetch asks
        for FIRST_FETCH_ROWS keys, which tells its feature size."""
        pks = sorted(set(pks))
        folder = self._feature_folder(name)
        if folder:
            found = self.feature_store.get(folder, pks)
            if pks and not found and not self.feature_store.count(folder):
                raise IndexUnavailableError(
                    f"the feature store at {self.feature_store.uri} has no re-rank features of '{name}' (folder "
                    f"'{folder}'): is feature_store set to the store it was built with?")
            return found
        found: dict[int, np.ndarray] = {}
        start = 0
        while start < len(pks):
            dim = self._feature_dims.get(name)
            page = max(1, FETCH_BYTES // (4 * dim)) if dim else FIRST_FETCH_ROWS
            chunk = pks[start:start + page]
            rows = self._call(f"fetch re-rank features of '{name}'", self.client.query, name + FEATURES_SUFFIX,
                              filter=f"pk in {chunk}", output_fields=["feature"])
            for row in rows:
                found[int(row["pk"])] = feature = np.asarray(row["feature"], dtype=np.float32)
                self._feature_dims[name] = max(1, feature.shape[0])
            start += len(chunk)
        return found
