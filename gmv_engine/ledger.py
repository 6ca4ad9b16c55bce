"""The royalty ledger: every attributed generation recorded exactly once.

A record is one generation (id, time, tenant, collection, profile, a hash of the pipeline
settings, a hash of the image, quality q_j) and its credits per training image, written in one
transaction, so a crash leaves whole records or none. Per-contributor sums are not stored
twice: they are sums over the credit rows, which carry each image's contributor.

`generation_id` is the idempotency key. Recording an id again with the same image returns the
stored record and adds nothing; with another image it raises GenerationConflictError (the gRPC
status ALREADY_EXISTS): a record is never overwritten.

Two backends behind the same SQL and schema:
- SQLite, the embedded default: one file in the data directory, WAL journal with
  synchronous=FULL so a commit survives a power cut, BEGIN IMMEDIATE so writers serialise.
- PostgreSQL by URL, for several server replicas sharing one ledger. Schema migrations run
  under an advisory lock, so replicas starting together do not race.

Contributors' opt-outs are recorded too (`erasures`, once per removal; gmv_engine/optout.py),
beside the generations they never change.

The paper's data value phi_i of training image i is the sum of its credits over generations;
`values()` computes it over a time window, `contributors()` totals it per contributor.
"""
from __future__ import annotations

import hashlib
import json
import os
import math
import re
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from . import transparency
from .credit import Attribution, Credit
from .errors import GenerationConflictError, GMVError, LedgerUnavailableError

