"""A tamper-evident ledger: Merkle trees per month, signed checkpoints and inclusion proofs.

Every generation record is a leaf. Its leaf bytes are a canonical JSON encoding of the whole
record (the generation row and all its credits); the ledger stores the leaf's hash in the
record's own row, written in the same INSERT, so recording needs no coordination between rows
and replicas keep writing in parallel. A hash chain would make every writer wait for the one
before it; a tree per period needs nothing until the period is over.

Once a calendar month (UTC, by `recorded_at`) is over, `gmv ledger seal` builds its tree with
the hashing of Certificate Transparency (RFC 6962, RFC 9162 section 2.1): leaf hash =
SHA-256(0x00 || leaf bytes), node hash = SHA-256(0x01 || left || right), a tree of n leaves
split at the largest power of two below n. Leaves are ordered by (recorded_at, tenant_id,
generation_id), compared as Python compares them (code points, not a database collation). The
checkpoint (period, record count, credit totals, root hash) is signed with Ed25519.

A third party needs only this file's `check_proof` (hashlib, json, base64 and the
`cryptography` package) and the ledger's public key to check that a generation is in a
sealed month exactly as recorded. Nothing here imports the rest of GMV.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Sequence

CHECKPOINT_FORMAT = "gmv-ledger-checkpoint/1"
PROOF_FORMAT = "gmv-inclusion-proof/1"
# A month is sealed only this long after it ended: a record stamped just before midnight may
# still be on its way into the database (stamping happens before the transaction).
SEAL_GRACE_S = 3600.0


class ProofError(ValueError):
    """A proof, checkpoint or signature that does not verify; the message says which part."""


class KeyFileError(ValueError):
    """A key file that is missing, already there (keys are never overwritten) or not a key."""


# -- Merkle trees (RFC 6962 / RFC 9162 section 2.1) -------------------------------------------

def hash_leaf(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


EMPTY_ROOT = hashlib.sha256(b"").digest()  # MTH({}): the root of a month with no records


def merkle_root(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of the leaves (given as their leaf hashes). Computed level by level: pairing nodes
    left to right and carrying an odd last node up unchanged gives the RFC's tree, whose left
    subtree is always the largest power of two below n."""
    if not leaf_hashes:
        return EMPTY_ROOT
    level = list(leaf_hashes)
    while len(level) > 1:
        paired = [hash_children(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def audit_path(index: int, leaf_hashes: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]): the sibling hashes from the leaf up to the root (RFC 9162 2.1.3.1)."""
    if not 0 <= index < len(leaf_hashes):
        raise IndexError(f"leaf {index} of a tree of {len(leaf_hashes)}")
    path, level = [], list(leaf_hashes)
    while len(level) > 1:
        sibling = index ^ 1
        if sibling < len(level):  # a carried last node has no sibling at this level
            path.append(level[sibling])
        paired = [hash_children(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level, index = paired, index >> 1
    return path


def root_from_path(index: int, tree_size: int, leaf_hash: bytes, path: Sequence[bytes]) -> bytes:
    """The root an inclusion proof leads to (RFC 9162 2.1.3.2); ProofError when the path
    cannot belong to a tree of that size."""
    if not 0 <= index < tree_size:
        raise ProofError(f"leaf index {index} is outside a tree of {tree_size}")
    fn, sn, node = index, tree_size - 1, leaf_hash
    for sibling in path:
        if sn == 0:
            raise ProofError("the audit path is longer than the tree is deep")
        if fn & 1 or fn == sn:
            node = hash_children(sibling, node)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            node = hash_children(node, sibling)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("the audit path is shorter than the tree is deep")
    return node


# -- what is hashed ---------------------------------------------------------------------------
#
# The leaf bytes of a generation record, all integers and floats big-endian:
#   "GMVL1"                                       5 bytes, the format
#   str tenant_id, str generation_id, f64 recorded_at, str collection, str profile,
#   str settings_hash, str image_sha256, f64 quality, u32 number of credits,
#   then per credit in rank order: u32 rank, str training_id, str contributor_id, f64 credit, f64 distance
# where str is a u32 byte length and the UTF-8 bytes, f64 an IEEE 754 double. Every column of
# the generation row and of its credit rows is in it, exactly (doubles as the database stores
# them), with lengths so no two records encode alike. Binary and not canonical JSON: printing
# 22 floats as shortest-repr text cost 4x the rest of the hashing (docs/LEDGER.md).

LEAF_MAGIC = b"GMVL1"
_U32 = struct.Struct(">I").pack
_F64 = struct.Struct(">d").pack
_F64_U32 = struct.Struct(">dI").pack
_U32_U32 = struct.Struct(">II").pack
_F64_F64 = struct.Struct(">dd").pack


def leaf_bytes(record) -> bytes:
    """The leaf bytes of a record with the attributes of gmv_engine.ledger.GenerationRecord
    (its credits with those of gmv_engine.credit.Credit)."""
    parts = [LEAF_MAGIC]
    add = parts.append
    for text in (record.tenant_id, record.generation_id):
        data = text.encode("utf-8")
        add(_U32(len(data)))
        add(data)
    add(_F64(record.recorded_at))
    for text in (record.collection, record.profile, record.settings_hash, record.image_sha256):
        data = text.encode("utf-8")
        add(_U32(len(data)))
        add(data)
    add(_F64_U32(record.quality, len(record.credits)))
    for c in record.credits:
        training, contributor = c.training_id.encode("utf-8"), c.contributor_id.encode("utf-8")
        add(_U32_U32(c.rank, len(training)))
        add(training)
        add(_U32(len(contributor)))
        add(contributor)
        add(_F64_F64(c.credit, c.distance))
    return b"".join(parts)


def record_leaf_hash(record) -> str:
    """The hex leaf hash the ledger stores with a record."""
    return hash_leaf(leaf_bytes(record)).hex()


RECORD_FIELDS = ("tenant_id", "generation_id", "recorded_at", "collection", "profile", "settings_hash",
                 "image_sha256", "quality")
CREDIT_FIELDS = ("rank", "training_id", "contributor_id", "credit", "distance")


def record_document(record) -> dict[str, Any]:
    """A record as JSON (what a proof shows): floats as JSON numbers, which every JSON reader
    turns back into the same doubles."""
    document = {name: getattr(record, name) for name in RECORD_FIELDS}
    document["credits"] = [{name: getattr(c, name) for name in CREDIT_FIELDS} for c in record.credits]
    return document


def document_leaf_bytes(document: dict[str, Any]) -> bytes:
    """The leaf bytes of a record given as JSON (record_document), checking each field's type."""
    def need(value, kind, name):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ProofError(f"the record's {name} is not a {kind.__name__}")
        return value

    fields = {name: need(document[name], float if name in ("recorded_at", "quality") else str, name)
              for name in RECORD_FIELDS}
    credits = [SimpleNamespace(**{name: need(c[name], int if name == "rank" else float if name in ("credit", "distance")
                                             else str, f"credit {name}") for name in CREDIT_FIELDS})
               for c in document["credits"]]
    return leaf_bytes(SimpleNamespace(**fields, credits=credits))


# -- periods ----------------------------------------------------------------------------------

def month_bounds(period: str) -> tuple[float, float]:
    """[start, end) in Unix seconds of a calendar month 'YYYY-MM' (UTC)."""
    try:
        start = datetime.strptime(period, "%Y-%m").replace(tzinfo=timezone.utc)
    except ValueError:
        raise ValueError(f"not a month like 2026-10: '{period}'") from None
    if period != start.strftime("%Y-%m"):
        raise ValueError(f"not a month like 2026-10: '{period}'")
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.timestamp(), end.timestamp()


def period_of(recorded_at: float) -> str:
    """The month of a time, as month_bounds draws them: floored to the second first, since
    fromtimestamp rounds to the microsecond and could carry 23:59:59.9999999 into the next month."""
    return datetime.fromtimestamp(math.floor(recorded_at), timezone.utc).strftime("%Y-%m")


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- checkpoints and keys ---------------------------------------------------------------------

def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, ASCII only: the checkpoint's signed text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def checkpoint_document(period: str, tree_size: int, root: bytes, total_credit: float,
                        tenants: dict[str, tuple[int, float]], key_id: str, sealed_at: float) -> dict[str, Any]:
    since, until = month_bounds(period)
    return {
        "format": CHECKPOINT_FORMAT,
        "period": period,
        "since": iso(since),
        "until": iso(until),
        "tree_size": int(tree_size),
        "root_hash": root.hex(),
        "total_credit": float(total_credit),
        "tenants": {tenant: {"generations": n, "credit": float(credit)} for tenant, (n, credit) in sorted(tenants.items())},
        "key_id": key_id,
        "sealed_at": iso(sealed_at),
    }


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as exc:  # pragma: no cover - cryptography ships with GMV's test extra
        raise ProofError(f"signing and checking checkpoints needs the `cryptography` package: pip install "
                         f"cryptography ({exc})") from None
    return ed25519, serialization, InvalidSignature


