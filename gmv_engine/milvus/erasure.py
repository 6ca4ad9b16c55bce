"""Contributors' opt-out: removing every training image of a contributor from a collection.

What a removal does, in this order, so that no step can leave a removed contributor credited:
1. The contributor is marked removed in the collection's `gmv.removals` property, and its
   version goes up. Servers watch that version (every milvus_probe_s) and from then on drop the
   contributor's hits before re-ranking, whether or not Milvus' delete is visible to searches yet.
2. The content hash of every image is put on the collection's blocklist (a small companion
   collection), so a re-ingest of the same images is refused and reported.
3. The rows are deleted from the recall index and their features from the re-rank store.
Running it again finishes a removal that was interrupted. Past ledger records stay: they are
the audit trail of what was credited before.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from ..errors import InvalidArgumentError
from .index import (BLOCKED_SUFFIX, INGEST_CONSISTENCY, MAX_CONTRIBUTOR_ID, TrainingIndex,
                    training_pk)

REMOVALS_PROPERTY = "gmv.removals"
PAGE = 4096  # rows read or deleted per call


@dataclass(frozen=True)
class Removal:
    contributor_id: str
    removed_at: float  # unix seconds, when first marked
    rows: int  # training images removed (over every run of the removal)
    hashes_blocked: int


@dataclass(frozen=True)
class Removals:
    version: int = 0
    contributors: dict[str, Removal] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({"version": self.version,
                           "contributors": {c: asdict(r) for c, r in sorted(self.contributors.items())}},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Removals":
        try:
            data = json.loads(text or "{}")
            return cls(int(data.get("version", 0)),
                       {c: Removal(**r) for c, r in (data.get("contributors") or {}).items()})
        except (ValueError, TypeError, AttributeError):
            return cls()


def removals(index: TrainingIndex, name: str) -> Removals:
    """The collection's removed contributors and their version (0: none ever removed)."""
    description = index._call("describe collection", index.client.describe_collection, name)
    return Removals.from_json((description.get("properties") or {}).get(REMOVALS_PROPERTY, ""))


def _save(index: TrainingIndex, name: str, state: Removals) -> None:
    index._call("alter collection", index.client.alter_collection_properties, name,
                properties={REMOVALS_PROPERTY: state.to_json()})


def _ensure_blocklist(index: TrainingIndex, name: str) -> str:
    from pymilvus import DataType, MilvusClient

    blocked = name + BLOCKED_SUFFIX
    if not index._call("list collections", index.client.has_collection, blocked):
        schema = MilvusClient.create_schema(auto_id=False, description=f"content hashes refused by {name}")
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("content_hash", DataType.VARCHAR, max_length=64)
        schema.add_field("contributor_id", DataType.VARCHAR, max_length=MAX_CONTRIBUTOR_ID)
        # Milvus wants a vector field in every collection; this one is never searched.
        schema.add_field("unused", DataType.FLOAT_VECTOR, dim=2)
        params = index.client.prepare_index_params()
        params.add_index(field_name="unused", index_type="FLAT", metric_type="L2")
        index._call("create collection", index.client.create_collection, blocked, schema=schema,
                    index_params=params, consistency_level="Strong")
    index._call("load collection", index.client.load_collection, blocked)
    return blocked


def remove_contributor(index: TrainingIndex, name: str, contributor_id: str) -> Removal:
    """Remove every training image of `contributor_id` from collection `name` (see the module)."""
    if not contributor_id or len(contributor_id) > MAX_CONTRIBUTOR_ID:
        raise InvalidArgumentError(f"contributor_id must have 1 to {MAX_CONTRIBUTOR_ID} characters")
    info = index.info(name)  # CollectionNotFoundError for an unknown collection
    state = removals(index, name)
    earlier = state.contributors.get(contributor_id)
    marked = Removal(contributor_id, earlier.removed_at if earlier else time.time(),
                     earlier.rows if earlier else 0, earlier.hashes_blocked if earlier else 0)
    state = Removals(state.version + 1, {**state.contributors, contributor_id: marked})
    _save(index, name, state)  # 1: servers stop crediting at their next look
    blocked = _ensure_blocklist(index, name)
    quoted = json.dumps(contributor_id)  # a JSON string is a valid Milvus string literal
    rows = index._call("list the contributor's rows", index.client.query, name,
                       filter=f"contributor_id == {quoted}", output_fields=["pk", "content_hash"],
                       consistency_level="Strong", limit=16384)
    removed = hashes = 0
    while rows:
        hashes += len(rows)
        index._call("block content hashes", index.client.upsert, blocked, [
            {"pk": training_pk(row["content_hash"]), "content_hash": row["content_hash"],
             "contributor_id": contributor_id, "unused": [0.0, 0.0]} for row in rows])  # 2
        pks = [int(row["pk"]) for row in rows]
        for first in range(0, len(pks), PAGE):  # 3
            page = pks[first:first + PAGE]
            if info.feature_dim:
                index.delete_features(name, page)
            index._call("delete training rows", index.client.delete, name, ids=page)
        removed += len(pks)
        rows = index._call("list the contributor's rows", index.client.query, name,
                           filter=f"contributor_id == {quoted}", output_fields=["pk", "content_hash"],
                           consistency_level="Strong", limit=16384)
    index._call("flush", index.client.flush, name)
    done = Removal(contributor_id, marked.removed_at, marked.rows + removed, marked.hashes_blocked + hashes)
    latest = removals(index, name)
    _save(index, name, Removals(latest.version + 1, {**latest.contributors, contributor_id: done}))
    return done


def blocked_hashes(index: TrainingIndex, name: str, content_hashes) -> dict[str, str]:
    """content_hash -> the removed contributor it belonged to, for those on the blocklist."""
    hashes = sorted(set(content_hashes))
    blocked = name + BLOCKED_SUFFIX
    if not hashes or not index._call("list collections", index.client.has_collection, blocked):
        return {}
    index._call("load collection", index.client.load_collection, blocked)
    rows = index._call("look up blocked hashes", index.client.get, blocked,
                       ids=[training_pk(h) for h in hashes], output_fields=["content_hash", "contributor_id"],
                       consistency_level=INGEST_CONSISTENCY)
    return {row["content_hash"]: row["contributor_id"] for row in rows if row["content_hash"] in hashes}


def contributor_counts(index: TrainingIndex, name: str) -> dict[str, int]:
    """contributor_id -> training images in the collection now."""
    counts: dict[str, int] = {}
    iterator = index._call("list contributors", index.client.query_iterator, name, batch_size=PAGE,
                           output_fields=["contributor_id"])
    try:
        while True:
            page = iterator.next()
            if not page:
                break
            for row in page:
                counts[row["contributor_id"]] = counts.get(row["contributor_id"], 0) + 1
    finally:
        iterator.close()
    return counts