# Each migration runs once, in order, in one transaction; `schema_migrations` says which ran.
# The DDL is plain SQL both databases accept (SQLite maps DOUBLE PRECISION to REAL).
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "generations, their credits, and the pipeline settings they were computed with", [
        """CREATE TABLE generations (
            generation_id TEXT PRIMARY KEY,
            recorded_at DOUBLE PRECISION NOT NULL,
            tenant_id TEXT NOT NULL,
            collection TEXT NOT NULL,
            profile TEXT NOT NULL,
            settings_hash TEXT NOT NULL,
            image_sha256 TEXT NOT NULL,
            quality DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX generations_recorded_at ON generations (recorded_at)",
        """CREATE TABLE credits (
            generation_id TEXT NOT NULL REFERENCES generations (generation_id),
            rank INTEGER NOT NULL,
            training_id TEXT NOT NULL,
            contributor_id TEXT NOT NULL,
            credit DOUBLE PRECISION NOT NULL,
            distance DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (generation_id, rank))""",
        "CREATE INDEX credits_training_id ON credits (training_id)",
        "CREATE INDEX credits_contributor_id ON credits (contributor_id)",
        """CREATE TABLE pipeline_settings (
            settings_hash TEXT PRIMARY KEY,
            settings TEXT NOT NULL)""",
    ]),
    # A generation_id is the caller's: two tenants may use the same one for two generations, and
    # a replay must only ever find the caller's own record. Tables rebuilt (SQLite cannot alter a
    # primary key); the rows keep their tenant.
    (2, "generations keyed by (tenant_id, generation_id); credits carry their tenant", [
        """CREATE TABLE generations_v2 (
            tenant_id TEXT NOT NULL,
            generation_id TEXT NOT NULL,
            recorded_at DOUBLE PRECISION NOT NULL,
            collection TEXT NOT NULL,
            profile TEXT NOT NULL,
            settings_hash TEXT NOT NULL,
            image_sha256 TEXT NOT NULL,
            quality DOUBLE PRECISION NOT NULL,
            CONSTRAINT generations_key PRIMARY KEY (tenant_id, generation_id))""",
        "INSERT INTO generations_v2 SELECT tenant_id, generation_id, recorded_at, collection, profile, settings_hash, "
        "image_sha256, quality FROM generations",
        """CREATE TABLE credits_v2 (
            tenant_id TEXT NOT NULL,
            generation_id TEXT NOT NULL,
            rank INTEGER NOT NULL,
            training_id TEXT NOT NULL,
            contributor_id TEXT NOT NULL,
            credit DOUBLE PRECISION NOT NULL,
            distance DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (tenant_id, generation_id, rank),
            FOREIGN KEY (tenant_id, generation_id) REFERENCES generations_v2 (tenant_id, generation_id))""",
        "INSERT INTO credits_v2 SELECT g.tenant_id, c.generation_id, c.rank, c.training_id, c.contributor_id, "
        "c.credit, c.distance FROM credits c JOIN generations g ON g.generation_id = c.generation_id",
        "DROP TABLE credits",
        "DROP TABLE generations",
        "ALTER TABLE generations_v2 RENAME TO generations",
        "ALTER TABLE credits_v2 RENAME TO credits",
        "CREATE INDEX generations_recorded_at ON generations (recorded_at)",
        "CREATE INDEX credits_training_id ON credits (training_id)",
        "CREATE INDEX credits_contributor_id ON credits (contributor_id)",
    ]),
    (3, "API keys: each scoped to one tenant and to roles, stored as a SHA-256 of the secret", [
        """CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY,
            secret_sha256 TEXT NOT NULL,
            tenant_id TEXT NOT NULL,
            roles TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            expires_at DOUBLE PRECISION,
            revoked_at DOUBLE PRECISION)""",
    ]),
    # The tamper-evident ledger (gmv_engine/transparency.py, docs/LEDGER.md): each record's
    # leaf hash in its own row, written by the same INSERT (no cross-row state, so replicas
    # and group commits do not wait for each other); existing rows get theirs here. A sealed
    # month keeps its signed checkpoint and its ordered leaves, so `verify` can name a record
    # that was removed or inserted later.
    (4, "leaf hashes per generation; signed monthly checkpoints and their sealed leaves", [
        "ALTER TABLE generations ADD COLUMN leaf_hash TEXT",
        lambda ledger, conn: ledger._backfill_leaf_hashes(conn),
        """CREATE TABLE ledger_checkpoints (
            period TEXT PRIMARY KEY,
            tree_size INTEGER NOT NULL,
            root_hash TEXT NOT NULL,
            total_credit DOUBLE PRECISION NOT NULL,
            checkpoint TEXT NOT NULL,
            signature TEXT NOT NULL,
            key_id TEXT NOT NULL,
            public_key TEXT NOT NULL,
            sealed_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE ledger_sealed_leaves (
            period TEXT NOT NULL REFERENCES ledger_checkpoints (period),
            leaf_index INTEGER NOT NULL,
            tenant_id TEXT NOT NULL,
            generation_id TEXT NOT NULL,
            leaf_hash TEXT NOT NULL,
            PRIMARY KEY (period, leaf_index))""",
    ]),
    # Contributors' opt-out (docs/CONTRIBUTORS.md): each removal of a contributor from a
    # collection, once. The key is the removal itself: a contributor is marked removed once per
    # collection, at `removed_at`, which every later run of `remove` keeps, so re-running an
    # interrupted removal records nothing new. Not hashed or sealed (docs/LEDGER.md).
    (5, "erasures: each contributor removed from a collection, when, by whom, what it took out", [
        """CREATE TABLE erasures (
            collection TEXT NOT NULL,
            contributor_id TEXT NOT NULL,
            removed_at DOUBLE PRECISION NOT NULL,
            images_removed INTEGER NOT NULL,
            hashes_blocked INTEGER NOT NULL,
            removals_version INTEGER NOT NULL,
            requested_via TEXT NOT NULL,
            requested_by TEXT NOT NULL,
            tenant_id TEXT NOT NULL,
            recorded_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (collection, contributor_id, removed_at))""",
        "CREATE INDEX erasures_recorded_at ON erasures (recorded_at)",
    ]),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


@dataclass(frozen=True)
class GenerationRecord:
    generation_id: str
    tenant_id: str
    collection: str
    profile: str
    settings_hash: str
    image_sha256: str
    quality: float
    credits: tuple[Credit, ...]
    recorded_at: float = 0.0  # Unix seconds (UTC); set by the ledger when 0
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def attribution(self) -> Attribution:
        return Attribution(self.quality, tuple(self.credits))

    @property
    def contributors(self) -> list[tuple[str, float]]:
        """Per-contributor sums, largest first: the same order the engine reports."""
        return self.attribution.contributors


@dataclass(frozen=True)
class TrainingValue:
    """phi_i: the summed credit of one training image over the window's generations."""

    training_id: str
    contributor_id: str
    value: float
    generations: int  # generations that credited it


@dataclass(frozen=True)
class ContributorValue:
    contributor_id: str
    value: float
    generations: int  # generations that credited any of the contributor's images
    training_images: int  # of the contributor's images that were credited


@dataclass(frozen=True)
class Window:
    """[since, until) in Unix seconds; None = unbounded."""

    since: float | None = None
    until: float | None = None
    collection: str | None = None
    tenant_id: str | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses, params = [], []
        for column, op, value in (("recorded_at", ">=", self.since), ("recorded_at", "<", self.until),
                                  ("collection", "=", self.collection), ("tenant_id", "=", self.tenant_id)):
            if value is not None and value != "":
                clauses.append(f"g.{column} {op} ?")
                params.append(value)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def settings_hash(settings: dict[str, Any]) -> str:
    """A stable hash of the settings a generation was attributed with (canonical JSON)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def image_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def mask_url(url: str) -> str:
    """A database URL fit for a log line: the password masked wherever it is (user:pass@, a
    password with '@' in it, ?password=... among the query parameters)."""
    masked = re.sub(r"://([^:/@]*):.*@", r"://\1:***@", url)  # greedy: up to the LAST '@'
    return re.sub(r"(?i)([?&](?:password|sslpassword)=)[^&]*", r"\1***", masked)


ROLES = ("attribute", "read", "admin")
KEY_PREFIX = "gmv_"


@dataclass(frozen=True)
class ApiKey:
    """A key's record (never its secret): `gmv keys list` and the server's authentication."""

    key_id: str
    tenant_id: str
    roles: tuple[str, ...]
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    secret_sha256: str = ""

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


def split_key(key: str) -> tuple[str, str] | None:
    """(key_id, secret) of a key as `gmv keys create` prints it: gmv_<key_id>_<secret>."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, _, secret = key[len(KEY_PREFIX):].partition("_")
    return (key_id, secret) if key_id and secret else None


def key_digest(key: str) -> str:
    # The secret is 256 random bits, so a plain SHA-256 is as strong as a slow hash here.
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeysMixin:
    """API keys in the ledger's database (the Ledger class below mixes this in)."""

    def create_key(self, tenant_id: str, roles: Sequence[str], expires_at: float | None = None) -> tuple[ApiKey, str]:
        """A new random key for `tenant_id` with `roles`: (its record, the key itself, shown once)."""
        import secrets

        bad = sorted(set(roles) - set(ROLES))
        if bad or not roles:
            raise GMVError(f"roles must be some of {', '.join(ROLES)}; got {', '.join(roles) or 'none'}")
        if not tenant_id or len(tenant_id.encode("utf-8")) > 128 or not tenant_id.isprintable():
            raise GMVError("a key needs a tenant: 1 to 128 bytes of printable UTF-8")
        key_id = secrets.token_hex(6)
        key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        record = ApiKey(key_id, tenant_id, tuple(dict.fromkeys(roles)), time.time(), expires_at, None, key_digest(key))
        self._write("creating an API key", "INSERT INTO api_keys (key_id, secret_sha256, tenant_id, roles, created_at, "
                    "expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, NULL)",
                    (key_id, record.secret_sha256, tenant_id, ",".join(record.roles), record.created_at, expires_at))
        return record, key

    def find_key(self, key_id: str) -> ApiKey | None:
        rows = self._query("SELECT key_id, tenant_id, roles, created_at, expires_at, revoked_at, secret_sha256 "
                           "FROM api_keys WHERE key_id = ?", (key_id,), "reading an API key")
        return _api_key(rows[0]) if rows else None

    def list_keys(self) -> list[ApiKey]:
        rows = self._query("SELECT key_id, tenant_id, roles, created_at, expires_at, revoked_at, '' FROM api_keys "
                           "ORDER BY created_at, key_id", (), "listing API keys")
        return [_api_key(row) for row in rows]

    def keys_exist(self) -> bool:
        """Whether any key was ever created (revoked ones count: revoking the last key must not
        open the server to everyone)."""
        return bool(self._query("SELECT COUNT(*) FROM api_keys", (), "counting API keys")[0][0])

    def revoke_key(self, key_id_or_key: str) -> ApiKey | None:
        """Revoke by key id or by the key itself; the revoked key's record, None if unknown."""
        parts = split_key(key_id_or_key)
        key_id = parts[0] if parts else key_id_or_key
        self._write("revoking an API key", "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                    (time.time(), key_id))
        return self.find_key(key_id)


def _api_key(row) -> ApiKey:
    key_id, tenant, roles, created, expires, revoked, digest = row
    return ApiKey(key_id, tenant, tuple(r for r in roles.split(",") if r), created, expires, revoked, digest)


ERASURE_COLUMNS = ("collection", "contributor_id", "removed_at", "images_removed", "hashes_blocked",
                   "removals_version", "requested_via", "requested_by", "tenant_id", "recorded_at")


@dataclass(frozen=True)
class Erasure:
    """A contributor's removal from a collection (gmv_engine/optout.py), as the ledger keeps it."""

    collection: str
    contributor_id: str
    removed_at: float  # when the contributor was first marked removed (the removal's identity)
    images_removed: int  # training images taken out of the recall index and re-rank store
    hashes_blocked: int  # content hashes put on the collection's blocklist
    removals_version: int  # the collection's removals version once the removal was complete
    requested_via: str  # "cli" (gmv contributors remove) or "rpc" (RemoveContributor)
    requested_by: str  # who: the OS user and host, or the RPC's credential and peer
    tenant_id: str = ""  # the RPC caller's tenant; "" from the command line or an open server
    recorded_at: float = 0.0  # when the ledger recorded it; set by the ledger when 0


class ErasuresMixin:
    """Contributors' erasures in the ledger's database (the Ledger class below mixes this in)."""

    def record_erasure(self, erasure: Erasure) -> tuple[Erasure, bool]:
        """Record a completed removal once: (the stored erasure, True) when it is new, (the one
        recorded before, False) when this removal (collection, contributor, removed_at) was
        recorded already, as it is when an interrupted or repeated removal runs again."""
        if not erasure.recorded_at:
            erasure = _replace(erasure, recorded_at=time.time())
        values = tuple(getattr(erasure, column) for column in ERASURE_COLUMNS)
        with self._lock:
            conn = self._connection()
            try:
                self._begin(conn)
                inserted = self._execute(conn, f"INSERT INTO erasures ({', '.join(ERASURE_COLUMNS)}) VALUES "
                                               f"({', '.join('?' * len(ERASURE_COLUMNS))}) ON CONFLICT "
                                               "(collection, contributor_id, removed_at) DO NOTHING", values).rowcount
                row = self._execute(conn, f"SELECT {', '.join(ERASURE_COLUMNS)} FROM erasures WHERE collection = ? "
                                          "AND contributor_id = ? AND removed_at = ?",
                                    (erasure.collection, erasure.contributor_id, erasure.removed_at)).fetchone()
                conn.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001
                self._rollback(conn)
                raise self._fail(exc, f"recording the erasure of contributor '{erasure.contributor_id}'") from exc
        return Erasure(*row), inserted == 1

    def erasures(self, collection: str | None = None, contributor_id: str | None = None) -> list[Erasure]:
        """The recorded erasures, oldest removal first; only a collection's or a contributor's
        when given."""
        clauses = [(column, value) for column, value in (("collection", collection), ("contributor_id", contributor_id))
                   if value]
        where = (" WHERE " + " AND ".join(f"{column} = ?" for column, _ in clauses)) if clauses else ""
        rows = self._query(f"SELECT {', '.join(ERASURE_COLUMNS)} FROM erasures{where} "
                           "ORDER BY removed_at, collection, contributor_id", [v for _, v in clauses],
                           "reading erasures")
        return [Erasure(*row) for row in rows]


SLICE_RECORDS = 20_000  # generations read into memory at once by seal, verify and the backfill


@dataclass(frozen=True)
class Checkpoint:
    """A sealed month as the ledger stores it. `text` and `signature` are what was signed;
    the other fields repeat parts of it for queries (verify trusts only the signed text)."""

    period: str
    tree_size: int
    root_hash: str
    total_credit: float
    text: str
    signature: str
    key_id: str
    public_key: str  # PEM of the key that signed it, as the ledger says (not a trust anchor)
    sealed_at: float

    @property
    def document(self) -> dict[str, Any]:
        return json.loads(self.text)


@dataclass
class VerifyReport:
    """What `verify` found. `findings` name records (first difference first, per month); an
    empty list means every check passed. `notes` say what was checked and how."""

    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    records: int = 0
    sealed: list[str] = field(default_factory=list)
    unsealed: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings


class AlreadySealedError(GMVError):
    """The month has a checkpoint already; a sealed month is never sealed again."""


class TransparencyMixin:
    """Leaf hashes, signed monthly checkpoints, verification and inclusion proofs (the Ledger
    class below mixes this in; the hashing and signing are gmv_engine/transparency.py's)."""

    # -- reading records with their stored leaf hashes ------------------------------------------
    def _slices(self, conn, lo: float, hi: float) -> Iterator[tuple[float, float]]:
        """[lo, hi) cut into time slices of at most SLICE_RECORDS generations, oldest first
        (a slice narrower than a millisecond is not cut further)."""
        count = self._execute(conn, "SELECT COUNT(*) FROM generations WHERE recorded_at >= ? AND recorded_at < ?",
                              (lo, hi)).fetchone()[0]
        if not count:
            return
        if count <= SLICE_RECORDS or hi - lo < 1e-3:
            yield lo, hi
            return
        middle = lo + (hi - lo) / 2
        yield from self._slices(conn, lo, middle)
        yield from self._slices(conn, middle, hi)

    def _read_records(self, conn, lo: float, hi: float) -> list[tuple[GenerationRecord, str | None]]:
        """The records in [lo, hi) with their stored leaf hashes, in leaf order."""
        rows = self._execute(conn, "SELECT generation_id, tenant_id, collection, profile, settings_hash, image_sha256, "
                                   "quality, recorded_at, leaf_hash FROM generations "
                                   "WHERE recorded_at >= ? AND recorded_at < ?", (lo, hi)).fetchall()
        credits: dict[tuple[str, str], list[tuple]] = {}
        for tenant, generation, *credit in self._execute(
                conn, "SELECT c.tenant_id, c.generation_id, c.rank, c.training_id, c.contributor_id, c.credit, c.distance "
                      "FROM credits c JOIN generations g ON g.tenant_id = c.tenant_id AND g.generation_id = c.generation_id "
                      "WHERE g.recorded_at >= ? AND g.recorded_at < ?", (lo, hi)).fetchall():
            credits.setdefault((tenant, generation), []).append(credit)
        records = [(GenerationRecord(*row[:7], credits=tuple(Credit(*c) for c in sorted(credits.get((row[1], row[0]), ()))),
                                     recorded_at=row[7]), row[8]) for row in rows]
        records.sort(key=lambda item: (item[0].recorded_at, item[0].tenant_id, item[0].generation_id))
        return records

    def _bounds(self, conn, since: float | None, until: float | None) -> tuple[float, float] | None:
        low, high = self._execute(conn, "SELECT MIN(recorded_at), MAX(recorded_at) FROM generations").fetchone()
        if low is None:
            return None
        lo = low if since is None else since
        hi = math.nextafter(high, math.inf) if until is None else until
        return (lo, hi) if lo < hi else None

    def iter_records(self, since: float | None = None, until: float | None = None
                     ) -> Iterator[tuple[GenerationRecord, str | None]]:
        """Every record in [since, until) with the leaf hash stored with it (None if none), in
        leaf order: (recorded_at, tenant_id, generation_id). Reads a slice at a time."""
        with self._lock:
            try:
                conn = self._connection()
                bounds = self._bounds(conn, since, until)
                slices = list(self._slices(conn, *bounds)) if bounds else []
            except Exception as exc:  # noqa: BLE001
                raise self._fail(exc, "reading records") from exc
        for lo, hi in slices:
            with self._lock:
                try:
                    records = self._read_records(self._connection(), lo, hi)
                except Exception as exc:  # noqa: BLE001
                    raise self._fail(exc, "reading records") from exc
            yield from records

    def _backfill_leaf_hashes(self, conn) -> None:
        """Migration 4: the leaf hash of every record written before leaf hashes existed."""
        bounds = self._bounds(conn, None, None)
        for lo, hi in (list(self._slices(conn, *bounds)) if bounds else []):
            rows = [(transparency.record_leaf_hash(record), record.tenant_id, record.generation_id)
                    for record, _ in self._read_records(conn, lo, hi)]
            conn.cursor().executemany(self._sql("UPDATE generations SET leaf_hash = ? WHERE tenant_id = ? "
                                                "AND generation_id = ?"), rows)

    def periods(self, since: float | None = None, until: float | None = None) -> list[str]:
        """The months ('YYYY-MM') in [since, until) that hold records or a checkpoint, oldest first."""
        found = set()
        with self._lock:
            try:
                conn = self._connection()
                cursor = since
                while True:
                    clauses = " AND ".join(c for c, v in (("recorded_at >= ?", cursor), ("recorded_at < ?", until))
                                           if v is not None)
                    params = [v for v in (cursor, until) if v is not None]
                    first = self._execute(conn, "SELECT MIN(recorded_at) FROM generations" +
                                          (" WHERE " + clauses if clauses else ""), params).fetchone()[0]
                    if first is None:
                        break
                    period = transparency.period_of(first)
                    found.add(period)
                    cursor = transparency.month_bounds(period)[1]
                sealed = [row[0] for row in self._execute(conn, "SELECT period FROM ledger_checkpoints").fetchall()]
            except Exception as exc:  # noqa: BLE001
                raise self._fail(exc, "listing months") from exc
        for period in sealed:
            start, end = transparency.month_bounds(period)
            if (since is None or end > since) and (until is None or start < until):
                found.add(period)
        return sorted(found)

    # -- checkpoints ----------------------------------------------------------------------------
    def _sealed_among(self, conn, periods: set[str]) -> set[str]:
        rows = self._execute(conn, f"SELECT period FROM ledger_checkpoints WHERE period IN "
                                   f"({', '.join('?' * len(periods))})", sorted(periods)).fetchall()
        return {row[0] for row in rows}

    def checkpoint(self, period: str) -> Checkpoint | None:
        rows = self._query("SELECT period, tree_size, root_hash, total_credit, checkpoint, signature, key_id, public_key, "
                           "sealed_at FROM ledger_checkpoints WHERE period = ?", (period,), "reading a checkpoint")
        return Checkpoint(*rows[0]) if rows else None

    def checkpoints(self) -> list[Checkpoint]:
        rows = self._query("SELECT period, tree_size, root_hash, total_credit, checkpoint, signature, key_id, public_key, "
                           "sealed_at FROM ledger_checkpoints ORDER BY period", (), "listing checkpoints")
        return [Checkpoint(*row) for row in rows]

    def sealed_leaves(self, period: str) -> list[tuple[str, str, str]]:
        """(tenant_id, generation_id, leaf hash) of each leaf of a sealed month, in leaf order."""
        rows = self._query("SELECT tenant_id, generation_id, leaf_hash FROM ledger_sealed_leaves WHERE period = ? "
                           "ORDER BY leaf_index", (period,), "reading sealed leaves")
        return [tuple(row) for row in rows]

    def check_sealable(self, period: str, now: float | None = None, grace_s: float = transparency.SEAL_GRACE_S) -> None:
        """GMVError unless `period` is over (by grace_s) and AlreadySealedError if it is sealed."""
        until = transparency.month_bounds(period)[1]
        if until > (time.time() if now is None else now) - grace_s:
            raise GMVError(f"{period} cannot be sealed before {transparency.iso(until + grace_s)}: a month is sealed "
                           f"once it is over and {grace_s / 60:.0f} minutes have passed (records may still be arriving)")
        if self.checkpoint(period) is not None:
            raise AlreadySealedError(f"{period} is already sealed")

    def seal(self, period: str, private_key, now: float | None = None,
             grace_s: float = transparency.SEAL_GRACE_S) -> Checkpoint:
        """Seal a finished month: recompute every record's leaf from its content (refusing if
        one no longer matches the hash stored with it), build the month's Merkle tree, sign a
        checkpoint with `private_key` (Ed25519) and store it with the ordered leaves, in one
        transaction. Raises AlreadySealedError for a sealed month."""
        now = time.time() if now is None else now
        self.check_sealable(period, now, grace_s)
        since, until = transparency.month_bounds(period)
        leaves: list[tuple[str, str, str]] = []
        mismatched: list[str] = []
        tenants: dict[str, tuple[int, list[float]]] = {}  # fsum'd at the end: exact, whatever the order
        for record, stored in self.iter_records(since, until):
            leaf = transparency.record_leaf_hash(record)
            if stored != leaf:
                mismatched.append(f"{record.tenant_id}/{record.generation_id}")
            leaves.append((record.tenant_id, record.generation_id, leaf))
            count, credits = tenants.setdefault(record.tenant_id, (0, []))
            credits.extend(c.credit for c in record.credits)
            tenants[record.tenant_id] = (count + 1, credits)
        if mismatched:
            raise GMVError(f"refusing to seal {period}: {len(mismatched)} record(s) no longer match the leaf hash stored "
                           f"with them (changed after they were recorded): {', '.join(mismatched[:10])}"
                           + (" ..." if len(mismatched) > 10 else "") + "; run `gmv ledger verify`")
        root = transparency.merkle_root([bytes.fromhex(h) for _, _, h in leaves])
        public = private_key.public_key()
        document = transparency.checkpoint_document(
            period, len(leaves), root, math.fsum(c for _, credits in tenants.values() for c in credits),
            {tenant: (count, math.fsum(credits)) for tenant, (count, credits) in tenants.items()},
            transparency.key_id(public), now)
        text, signature = transparency.sign_checkpoint(document, private_key)
        checkpoint = Checkpoint(period, len(leaves), root.hex(), document["total_credit"], text, signature,
                                document["key_id"], transparency.public_key_pem(public), now)
        with self._lock:
            conn = self._connection()
            try:
                self._begin(conn)
                if self._sealed_among(conn, {period}):
                    raise AlreadySealedError(f"{period} is already sealed")
                self._execute(conn, "INSERT INTO ledger_checkpoints (period, tree_size, root_hash, total_credit, "
                                    "checkpoint, signature, key_id, public_key, sealed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                              (checkpoint.period, checkpoint.tree_size, checkpoint.root_hash, checkpoint.total_credit,
                               checkpoint.text, checkpoint.signature, checkpoint.key_id, checkpoint.public_key, now))
                if leaves:
                    conn.cursor().executemany(
                        self._sql("INSERT INTO ledger_sealed_leaves (period, leaf_index, tenant_id, generation_id, "
                                  "leaf_hash) VALUES (?, ?, ?, ?, ?)"),
                        [(period, i, tenant, generation, leaf) for i, (tenant, generation, leaf) in enumerate(leaves)])
                conn.execute("COMMIT")
            except AlreadySealedError:
                self._rollback(conn)
                raise
            except Exception as exc:  # noqa: BLE001
                self._rollback(conn)
                if self.checkpoint(period) is not None:  # another operator sealed it meanwhile
                    raise AlreadySealedError(f"{period} is already sealed") from exc
                raise self._fail(exc, f"sealing {period}") from exc
        return checkpoint

    # -- verifying ------------------------------------------------------------------------------
    def verify(self, period: str | None = None, public_keys: Sequence | None = None) -> VerifyReport:
        """Recompute everything: each record's leaf against the hash stored with it; for each
        sealed month, the checkpoint's signature (under `public_keys`, else only under the key
        the ledger itself names), the sealed leaves against the signed root, and the records
        now against the sealed leaves, naming each record removed, inserted or changed, first
        difference first. Also credit rows without their generation."""
        report = VerifyReport()
        since, until = transparency.month_bounds(period) if period else (None, None)
        if public_keys:
            report.notes.append("checkpoint signatures checked against public key(s) "
                                + ", ".join(transparency.key_id(k) for k in public_keys))
        for month in self.periods(since, until):
            self._verify_month(month, public_keys, report)
        orphans = self._query("SELECT c.tenant_id, c.generation_id, COUNT(*) FROM credits c LEFT JOIN generations g "
                              "ON g.tenant_id = c.tenant_id AND g.generation_id = c.generation_id "
                              "WHERE g.generation_id IS NULL GROUP BY c.tenant_id, c.generation_id "
                              "ORDER BY c.tenant_id, c.generation_id", (), "checking")
        for tenant, generation, count in orphans:
            report.findings.append(f"generation {tenant}/{generation}: {count} credit row(s) without their generation "
                                   "(its generation row was removed)")
        erasures = self._query("SELECT COUNT(*) FROM erasures", (), "counting erasures")[0][0]
        if erasures:
            report.notes.append(f"{erasures} contributor erasure(s) recorded (`gmv ledger erasures`): kept beside the "
                                "records, not hashed or sealed, so not checked")
        return report

    def _verify_month(self, period: str, public_keys: Sequence | None, report: VerifyReport) -> None:
        since, until = transparency.month_bounds(period)
        current: list[tuple[str, str, str]] = []  # (tenant, id, leaf recomputed from the content)
        problems: dict[tuple[str, str], list[str]] = {}
        for record, stored in self.iter_records(since, until):
            key = (record.tenant_id, record.generation_id)
            leaf = _leaf_hash(record)
            current.append((*key, leaf or "00" * 32))
            reasons = []
            if stored is None:
                reasons.append(NO_LEAF_HASH)
            elif stored != leaf:
                reasons.append(LEAF_MISMATCH)
            ranks = [c.rank for c in record.credits]
            if ranks != list(range(1, len(ranks) + 1)):
                reasons.append(f"its credit ranks are {ranks} (a credit row was removed or added)")
            elif ranks and abs(math.fsum(c.credit for c in record.credits) - record.quality) > 1e-6 * max(1.0, record.quality):
                reasons.append(f"its credits sum to {math.fsum(c.credit for c in record.credits)!r}, not to its quality "
                               f"{record.quality!r} (a credit was changed)")
            if reasons:
                problems[key] = reasons
        report.records += len(current)
        checkpoint = self.checkpoint(period)
        if checkpoint is None:
            report.unsealed.append(period)
            for tenant, generation, _ in current:
                if (tenant, generation) in problems:
                    report.findings.append(f"{period}: generation {tenant}/{generation}: "
                                           + "; ".join(problems[(tenant, generation)]))
            return
        report.sealed.append(period)
        # The signed text is the truth; a key found only in the ledger proves little (whoever
        # can rewrite the ledger can re-sign with a key of their own), and the notes say so.
        keys = list(public_keys) if public_keys else []
        if not keys:
            try:
                keys = [transparency.load_public_key_pem(checkpoint.public_key)]
            except ValueError:
                pass
            if not any("not checked against a key" in n for n in report.notes):
                report.notes.append("checkpoint signatures not checked against a key of your own (none given): only "
                                    "against the key the ledger names; pass --public-key to check them")
        try:
            signed = transparency.check_checkpoint(checkpoint.text, checkpoint.signature, keys)
        except transparency.ProofError as exc:
            report.findings.append(f"{period}: checkpoint: {exc}")
            signed = checkpoint.document
        rows = self._query("SELECT leaf_index, tenant_id, generation_id, leaf_hash FROM ledger_sealed_leaves "
                           "WHERE period = ? ORDER BY leaf_index", (period,), "reading sealed leaves")
        sealed = [(tenant, generation, leaf) for _, tenant, generation, leaf in rows]
        before = len(report.findings)
        missing = sorted(set(range(max((r[0] for r in rows), default=-1) + 1)) - {r[0] for r in rows})
        if missing:
            report.findings.append(f"{period}: sealed leaf row(s) {', '.join(map(str, missing[:10]))} were deleted "
                                   "after sealing")
        try:
            sealed_root = transparency.merkle_root([bytes.fromhex(h) for _, _, h in sealed]).hex()
        except ValueError:
            sealed_root = ""
        if sealed_root != signed.get("root_hash") or len(sealed) != signed.get("tree_size"):
            report.findings.append(f"{period}: the sealed leaf list ({len(sealed)} leaves) no longer gives the signed "
                                   f"root of {signed.get('tree_size')} leaves: it was changed after sealing")
        for finding in _differences(sealed, current, problems):
            report.findings.append(f"{period}: {finding}")
        if len(report.findings) == before:
            root = transparency.merkle_root([bytes.fromhex(h) for _, _, h in current])
            if root.hex() != signed.get("root_hash"):  # not reached unless the checks above missed something
                report.findings.append(f"{period}: the records no longer give the signed root")

    # -- proving --------------------------------------------------------------------------------
    def prove(self, generation_id: str, tenant_id: str | None = None) -> dict[str, Any]:
        """An inclusion proof of a generation in its sealed month (transparency.make_proof);
        GMVError when its month is not sealed or it differs from what was sealed."""
        record = self.get(generation_id, tenant_id)
        if record is None:
            raise GMVError(f"no generation '{generation_id}'" + (f" of tenant '{tenant_id}'" if tenant_id else "")
                           + " in the ledger")
        period = transparency.period_of(record.recorded_at)
        checkpoint = self.checkpoint(period)
        if checkpoint is None:
            raise GMVError(f"generation '{generation_id}' was recorded in {period}, which is not sealed yet "
                           f"(gmv ledger seal --month {period})")
        sealed = self.sealed_leaves(period)
        hashes = [bytes.fromhex(h) for _, _, h in sealed]
        index = next((i for i, (t, g, _) in enumerate(sealed) if (t, g) == (record.tenant_id, generation_id)), None)
        if index is None:
            raise GMVError(f"generation {record.tenant_id}/{generation_id} is not among the sealed leaves of {period}: "
                           "it was inserted after sealing (run `gmv ledger verify`)")
        if transparency.record_leaf_hash(record) != sealed[index][2]:
            raise GMVError(f"generation {record.tenant_id}/{generation_id} changed since {period} was sealed "
                           "(run `gmv ledger verify`)")
        if transparency.merkle_root(hashes).hex() != checkpoint.document.get("root_hash"):
            raise GMVError(f"the sealed leaves of {period} no longer give its signed root (run `gmv ledger verify`)")
        return transparency.make_proof(record, index, hashes, checkpoint.text, checkpoint.signature)


NO_LEAF_HASH = "it has no leaf hash (it was not recorded by GMV)"
LEAF_MISMATCH = "its content no longer matches the leaf hash stored with it (changed after it was recorded)"


def _differences(sealed: list[tuple[str, str, str]], current: list[tuple[str, str, str]],
                 problems: dict[tuple[str, str], list[str]]) -> list[str]:
    """The records of a sealed month that differ between the sealed leaves and the records
    now, in leaf order: removed, inserted, changed (with what else is wrong with them)."""
    sealed_at = {(t, g): i for i, (t, g, _) in enumerate(sealed)}
    current_at = {(t, g): i for i, (t, g, _) in enumerate(current)}
    findings, done = [], set()

    def name(key) -> str:
        return f"generation {key[0]}/{key[1]}"

    def extra(key) -> str:
        return "".join(f"; {reason}" for reason in problems.get(key, ()))

    def as_sealed(key) -> str:
        # The content still hashes to the sealed leaf, so what changed is the stored hash.
        return "; ".join("the leaf hash stored with it was changed (its content is as sealed)" if r == LEAF_MISMATCH
                         else r for r in problems[key])

    i = j = 0
    while i < len(sealed) or j < len(current):
        if i < len(sealed) and (sealed[i][0], sealed[i][1]) in done:
            i += 1
            continue
        if i < len(sealed) and j < len(current) and sealed[i][:2] == current[j][:2]:
            key = sealed[i][:2]
            if sealed[i][2] != current[j][2]:
                findings.append(f"{name(key)} (leaf {i} of {len(sealed)}): changed since it was sealed{extra(key)}")
            elif key in problems:
                findings.append(f"{name(key)} (leaf {i} of {len(sealed)}): {as_sealed(key)}")
            i, j = i + 1, j + 1
        elif i < len(sealed) and sealed[i][:2] not in current_at:
            findings.append(f"{name(sealed[i][:2])} (leaf {i} of {len(sealed)}): removed since it was sealed")
            i += 1
        elif j < len(current) and current[j][:2] not in sealed_at:
            findings.append(f"{name(current[j][:2])}: inserted after the month was sealed (not among its "
                            f"{len(sealed)} sealed leaves){extra(current[j][:2])}")
            j += 1
        else:  # both are elsewhere in the other list: the record at j moved (its time changed)
            key = current[j][:2]
            findings.append(f"{name(key)} (leaf {sealed_at[key]} of {len(sealed)}): changed since it was sealed "
                            f"(its time moved it to position {j}){extra(key)}")
            done.add(key)
            j += 1
    return findings


class Ledger(KeysMixin, ErasuresMixin, TransparencyMixin):
    """One connection, used under a lock (the server writes from worker threads). Open with
    `open_ledger(url)`."""

    backend = "base"
    placeholder = "?"

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.RLock()
        self._conn = None
        with self._lock:
            self._migrate()

    # -- the backend's part -------------------------------------------------------------------
    def _connect(self):
        raise NotImplementedError

    def _begin(self, conn) -> None:
        conn.execute("BEGIN")

    def _lock_migrations(self, conn) -> None:
        """Called inside the migration transaction; PostgreSQL takes an advisory lock."""

    def _is_duplicate_key(self, exc: Exception) -> bool:
        raise NotImplementedError

    def _is_deadlock(self, exc: BaseException | None) -> bool:
        """Two transactions waited on each other and the database aborted this one."""
        return False

    def _is_unavailable(self, exc: Exception) -> bool:
        raise NotImplementedError

    def _table_exists(self, conn, name: str) -> bool:
        raise NotImplementedError

    # -- plumbing -----------------------------------------------------------------------------
    def _sql(self, statement: str) -> str:
        return statement if self.placeholder == "?" else statement.replace("?", self.placeholder)

    def _connection(self):
        if self._conn is None:
            try:
                self._conn = self._connect()
            except Exception as exc:  # noqa: BLE001 - every driver error says "cannot reach it"
                raise LedgerUnavailableError(f"cannot open the ledger at {self.safe_url}: {exc}") from exc
        return self._conn

    @property
    def safe_url(self) -> str:
        return mask_url(self.url)

    def _execute(self, conn, statement: str, params: Sequence[Any] = ()):
        return conn.execute(self._sql(statement), tuple(params))

    def _rollback(self, conn) -> None:
        try:
            conn.execute("ROLLBACK")
        except Exception:  # noqa: BLE001 - the connection may be gone; it is dropped below
            self._drop_connection()

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass

    def _fail(self, exc: Exception, doing: str) -> GMVError:
        if self._is_unavailable(exc):
            self._drop_connection()  # reconnect on the next call
            return LedgerUnavailableError(f"the ledger at {self.safe_url} failed while {doing}: {exc}")
        return GMVError(f"the ledger at {self.safe_url} refused {doing}: {exc}")

    def _migrate(self) -> None:
        conn = self._connection()
        try:
            self._begin(conn)
            self._lock_migrations(conn)
            if not self._table_exists(conn, "schema_migrations"):
                self._execute(conn, "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, "
                                    "description TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)")
            applied = {row[0] for row in self._execute(conn, "SELECT version FROM schema_migrations").fetchall()}
            if applied and max(applied) > SCHEMA_VERSION:
                raise GMVError(f"the ledger at {self.safe_url} has schema version {max(applied)}, newer than this "
                               f"GMV knows ({SCHEMA_VERSION}); upgrade GMV")
            for version, description, statements in MIGRATIONS:
                if version in applied:
                    continue
                for statement in statements:
                    if callable(statement):  # a data migration in Python, same transaction
                        statement(self, conn)
                    else:
                        self._execute(conn, statement)
                self._execute(conn, "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                              (version, description, time.time()))
            conn.execute("COMMIT")
        except GMVError:
            self._rollback(conn)
            raise
        except Exception as exc:  # noqa: BLE001
            self._rollback(conn)
            raise self._fail(exc, "migrating its schema") from exc

    def schema_version(self) -> int:
        with self._lock:
            rows = self._execute(self._connection(), "SELECT MAX(version) FROM schema_migrations").fetchall()
        return int(rows[0][0] or 0)

    def close(self) -> None:
        with self._lock:
            self._drop_connection()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------
    def record(self, record: GenerationRecord) -> tuple[GenerationRecord, bool]:
        """Store `record` in one transaction. Returns (the stored record, True) when it was
        new, (the earlier record, False) when the id was recorded before with the same image.
        Raises GenerationConflictError when the id was recorded with another image."""
        outcome = self.record_many([record])[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def record_many(self, records: Sequence[GenerationRecord]) -> list[tuple[GenerationRecord, bool] | GMVError]:
        """Group commit: several records in ONE transaction (one fsync), each whole or not at
        all. Returns per record what `record` returns, or its GenerationConflictError. Raises
        (and keeps none of them) when the database fails."""
        return self._record_many(records, retry_deadlock=True)

    def _record_many(self, records: Sequence[GenerationRecord], retry_deadlock: bool
                     ) -> list[tuple[GenerationRecord, bool] | GMVError]:
        now = time.time()
        records = [r if r.recorded_at else _replace(r, recorded_at=now) for r in records]
        for record in records:
            check_record(record)
        # Each record's leaf hash, from its own content alone: computed before the lock, so
        # hashing never holds up another writer.
        leaves = [_leaf_hash(record) for record in records]
        # Only a record given an old time of its own can fall in a sealed month: sealing waits
        # SEAL_GRACE_S after a month ends, and the ledger stamps records with the time now.
        old = {transparency.period_of(r.recorded_at) for r in records if r.recorded_at < now - transparency.SEAL_GRACE_S}
        refused: dict[tuple[str, str], GMVError] = {}
        with self._lock:
            conn = self._connection()
            try:
                self._begin(conn)
                sealed = self._sealed_among(conn, old) if old else set()
                stored: dict[tuple[str, str], tuple[GenerationRecord, bool]] = {}
                settings_written: set[str] = set()  # a batch's records mostly share their settings
                for record, leaf in zip(records, leaves):
                    key = (record.tenant_id, record.generation_id)
                    if key not in stored and key not in refused:
                        earlier = self._get(conn, record.generation_id, record.tenant_id)
                        if earlier is None and sealed and transparency.period_of(record.recorded_at) in sealed:
                            refused[key] = GMVError(
                                f"generation '{record.generation_id}' is dated {transparency.iso(record.recorded_at)}, "
                                f"in {transparency.period_of(record.recorded_at)}, which is sealed: a sealed month "
                                "takes no new records")
                            continue
                        if earlier is None:
                            self._insert(conn, record, leaf, settings_written)
                        stored[key] = (earlier, False) if earlier else (record, True)
                conn.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001
                self._rollback(conn)
                deadlocked = self._is_deadlock(exc)
                if not (deadlocked or self._is_duplicate_key(exc)):
                    raise self._fail(exc, f"recording {len(records)} generation(s)") from exc
                # Another replica recorded one of the ids between our read and our insert, or its
                # group commit and ours each inserted an id the other then wanted (PostgreSQL
                # aborts one of two such transactions): record one by one, so each sees the
                # other's row. Nothing of the aborted transaction was kept.
                if len(records) > 1:
                    return [self.record_many([r])[0] for r in records]
                if deadlocked:
                    if not retry_deadlock:
                        raise self._fail(exc, f"recording generation '{records[0].generation_id}'") from exc
                    return [self._record_again(records[0])]
                return [self._outcome(records[0], self._earlier(records[0]))]
        outcomes = []
        for record in records:
            if (record.tenant_id, record.generation_id) in refused:
                outcomes.append(refused[(record.tenant_id, record.generation_id)])
                continue
            first, new = stored[(record.tenant_id, record.generation_id)]
            # A second request for an id inside this same batch replays the first.
            earlier = None if new and first is record else first
            outcomes.append(self._outcome(record, earlier))
        return outcomes

    def _record_again(self, record: GenerationRecord):
        """A single record whose transaction was aborted as a deadlock: up to 3 more tries."""
        for attempt in range(3):
            time.sleep(0.01 * (attempt + 1))
            try:
                return self._record_many([record], retry_deadlock=False)[0]
            except LedgerUnavailableError as exc:
                if attempt == 2 or not self._is_deadlock(exc.__cause__):
                    raise

    def _earlier(self, record: GenerationRecord) -> GenerationRecord:
        earlier = self.get(record.generation_id, record.tenant_id)
        if earlier is None:
            raise GMVError(f"generation '{record.generation_id}' hit a duplicate key but is not in the ledger")
        return earlier

    @staticmethod
    def _outcome(record: GenerationRecord, earlier: GenerationRecord | None) -> tuple[GenerationRecord, bool] | GMVError:
        if earlier is None:
            return record, True
        if earlier.image_sha256 != record.image_sha256:
            return GenerationConflictError(
                f"generation '{record.generation_id}' was already recorded with a different image "
                f"(sha256 {earlier.image_sha256[:12]}..., this one {record.image_sha256[:12]}...); "
                "a generation_id must be unique per generated image")
        return earlier, False

    def _insert(self, conn, record: GenerationRecord, leaf_hash: str | None, settings_written: set[str]) -> None:
        self._execute(conn, "INSERT INTO generations (generation_id, recorded_at, tenant_id, collection, profile, "
                            "settings_hash, image_sha256, quality, leaf_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (record.generation_id, record.recorded_at, record.tenant_id, record.collection, record.profile,
                       record.settings_hash, record.image_sha256, record.quality, leaf_hash))
        statement = self._sql("INSERT INTO credits (tenant_id, generation_id, rank, training_id, contributor_id, "
                              "credit, distance) VALUES (?, ?, ?, ?, ?, ?, ?)")
        rows = [(record.tenant_id, record.generation_id, c.rank, c.training_id, c.contributor_id, c.credit, c.distance)
                for c in record.credits]
        if rows:
            conn.cursor().executemany(statement, rows)
        # The settings row once per hash and transaction (the first one wins anyway): one
        # statement a batch instead of one a record, a round trip each on PostgreSQL.
        if record.settings and record.settings_hash not in settings_written:
            self._execute(conn, "INSERT INTO pipeline_settings (settings_hash, settings) VALUES (?, ?) "
                                "ON CONFLICT (settings_hash) DO NOTHING",
                          (record.settings_hash, json.dumps(record.settings, sort_keys=True)))
            settings_written.add(record.settings_hash)

    # -- reading ------------------------------------------------------------------------------
    def get(self, generation_id: str, tenant_id: str | None = None) -> GenerationRecord | None:
        """Tenant `tenant_id`'s generation `generation_id`; with tenant_id None, any tenant's
        (an operator's lookup: the first tenant in order when several used the id)."""
        with self._lock:
            try:
                return self._get(self._connection(), generation_id, tenant_id)
            except GMVError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise self._fail(exc, f"reading generation '{generation_id}'") from exc

    def _get(self, conn, generation_id: str, tenant_id: str | None) -> GenerationRecord | None:
        tenant_clause, params = ("", (generation_id,)) if tenant_id is None else (" AND tenant_id = ?",
                                                                                (generation_id, tenant_id))
        row = self._execute(conn, "SELECT generation_id, tenant_id, collection, profile, settings_hash, image_sha256, "
                                  "quality, recorded_at FROM generations WHERE generation_id = ?" + tenant_clause +
                                  " ORDER BY tenant_id LIMIT 1", params).fetchone()
        if row is None:
            return None
        credits = self._execute(conn, "SELECT rank, training_id, contributor_id, credit, distance FROM credits "
                                      "WHERE generation_id = ? AND tenant_id = ? ORDER BY rank",
                                (generation_id, row[1])).fetchall()
        return GenerationRecord(*row[:7], credits=tuple(Credit(*c) for c in credits), recorded_at=row[7])

    def _write(self, doing: str, statement: str, params: Sequence[Any]) -> None:
        """One statement in its own transaction."""
        with self._lock:
            conn = self._connection()
            try:
                self._begin(conn)
                self._execute(conn, statement, params)
                conn.execute("COMMIT")
            except Exception as exc:  # noqa: BLE001
                self._rollback(conn)
                raise self._fail(exc, doing) from exc

    def _query(self, statement: str, params: Sequence[Any], doing: str) -> list[tuple]:
        with self._lock:
            try:
                return self._execute(self._connection(), statement, params).fetchall()
            except GMVError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise self._fail(exc, doing) from exc

    def values(self, window: Window = Window(), limit: int | None = None,
               training_ids: Iterable[str] | None = None) -> list[TrainingValue]:
        """phi_i per credited training image, largest first. Images no generation credited
        have phi_i = 0 and no row."""
        where, params = window.where()
        if training_ids is not None:
            ids = list(training_ids)
            if not ids:
                return []
            where += (" AND " if where else " WHERE ") + f"c.training_id IN ({', '.join('?' * len(ids))})"
            params += ids
        statement = ("SELECT c.training_id, MIN(c.contributor_id), SUM(c.credit) AS value, COUNT(*) "
                     "FROM credits c JOIN generations g ON g.tenant_id = c.tenant_id AND g.generation_id = c.generation_id"
                     + where +
                     " GROUP BY c.training_id ORDER BY value DESC, c.training_id")
        if limit:
            statement += f" LIMIT {int(limit)}"
        rows = self._query(statement, params, "computing data values")
        return [TrainingValue(r[0], r[1], float(r[2]), int(r[3])) for r in rows]

    def contributors(self, window: Window = Window(), limit: int | None = None) -> list[ContributorValue]:
        """Credit totals per contributor, largest first."""
        where, params = window.where()
        statement = ("SELECT c.contributor_id, SUM(c.credit) AS value, COUNT(DISTINCT c.generation_id), "
                     "COUNT(DISTINCT c.training_id) FROM credits c JOIN generations g "
                     "ON g.tenant_id = c.tenant_id AND g.generation_id = c.generation_id" + where +
                     " GROUP BY c.contributor_id ORDER BY value DESC, c.contributor_id")
        if limit:
            statement += f" LIMIT {int(limit)}"
        rows = self._query(statement, params, "totalling contributors")
        return [ContributorValue(r[0], float(r[1]), int(r[2]), int(r[3])) for r in rows]

    def totals(self, window: Window = Window()) -> tuple[int, float]:
        """(generations recorded, sum of their credits) in the window."""
        where, params = window.where()
        generations = self._query("SELECT COUNT(*) FROM generations g" + where, params, "counting generations")
        credit = self._query("SELECT COALESCE(SUM(c.credit), 0) FROM credits c JOIN generations g "
                             "ON g.tenant_id = c.tenant_id AND g.generation_id = c.generation_id" + where, params, "summing credits")
        return int(generations[0][0]), float(credit[0][0])

    def integrity_problems(self) -> list[str]:
        """What would make the ledger untrustworthy: credit rows without their generation, or a
        generation whose credits do not sum to its quality. Empty when all is well."""
        problems = []
        orphans = self._query("SELECT COUNT(*) FROM credits c LEFT JOIN generations g "
                              "ON g.tenant_id = c.tenant_id AND g.generation_id = c.generation_id "
                              "WHERE g.generation_id IS NULL", (), "checking")
        if orphans[0][0]:
            problems.append(f"{orphans[0][0]} credit rows without their generation")
        # Credits are q * softmax, so they sum to q (up to float rounding); an empty top-k sums to 0.
        unbalanced = self._query(
            "SELECT g.generation_id, g.quality, COALESCE(SUM(c.credit), 0), COUNT(c.rank), COALESCE(MAX(c.rank), 0) "
            "FROM generations g LEFT JOIN credits c ON c.tenant_id = g.tenant_id AND c.generation_id = g.generation_id "
            "GROUP BY g.tenant_id, g.generation_id, g.quality", (), "checking")
        for generation_id, quality, total, count, max_rank in unbalanced:
            if count != max_rank:
                problems.append(f"generation '{generation_id}' has {count} credits but ranks up to {max_rank}")
            elif count and abs(total - quality) > 1e-6 * max(1.0, quality):
                problems.append(f"generation '{generation_id}': credits sum to {total}, quality is {quality}")
        return problems

    def iter_credits(self, window: Window = Window()) -> Iterator[tuple]:
        """Every credit row in the window with its generation's fields, oldest first: the
        line-item export behind a payout."""
        where, params = window.where()
        statement = ("SELECT g.generation_id, g.recorded_at, g.tenant_id, g.collection, g.profile, g.settings_hash, "
                     "g.quality, c.rank, c.training_id, c.contributor_id, c.credit, c.distance "
                     "FROM credits c JOIN generations g ON g.tenant_id = c.tenant_id AND g.generation_id = c.generation_id"
                     + where +
                     " ORDER BY g.recorded_at, g.generation_id, c.rank")
        yield from self._query(statement, params, "exporting credits")


CREDIT_COLUMNS = ("generation_id", "recorded_at", "tenant_id", "collection", "profile", "settings_hash", "quality",
                  "rank", "training_id", "contributor_id", "credit", "distance")


def check_record(record: GenerationRecord) -> None:
    if not record.generation_id:
        raise ValueError("a ledger record needs a generation_id")
    if not math.isfinite(record.recorded_at):
        raise ValueError(f"generation '{record.generation_id}': recorded_at must be a finite time")
    if [c.rank for c in record.credits] != list(range(1, len(record.credits) + 1)):
        raise ValueError(f"generation '{record.generation_id}': credit ranks must be 1..{len(record.credits)} in order")
    if not (0.0 <= record.quality <= 1.0) or any(not math.isfinite(c.credit) or c.credit < 0 for c in record.credits):
        raise ValueError(f"generation '{record.generation_id}': quality and credits must be finite and non-negative")


def _leaf_hash(record: GenerationRecord) -> str | None:
    """The record's leaf hash; None for a record whose fields are not of their types (a None
    training id, say), which the database then refuses by its NOT NULL constraints."""
    try:
        return transparency.record_leaf_hash(record)
    except (AttributeError, TypeError, struct.error):
        return None


def _replace(record: GenerationRecord, **changes) -> GenerationRecord:
    from dataclasses import replace

    return replace(record, **changes)


class SQLiteLedger(Ledger):
    backend = "sqlite"

    def __init__(self, url: str):
        self.path = Path(sqlite_path(url))
        super().__init__(url)

    def _connect(self):
        # Royalty records and API key hashes: the owner's alone (SQLite gives its -wal and -shm
        # files the database file's mode).
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.touch(mode=0o600, exist_ok=True)
        os.chmod(self.path, 0o600)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so one record is one transaction.
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a commit is on disk when it returns
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def _begin(self, conn) -> None:
        # IMMEDIATE takes the write lock up front: the id check and the insert cannot interleave
        # with another process's.
        conn.execute("BEGIN IMMEDIATE")

    def _is_duplicate_key(self, exc: Exception) -> bool:
        # BEGIN IMMEDIATE means no other writer can insert between our read and our write, so
        # this only guards the generations primary key; other integrity errors are failures.
        return isinstance(exc, sqlite3.IntegrityError) and "generations.generation_id" in str(exc)

    def _is_unavailable(self, exc: Exception) -> bool:
        return isinstance(exc, sqlite3.OperationalError)

    def _table_exists(self, conn, name: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None


class PostgresLedger(Ledger):
    backend = "postgresql"
    placeholder = "%s"

    def _connect(self):
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    def _lock_migrations(self, conn) -> None:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (0x676D76,))  # "gmv"

    def _is_duplicate_key(self, exc: Exception) -> bool:
        import psycopg

        return isinstance(exc, psycopg.errors.UniqueViolation) and exc.diag.constraint_name == "generations_key"

    def _is_deadlock(self, exc: BaseException | None) -> bool:
        import psycopg

        return isinstance(exc, psycopg.errors.DeadlockDetected)

    def _is_unavailable(self, exc: Exception) -> bool:
        import psycopg

        return isinstance(exc, psycopg.OperationalError)

    def _table_exists(self, conn, name: str) -> bool:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def sqlite_path(url: str) -> str:
    return url[len("sqlite:///"):] if url.startswith("sqlite:///") else url


def open_ledger(url: str) -> Ledger:
    """`postgresql://user:pass@host:5432/db` (or postgres://), `sqlite:///path/ledger.db`, or a
    plain file path (SQLite)."""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresLedger(url)
    if "://" in url and not url.startswith("sqlite:///"):
        raise ValueError(f"unsupported ledger URL '{url}': use postgresql://..., sqlite:///PATH or a file path")
    return SQLiteLedger(url)


def default_ledger_url(data_dir: str | Path) -> str:
    return str(Path(data_dir) / "ledger.sqlite3")