def key_id(public_key) -> str:
    """16 hex digits of SHA-256 of the raw 32-byte Ed25519 public key: names the key a
    checkpoint was signed with."""
    _, serialization, _ = _crypto()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public_key) -> str:
    _, serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.PEM,
                                   serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def generate_key_file(path: str | Path):
    """A new Ed25519 private key in `path` (PKCS#8 PEM, mode 0600, never overwriting a file)
    and its public key beside it in `path`.pub. Returns the private key."""
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; a signing key is never overwritten") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    public_path(path).write_text(public_key_pem(key.public_key()))
    return key


def public_path(private_path: str | Path) -> Path:
    return Path(str(private_path) + ".pub")


def load_private_key(path: str | Path):
    ed25519, serialization, _ = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"no signing key at {path} (make one with `gmv ledger keygen --out {path}`)") from None
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def load_public_key(path: str | Path):
    """An Ed25519 public key from a PEM file: a public key, or a private key (its public half)."""
    try:
        return load_public_key_pem(Path(path).read_bytes(), str(path))
    except FileNotFoundError:
        raise KeyFileError(f"no public key at {path}") from None


def load_public_key_pem(data: bytes | str, source: str = "the PEM text"):
    ed25519, serialization, _ = _crypto()
    data = data.encode("ascii") if isinstance(data, str) else data
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{source} holds no PEM Ed25519 public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{source} is not an Ed25519 key")
    return key


def sign_checkpoint(document: dict[str, Any], private_key) -> tuple[str, str]:
    """(the checkpoint's canonical text, its Ed25519 signature in base64)."""
    text = canonical_json(document).decode("ascii")
    return text, base64.b64encode(private_key.sign(text.encode("ascii"))).decode("ascii")


def check_checkpoint(text: str, signature: str, public_keys: Iterable) -> dict[str, Any]:
    """The checkpoint, once its signature verifies under one of `public_keys` (the one whose
    key id it names); ProofError otherwise."""
    _, _, InvalidSignature = _crypto()
    try:
        document = json.loads(text)
        signed_by = document["key_id"]
    except (ValueError, TypeError, KeyError) as exc:
        raise ProofError(f"the checkpoint is not a GMV checkpoint: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise ProofError(f"the checkpoint's format is not {CHECKPOINT_FORMAT}")
    keys = {key_id(key): key for key in public_keys}
    if signed_by not in keys:
        raise ProofError(f"the checkpoint says it was signed by key {signed_by}, and no given public key is that one "
                         f"(given: {', '.join(sorted(keys)) or 'none'})")
    try:
        keys[signed_by].verify(base64.b64decode(signature, validate=True), text.encode("ascii"))
    except (InvalidSignature, ValueError, UnicodeEncodeError):
        raise ProofError(f"the checkpoint's signature does not verify under key {signed_by}: the checkpoint or "
                         "its signature was changed") from None
    return document


# -- inclusion proofs -------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckedProof:
    record: dict[str, Any]  # the generation and its credits, as record_document gives them
    checkpoint: dict[str, Any]  # the signed checkpoint it is included in
    leaf_index: int


def make_proof(record, leaf_index: int, leaf_hashes: Sequence[bytes], checkpoint_text: str,
               signature: str) -> dict[str, Any]:
    """An inclusion proof of `record`, leaf `leaf_index` of the sealed `leaf_hashes`."""
    return {
        "format": PROOF_FORMAT,
        "record": record_document(record),
        "leaf_hash": leaf_hashes[leaf_index].hex(),
        "leaf_index": leaf_index,
        "tree_size": len(leaf_hashes),
        "audit_path": [h.hex() for h in audit_path(leaf_index, leaf_hashes)],
        "checkpoint": checkpoint_text,
        "signature": signature,
    }


def check_proof(proof: dict[str, Any], public_keys: Iterable) -> CheckedProof:
    """Check an inclusion proof with the ledger's public key(s) alone: the checkpoint's
    signature; then the record's leaf bytes, recomputed from the record, at its index, with
    the audit path, must hash to the signed root of a tree of the signed size, and the record's
    time must lie in the sealed month. Returns what was proven; raises ProofError naming what
    failed. Nothing in the proof is trusted but what the signature covers."""
    try:
        if proof.get("format") != PROOF_FORMAT:
            raise ProofError(f"not a {PROOF_FORMAT} proof")
        checkpoint = check_checkpoint(proof["checkpoint"], proof["signature"], public_keys)
        record = proof["record"]
        leaf = document_leaf_bytes(record)
        index, size = proof["leaf_index"], proof["tree_size"]
        path = [bytes.fromhex(h) for h in proof["audit_path"]]
    except ProofError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError, UnicodeEncodeError, struct.error) as exc:
        raise ProofError(f"the proof is malformed: {type(exc).__name__}: {exc}") from None
    if not isinstance(index, int) or not isinstance(size, int) or size != checkpoint["tree_size"]:
        raise ProofError(f"the proof is for a tree of {size} leaves, the checkpoint for {checkpoint['tree_size']}")
    if any(len(h) != 32 for h in path):
        raise ProofError("the audit path holds a hash that is not 32 bytes")
    leaf_hash = hash_leaf(leaf)
    if proof.get("leaf_hash", leaf_hash.hex()) != leaf_hash.hex():
        raise ProofError("the record does not hash to the proof's leaf_hash: the record was changed")
    root = root_from_path(index, size, leaf_hash, path)
    if root.hex() != checkpoint["root_hash"]:
        raise ProofError("the record, its index and the audit path do not lead to the signed root: one of them "
                         "was changed")
    if period_of(record["recorded_at"]) != checkpoint["period"]:
        raise ProofError(f"the record's time is not in {checkpoint['period']}")
    return CheckedProof(record, checkpoint, index)
