"""The tamper-evident ledger: RFC 6962 Merkle trees (against published test vectors and hand-
built trees), leaf hashes written with every record, signed monthly checkpoints, `verify`
naming what was changed, removed or inserted by direct SQL, and inclusion proofs a third party
checks with the public key alone. Ledger tests run on SQLite and PostgreSQL (`ledger_url`)."""
from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
import os
import re
import stat
import subprocess
import sys
import threading

import pytest

from gmv_engine import transparency as t
from gmv_engine.credit import Credit
from gmv_engine.errors import GMVError
from gmv_engine.ledger import AlreadySealedError, GenerationRecord, open_ledger, settings_hash

H = bytes.fromhex
MONTH = "2024-03"
SINCE, UNTIL = t.month_bounds(MONTH)


def make_record(generation_id: str, credits: list[tuple[str, str, float]], recorded_at: float,
                tenant: str = "tenant-1", image: str = "image-a") -> GenerationRecord:
    rows = tuple(Credit(rank, training_id, contributor, credit, 0.1 * rank)
                 for rank, (training_id, contributor, credit) in enumerate(credits, start=1))
    settings = {"top_k": len(credits)}
    return GenerationRecord(generation_id, tenant, "digits", "offline", settings_hash(settings), image,
                            sum(c.credit for c in rows), rows, recorded_at, settings)


# Six generations in March 2024 (two tenants, one pair recorded at the same instant as a group
# commit stamps them) and one in April.
RECORDS = [
    make_record("g1", [("a", "x", 0.5), ("c", "y", 0.25)], SINCE + 100),
    make_record("g2", [("a", "x", 0.25), ("b", "x", 0.125)], SINCE + 200, tenant="tenant-2"),
    make_record("g3", [("c", "y", 0.5)], SINCE + 300),
    make_record("g4", [("b", "x", 0.375), ("a", "x", 0.125), ("c", "y", 0.0625)], SINCE + 400),
    make_record("g5", [("a", "x", 0.75)], SINCE + 400, tenant="tenant-0"),
    make_record("g6", [], SINCE + 86400 * 20),
    make_record("april", [("a", "x", 0.5)], UNTIL + 10),
]


@pytest.fixture
def key(tmp_path):
    return t.generate_key_file(tmp_path / "signing-key.pem")


def filled(url: str):
    ledger = open_ledger(url)
    outcomes = ledger.record_many(RECORDS)
    assert all(new for _, new in outcomes)
    return ledger


def sql(ledger, statement: str, params=()) -> None:
    """Direct SQL, as someone with write access to the database would tamper."""
    conn = ledger._connection()
    ledger._execute(conn, statement, params)
    if ledger.backend == "sqlite" and conn.in_transaction:
        conn.execute("COMMIT")


# -- Merkle trees -------------------------------------------------------------------------------

# transparency-dev/merkle (Certificate Transparency's Go library), testonly/constants.go: leaf
# inputs and the roots of their first n leaves, and testonly/reference_test.go's paths.
CT_LEAVES = [H(""), H("00"), H("10"), H("2021"), H("3031"), H("40414243"), H("5051525354555657"),
             H("606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"]
CT_PATHS = {
    (0, 1): [],
    (0, 2): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"],
    (1, 2): ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"],
    (0, 8): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (5, 8): ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
}
# compact/range_test.go, TestGetRootHashGolden: leaf i is the 2 bytes of i, little-endian.
CT_GOLDEN = {10: "VjWMPSYNtCuCNlF/RLnQy6HcwSk6CIipfxm+hettA+4=", 15: "j4SulYmocFuxdeyp12xXCIgK6PekBcxzAIj4zbQzNEI=",
             16: "c+4Uc6BCMOZf/v3NZK1kqTUJe+bBoFtOhP+P3SayKRE=", 100: "dUh9hYH88p0CMoHkdr1wC2szbhcLAXOejWpINIooKUY=",
             255: "SmdsuKUqiod3RX2jyF2M6JnbdE4QuTwwipfAowI4/i0="}


def reference_root(leaf_hashes: list[bytes]) -> bytes:
    """MTH as RFC 6962 section 2.1 defines it, recursively."""
    if len(leaf_hashes) == 1:
        return leaf_hashes[0]
    k = 1 << ((len(leaf_hashes) - 1).bit_length() - 1)  # the largest power of two below n
    return t.hash_children(reference_root(leaf_hashes[:k]), reference_root(leaf_hashes[k:]))


def reference_path(m: int, leaf_hashes: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 6962 section 2.1.1, recursively."""
    if len(leaf_hashes) == 1:
        return []
    k = 1 << ((len(leaf_hashes) - 1).bit_length() - 1)
    if m < k:
        return reference_path(m, leaf_hashes[:k]) + [reference_root(leaf_hashes[k:])]
    return reference_path(m - k, leaf_hashes[k:]) + [reference_root(leaf_hashes[:k])]


def test_roots_and_paths_match_certificate_transparency_test_vectors():
    hashes = [t.hash_leaf(leaf) for leaf in CT_LEAVES]
    assert t.merkle_root([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert [t.merkle_root(hashes[:n]).hex() for n in range(1, 9)] == CT_ROOTS
    for (index, size), path in CT_PATHS.items():
        assert [h.hex() for h in t.audit_path(index, hashes[:size])] == path, (index, size)
    for size, root in CT_GOLDEN.items():
        leaves = [t.hash_leaf(i.to_bytes(2, "little")) for i in range(size)]
        assert base64.b64encode(t.merkle_root(leaves)).decode() == root, size


def test_trees_of_1_to_8_leaves_as_drawn_by_hand():
    n = [t.hash_leaf(bytes([i])) for i in range(8)]
    c = t.hash_children
    drawn = {
        1: n[0],
        2: c(n[0], n[1]),
        3: c(c(n[0], n[1]), n[2]),
        4: c(c(n[0], n[1]), c(n[2], n[3])),
        5: c(c(c(n[0], n[1]), c(n[2], n[3])), n[4]),
        6: c(c(c(n[0], n[1]), c(n[2], n[3])), c(n[4], n[5])),
        7: c(c(c(n[0], n[1]), c(n[2], n[3])), c(c(n[4], n[5]), n[6])),
        8: c(c(c(n[0], n[1]), c(n[2], n[3])), c(c(n[4], n[5]), c(n[6], n[7]))),
    }
    for size, root in drawn.items():
        assert t.merkle_root(n[:size]) == root == reference_root(n[:size])
    # Leaf 4 of 7: its sibling 5, then the carried-up leaf 6, then the left half.
    assert t.audit_path(4, n[:7]) == [n[5], n[6], drawn[4]]
    assert t.audit_path(6, n[:7]) == [c(n[4], n[5]), drawn[4]]  # 6 has no sibling at the bottom
    assert t.audit_path(4, n[:5]) == [drawn[4]]


def test_every_leaf_of_every_tree_up_to_70_has_a_proof_that_verifies_and_only_there():
    for size in range(1, 71):
        leaves = [t.hash_leaf(f"leaf {i}".encode()) for i in range(size)]
        root = t.merkle_root(leaves)
        assert root == reference_root(leaves)
        for index in range(size):
            path = t.audit_path(index, leaves)
            assert path == reference_path(index, leaves)
            assert t.root_from_path(index, size, leaves[index], path) == root
            if size <= 8:  # the wrong index, leaf, or a damaged path leads elsewhere or fails. (Not
                # the size alone: leaf 0 of 3 has the path of leaf 0 of 4 when leaf 2 stands in for
                # the node above leaves 2 and 3; the checkpoint signs the size, check_proof compares it.)
                wrong = [(index ^ 1, size, leaves[index], path),
                         (index, size, t.hash_leaf(b"other"), path), (index, size, leaves[index], path + [root]),
                         (index, size, leaves[index], path[:-1]), (index, size * 2, leaves[index], path)]
                wrong += [(index, size, leaves[index], path[:i] + [bytes([path[i][0] ^ 8]) + path[i][1:]] + path[i + 1:])
                          for i in range(len(path))]
                for args in wrong:
                    if args[0] >= args[1] or args == (index, size, leaves[index], path):
                        continue  # outside the tree, or no change (a 1-leaf tree's path is empty)
                    try:
                        assert t.root_from_path(*args) != root, args
                    except t.ProofError:
                        pass
    with pytest.raises(t.ProofError, match="outside"):
        t.root_from_path(3, 3, leaves[0], [])


# -- what a leaf commits to ---------------------------------------------------------------------

def test_a_leaf_commits_to_every_field_of_the_record_and_its_credits():
    record = RECORDS[3]
    base = t.record_leaf_hash(record)
    changes = [dict(tenant_id="tenant-x"), dict(generation_id="g4x"), dict(recorded_at=record.recorded_at + 1e-6),
               dict(collection="other"), dict(profile="paper"), dict(settings_hash="0" * 64),
               dict(image_sha256="f" * 64), dict(quality=record.quality + 1e-12)]
    for change in changes:
        assert t.record_leaf_hash(dataclasses.replace(record, **change)) != base, change
    for i in range(len(record.credits)):
        for field in ("training_id", "contributor_id", "credit", "distance"):
            value = getattr(record.credits[i], field)
            credits = list(record.credits)
            credits[i] = dataclasses.replace(credits[i], **{field: value + ("z" if isinstance(value, str) else 1e-15)})
            assert t.record_leaf_hash(dataclasses.replace(record, credits=tuple(credits))) != base, (i, field)
    assert t.record_leaf_hash(dataclasses.replace(record, credits=record.credits[:-1])) != base
    # Lengths, not separators: moving a character from one field to the next is another leaf.
    assert t.record_leaf_hash(dataclasses.replace(record, tenant_id="ab", generation_id="c")) != \
        t.record_leaf_hash(dataclasses.replace(record, tenant_id="a", generation_id="bc"))
    # The JSON a proof carries gives back the same bytes, and ints where floats were stored do too.
    assert t.document_leaf_bytes(json.loads(json.dumps(t.record_document(record)))) == t.leaf_bytes(record)
    assert t.leaf_bytes(dataclasses.replace(record, recorded_at=int(SINCE))) == \
        t.leaf_bytes(dataclasses.replace(record, recorded_at=float(SINCE)))


def test_months_are_calendar_months_in_utc_to_the_last_instant():
    assert t.month_bounds("2024-12") == (1733011200.0, 1735689600.0)
    assert t.period_of(math.nextafter(UNTIL, 0)) == MONTH and t.period_of(UNTIL) == "2024-04" and t.period_of(SINCE) == MONTH
    for bad in ("2024-3", "2024-13", "march"):
        with pytest.raises(ValueError, match="not a month"):
            t.month_bounds(bad)


# -- the ledger: leaf hashes, sealing and verifying, on both backends ---------------------------

def test_every_record_is_written_with_its_leaf_hash_and_an_untouched_ledger_verifies(ledger_url, key):
    with filled(ledger_url) as ledger:
        stored = list(ledger.iter_records())
        assert [r.generation_id for r, _ in stored] == ["g1", "g2", "g3", "g5", "g4", "g6", "april"]  # leaf order
        assert all(leaf == t.record_leaf_hash(record) for record, leaf in stored)
        assert [r for r, _ in stored] == [dataclasses.replace(r, settings={}) for r in sorted(
            RECORDS, key=lambda r: (r.recorded_at, r.tenant_id, r.generation_id))]
        report = ledger.verify()
        assert report.ok and report.records == 7 and report.unsealed == [MONTH, "2024-04"]
        checkpoint = ledger.seal(MONTH, key)
        document = checkpoint.document
        assert (document["tree_size"], document["period"], document["key_id"]) == (6, MONTH, t.key_id(key.public_key()))
        assert document["root_hash"] == t.merkle_root([H(leaf) for r, leaf in stored[:6]]).hex()
        assert document["total_credit"] == 2.9375  # fsum: exact here
        assert document["tenants"] == {"tenant-0": {"generations": 1, "credit": 0.75},
                                       "tenant-1": {"generations": 4, "credit": 1.8125},
                                       "tenant-2": {"generations": 1, "credit": 0.375}}
        assert [leaf for _, _, leaf in ledger.sealed_leaves(MONTH)] == [leaf for _, leaf in stored[:6]]
        report = ledger.verify(public_keys=[key.public_key()])
        assert report.ok, report.findings
        assert report.sealed == [MONTH] and report.unsealed == ["2024-04"]
        assert ledger.verify(MONTH, [key.public_key()]).records == 6


def test_verify_names_a_changed_credit_a_removed_and_an_inserted_record_in_a_sealed_month(ledger_url, key):
    with filled(ledger_url) as ledger:
        ledger.seal(MONTH, key)
        keys = [key.public_key()]
        # UPDATE one credit (the leaf column untouched).
        sql(ledger, "UPDATE credits SET credit = 0.45 WHERE tenant_id = 'tenant-1' AND generation_id = 'g3' AND rank = 1")
        findings = ledger.verify(public_keys=keys).findings
        assert len(findings) == 1 and findings[0].startswith(f"{MONTH}: generation tenant-1/g3 (leaf 2 of 6): changed")
        assert "credits sum to 0.45, not to its quality 0.5" in findings[0]
        # ... and the leaf column rewritten to match: still named, against the sealed leaf.
        forged = t.record_leaf_hash(ledger.get("g3", "tenant-1"))
        sql(ledger, "UPDATE generations SET leaf_hash = ? WHERE generation_id = 'g3'", (forged,))
        assert [f.split(":")[1] for f in ledger.verify(public_keys=keys).findings] == \
            [" generation tenant-1/g3 (leaf 2 of 6)"]
        sql(ledger, "UPDATE credits SET credit = 0.5 WHERE generation_id = 'g3'")
        sql(ledger, "UPDATE generations SET leaf_hash = ? WHERE generation_id = 'g3'", (t.record_leaf_hash(RECORDS[2]),))
        assert ledger.verify(public_keys=keys).ok
        # DELETE one generation with its credits.
        sql(ledger, "DELETE FROM credits WHERE generation_id = 'g2'")
        sql(ledger, "DELETE FROM generations WHERE generation_id = 'g2'")
        assert ledger.verify(public_keys=keys).findings == [
            f"{MONTH}: generation tenant-2/g2 (leaf 1 of 6): removed since it was sealed"]
        with pytest.raises(GMVError, match="which is sealed"):  # nor can it be recorded again
            ledger.record(RECORDS[1])
        assert ledger.get("g2") is None
        # INSERT a forged generation, leaf hash and all, between g1 and g3.
        forged = make_record("forged", [("a", "x", 0.5)], SINCE + 150)
        sql(ledger, "INSERT INTO generations (generation_id, recorded_at, tenant_id, collection, profile, settings_hash, "
                    "image_sha256, quality, leaf_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (forged.generation_id, forged.recorded_at, forged.tenant_id, forged.collection, forged.profile,
             forged.settings_hash, forged.image_sha256, forged.quality, t.record_leaf_hash(forged)))
        sql(ledger, "INSERT INTO credits (tenant_id, generation_id, rank, training_id, contributor_id, credit, distance) "
                    "VALUES ('tenant-1', 'forged', 1, 'a', 'x', 0.5, 0.1)")
        report = ledger.verify(public_keys=[key.public_key()])
        # In leaf order: both are at position 1, where g2 was sealed and the forgery (150 s) now is.
        assert report.findings == [
            f"{MONTH}: generation tenant-2/g2 (leaf 1 of 6): removed since it was sealed",
            f"{MONTH}: generation tenant-1/forged: inserted after the month was sealed (not among its 6 sealed leaves)"]
        sql(ledger, "UPDATE credits SET rank = 3 WHERE generation_id = 'g1' AND rank = 2")
        findings = ledger.verify(public_keys=[key.public_key()]).findings
        assert len(findings) == 3 and findings[1:] == report.findings
        assert findings[0] == f"{MONTH}: generation tenant-1/g1 (leaf 0 of 6): changed since it was sealed; its " \
                              "content no longer matches the leaf hash stored with it (changed after it was recorded); " \
                              "its credit ranks are [1, 3] (a credit row was removed or added)"


def test_the_record_refused_into_a_sealed_month_is_named_not_written(ledger_url, key):
    with filled(ledger_url) as ledger:
        ledger.seal(MONTH, key)
        late = make_record("late", [("a", "x", 0.5)], SINCE + 5)
        outcomes = ledger.record_many([late, RECORDS[0], make_record("may", [("a", "x", 0.5)], UNTIL + 86400 * 40)])
        assert isinstance(outcomes[0], GMVError) and "which is sealed" in str(outcomes[0])
        assert outcomes[1][1] is False and outcomes[2][1] is True  # a replay still answers; other months record
        assert ledger.get("late") is None and ledger.verify(public_keys=[key.public_key()]).ok


def test_an_update_in_an_unsealed_month_is_named_by_its_leaf_hash(ledger_url):
    with filled(ledger_url) as ledger:
        sql(ledger, "UPDATE credits SET credit = 0.3 WHERE generation_id = 'april'")
        sql(ledger, "UPDATE generations SET quality = 0.3 WHERE generation_id = 'april'")  # sums still agree
        sql(ledger, "UPDATE generations SET collection = 'other' WHERE generation_id = 'g5'")
        findings = ledger.verify().findings
        assert findings == [
            f"{MONTH}: generation tenant-0/g5: its content no longer matches the leaf hash stored with it (changed "
            "after it was recorded)",
            "2024-04: generation tenant-1/april: its content no longer matches the leaf hash stored with it (changed "
            "after it was recorded)"]
        # A generation row deleted under its credits (SQLite's foreign keys switched off).
        if ledger.backend == "sqlite":
            ledger._connection().execute("PRAGMA foreign_keys=OFF")
            sql(ledger, "DELETE FROM generations WHERE generation_id = 'g6'")
            sql(ledger, "DELETE FROM generations WHERE generation_id = 'g1'")
            assert ledger.verify().findings[-1] == "generation tenant-1/g1: 2 credit row(s) without their generation " \
                                                   "(its generation row was removed)"


def test_a_changed_checkpoint_sealed_leaf_list_or_signing_key_is_named(ledger_url, key, tmp_path):
    with filled(ledger_url) as ledger:
        ledger.seal(MONTH, key)
        keys = [key.public_key()]
        stranger = t.generate_key_file(tmp_path / "other.pem")
        assert "no given public key is that one" in ledger.verify(public_keys=[stranger.public_key()]).findings[0]
        # Someone with the database but not the key removes a record and its sealed leaf...
        sql(ledger, "DELETE FROM credits WHERE generation_id = 'g4'")
        sql(ledger, "DELETE FROM generations WHERE generation_id = 'g4'")
        sql(ledger, "DELETE FROM ledger_sealed_leaves WHERE period = ? AND leaf_index = 4", (MONTH,))
        findings = ledger.verify(public_keys=keys).findings
        assert findings[0] == f"{MONTH}: sealed leaf row(s) 4 were deleted after sealing"
        assert "no longer gives the signed root of 6 leaves" in findings[1]
        # ...renumbers the leaves, and re-signs the checkpoint with a key of their own.
        sql(ledger, "UPDATE ledger_sealed_leaves SET leaf_index = 4 WHERE period = ? AND leaf_index = 5", (MONTH,))
        leaves = [H(leaf) for _, _, leaf in ledger.sealed_leaves(MONTH)]
        document = ledger.checkpoint(MONTH).document
        document.update(tree_size=5, root_hash=t.merkle_root(leaves).hex(), key_id=t.key_id(stranger.public_key()))
        text, signature = t.sign_checkpoint(document, stranger)
        sql(ledger, "UPDATE ledger_checkpoints SET checkpoint = ?, signature = ?, public_key = ? WHERE period = ?",
            (text, signature, t.public_key_pem(stranger.public_key()), MONTH))
        assert ledger.verify().ok  # without a key of one's own, a re-signed ledger looks whole...
        assert any("not checked against a key of your own" in note for note in ledger.verify().notes)
        findings = ledger.verify(public_keys=keys).findings  # ...with the published key it does not
        assert len(findings) == 1 and f"signed by key {t.key_id(stranger.public_key())}" in findings[0]
        # A checkpoint edited without re-signing fails its signature.
        sql(ledger, "UPDATE ledger_checkpoints SET checkpoint = ? WHERE period = ?",
            (text.replace('"tree_size":5', '"tree_size":6'), MONTH))
        assert "signature does not verify" in ledger.verify(public_keys=[stranger.public_key()]).findings[0]


def test_sealing_waits_for_the_month_to_end_refuses_twice_and_refuses_changed_records(ledger_url, key):
    with filled(ledger_url) as ledger:
        with pytest.raises(GMVError, match="cannot be sealed before 2024-04-01T01:00:00"):
            ledger.seal(MONTH, key, now=UNTIL + 3000)
        sql(ledger, "UPDATE credits SET distance = 0.7 WHERE generation_id = 'g1' AND rank = 2")
        with pytest.raises(GMVError, match="refusing to seal 2024-03: 1 record.*tenant-1/g1"):
            ledger.seal(MONTH, key)
        assert ledger.checkpoint(MONTH) is None
        sql(ledger, "UPDATE credits SET distance = 0.2 WHERE generation_id = 'g1' AND rank = 2")
        first = ledger.seal(MONTH, key, now=UNTIL + 3700)
        with pytest.raises(AlreadySealedError):
            ledger.seal(MONTH, key)
        assert ledger.checkpoint(MONTH) == first and len(ledger.sealed_leaves(MONTH)) == 6
        empty = ledger.seal("2023-01", key)  # a month with no records has a checkpoint too
        assert (empty.tree_size, empty.root_hash) == (0, t.EMPTY_ROOT.hex())
        assert ledger.verify(public_keys=[key.public_key()]).sealed == ["2023-01", MONTH]


# -- inclusion proofs -----------------------------------------------------------------------------

def test_an_inclusion_proof_verifies_with_the_public_key_alone_and_fails_after_tampering(ledger_url, key, tmp_path):
    with filled(ledger_url) as ledger:
        with pytest.raises(GMVError, match="not sealed yet"):
            ledger.prove("g4")
        ledger.seal(MONTH, key)
        proofs = {r.generation_id: ledger.prove(r.generation_id, r.tenant_id) for r in RECORDS[:6]}
        with pytest.raises(GMVError, match="no generation 'nope'"):
            ledger.prove("nope")
    # The third party's side: JSON and the public key PEM, nothing of GMV's but check_proof.
    public = t.load_public_key(t.public_path(tmp_path / "signing-key.pem"))
    for generation_id, proof in proofs.items():
        proof = json.loads(json.dumps(proof))
        checked = t.check_proof(proof, [public])
        assert checked.record["generation_id"] == generation_id and checked.checkpoint["period"] == MONTH
    proof = json.loads(json.dumps(proofs["g4"]))
    assert t.check_proof(proof, [public]).record["credits"][1] == {
        "rank": 2, "training_id": "a", "contributor_id": "x", "credit": 0.125, "distance": 0.2}

    def tampered(change) -> str:
        bad = copy.deepcopy(proof)
        change(bad)
        with pytest.raises(t.ProofError) as failed:
            t.check_proof(bad, [public])
        return str(failed.value)

    assert "record was changed" in tampered(lambda p: p["record"]["credits"][0].update(credit=0.5))
    assert "do not lead to the signed root" in tampered(
        lambda p: (p["record"]["credits"][0].update(credit=0.5), p.pop("leaf_hash")))
    assert "do not lead to the signed root" in tampered(
        lambda p: p["audit_path"].__setitem__(0, "00" + p["audit_path"][0][2:]))
    for index in (0, 3, 5):  # another index: another path shape (an error) or another root
        assert re.search("do not lead to the signed root|than the tree is deep",
                         tampered(lambda p, i=index: p.update(leaf_index=i)))
    assert "shorter than the tree is deep" in tampered(lambda p: p["audit_path"].pop())
    assert "longer than the tree is deep" in tampered(lambda p: p["audit_path"].append("00" * 32))
    assert "signature does not verify" in tampered(
        lambda p: p.update(checkpoint=p["checkpoint"].replace(json.loads(p["checkpoint"])["root_hash"], "0" * 64)))
    assert "signature does not verify" in tampered(
        lambda p: p.update(signature=base64.b64encode(bytes(64)).decode()))
    assert "tree of 7 leaves" in tampered(lambda p: p.update(tree_size=7))
    assert "malformed" in tampered(lambda p: p["record"].pop("quality"))
    assert "not a float" in tampered(lambda p: p["record"].update(quality="0.5625"))
    other = t.generate_key_file(tmp_path / "other.pem").public_key()
    with pytest.raises(t.ProofError, match="no given public key is that one"):
        t.check_proof(proof, [other])


def test_no_proof_for_a_record_changed_or_inserted_after_sealing(ledger_url, key):
    with filled(ledger_url) as ledger:
        ledger.seal(MONTH, key)
        sql(ledger, "UPDATE credits SET credit = 0.25 WHERE generation_id = 'g1' AND rank = 1")
        with pytest.raises(GMVError, match="changed since 2024-03 was sealed"):
            ledger.prove("g1")
        sql(ledger, "DELETE FROM ledger_sealed_leaves WHERE period = ? AND leaf_index = 5", (MONTH,))
        with pytest.raises(GMVError, match="inserted after sealing"):
            ledger.prove("g6")
        with pytest.raises(GMVError, match="no longer give its signed root"):
            ledger.prove("g3")


# -- replicas and migrations ----------------------------------------------------------------------

def test_two_replicas_recording_at_once_keep_exactly_once_and_every_leaf_valid(ledger_url, key):
    """Two ledgers on one database (as two server replicas) recording the same ids in group
    commits, in opposite orders (on PostgreSQL the two transactions then wait on each other's
    new keys, and one is aborted as a deadlock and recorded again one by one): each id
    recorded once, every stored leaf the hash of its record, and the month seals and verifies."""
    records = [make_record(f"r{i}", [("a", "x", 0.5), ("b", "y", 0.25)], SINCE + 1000 + i // 4) for i in range(60)]
    replicas = [open_ledger(ledger_url), open_ledger(ledger_url)]
    outcomes: dict[int, list] = {}

    def write(n):
        order = records if n == 0 else records[::-1]
        outcomes[n] = [o for i in range(0, len(order), 6) for o in replicas[n].record_many(order[i:i + 6])]

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    new = [o[1] for n in range(2) for o in outcomes[n]]
    assert new.count(True) == 60 and new.count(False) == 60
    stored = list(replicas[0].iter_records())
    assert len(stored) == 60 and all(leaf == t.record_leaf_hash(r) for r, leaf in stored)
    replicas[1].seal(MONTH, key)
    assert replicas[0].verify(public_keys=[key.public_key()]).ok
    for replica in replicas:
        replica.close()


def test_a_ledger_from_before_leaf_hashes_gets_them_when_it_is_opened(ledger_url, monkeypatch, key):
    import gmv_engine.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "MIGRATIONS", ledger_module.MIGRATIONS[:3])
    monkeypatch.setattr(ledger_module, "SCHEMA_VERSION", 3)
    with open_ledger(ledger_url) as ledger:  # rows as version 3 wrote them: no leaf_hash column
        conn = ledger._connection()
        ledger._begin(conn)
        for r in RECORDS:
            ledger._execute(conn, "INSERT INTO generations (generation_id, recorded_at, tenant_id, collection, profile, "
                                  "settings_hash, image_sha256, quality) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (r.generation_id, r.recorded_at, r.tenant_id, r.collection, r.profile, r.settings_hash,
                             r.image_sha256, r.quality))
            for c in r.credits:
                ledger._execute(conn, "INSERT INTO credits VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (r.tenant_id, r.generation_id, c.rank, c.training_id, c.contributor_id, c.credit,
                                 c.distance))
        conn.execute("COMMIT")
    monkeypatch.undo()
    monkeypatch.setattr(ledger_module, "SLICE_RECORDS", 2)  # the backfill reads in slices
    with open_ledger(ledger_url) as ledger:
        assert ledger.schema_version() == ledger_module.SCHEMA_VERSION
        stored = list(ledger.iter_records())
        assert len(stored) == 7 and all(leaf == t.record_leaf_hash(r) for r, leaf in stored)
        ledger.seal(MONTH, key)
        assert ledger.verify(public_keys=[key.public_key()]).ok


# -- the command line -----------------------------------------------------------------------------

def gmv(*args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "gmv_server.cli", "ledger", *args], capture_output=True, text=True,
                         timeout=120)
    if check is not None:
        assert run.returncode == check, run.stdout + run.stderr
    return run


def test_seal_verify_prove_and_check_proof_from_the_command_line(ledger_url, tmp_path):
    filled(ledger_url).close()
    data = tmp_path / "data"
    where = ["--ledger-url", ledger_url, "--data-dir", str(data)]
    assert "cannot be sealed before" in gmv("seal", "--month", "2099-01", *where, check=2).stderr
    sealed = gmv("seal", "--month", MONTH, "--out", str(tmp_path / "checkpoint.json"), *where)
    key_file = data / "ledger-signing-key.pem"  # made on first use, the owner's alone
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and "made the signing key" in sealed.stderr
    assert f"sealed {MONTH}: 6 records" in sealed.stdout
    assert "already sealed" in gmv("seal", "--month", MONTH, *where, check=1).stdout
    public = gmv("public-key", "--data-dir", str(data)).stdout
    assert public == t.public_path(key_file).read_text() and public.startswith("-----BEGIN PUBLIC KEY-----")
    published = tmp_path / "published.pub"
    published.write_text(public)
    checkpoint = json.loads((tmp_path / "checkpoint.json").read_text())
    assert t.check_checkpoint(checkpoint["checkpoint"], checkpoint["signature"], [t.load_public_key(published)])

    verified = gmv("verify", *where, "--public-key", str(published))
    assert "checked 7 records in 2 months: 1 sealed (2024-03), 1 not sealed (2024-04)" in verified.stdout
    assert "OK:" in verified.stdout
    gmv("prove", "g4", "--out", str(tmp_path / "proof.json"), *where)
    checked = gmv("check-proof", str(tmp_path / "proof.json"), "--public-key", str(published))
    assert "the proof verifies: generation tenant-1/g4" in checked.stdout and "leaf 4 of the 6 records" in checked.stdout
    proof = json.loads((tmp_path / "proof.json").read_text())
    proof["record"]["credits"][0]["credit"] = 0.5
    (tmp_path / "forged.json").write_text(json.dumps(proof))
    assert "does NOT verify" in gmv("check-proof", str(tmp_path / "forged.json"), "--public-key", str(published),
                                    check=1).stdout
    assert "not sealed yet" in gmv("prove", "april", *where, check=2).stderr

    with open_ledger(ledger_url) as ledger:
        sql(ledger, "UPDATE credits SET credit = 0.01 WHERE generation_id = 'g5'")
    failed = gmv("verify", *where, check=1)  # the public key beside the data dir's key by default
    assert f"{MONTH}: generation tenant-0/g5 (leaf 3 of 6): changed since it was sealed" in failed.stdout
    assert "not checked against a key of your own" not in failed.stdout
    assert "does NOT verify" not in gmv("check-proof", str(tmp_path / "proof.json"), "--public-key",
                                        str(published)).stdout  # a proof stands for what was sealed


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites_it(tmp_path):
    out = tmp_path / "keys" / "gmv.pem"
    made = gmv("keygen", "--out", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and t.public_path(out).exists()
    assert t.key_id(t.load_private_key(out).public_key()) in made.stdout
    before = out.read_bytes()
    assert "never overwritten" in gmv("keygen", "--out", str(out), check=2).stderr
    assert out.read_bytes() == before


def test_a_third_party_checks_a_proof_with_transparency_py_alone(tmp_path, key):
    """The checker is one file that imports nothing of GMV: copied into an empty folder, it
    checks a proof with the public key and fails on a changed one."""
    import shutil

    with filled(str(tmp_path / "ledger.sqlite3")) as ledger:
        ledger.seal(MONTH, key)
        (tmp_path / "proof.json").write_text(json.dumps(ledger.prove("g1")))
    third = tmp_path / "third-party"
    third.mkdir()
    shutil.copy(t.__file__, third / "transparency.py")
    shutil.copy(t.public_path(tmp_path / "signing-key.pem"), third / "published.pub")
    script = ("import json, sys\n"
              "from transparency import ProofError, check_proof, load_public_key\n"
              "proof = json.load(open(sys.argv[1]))\n"
              "key = [load_public_key('published.pub')]\n"
              "print(check_proof(proof, key).record['credits'][0]['credit'])\n"
              "proof['record']['credits'][0]['credit'] = 0.75\n"
              "try:\n    check_proof(proof, key)\nexcept ProofError as exc:\n    print('refused:', exc)\n"
              "print(sorted(m for m in sys.modules if m.startswith('gmv')))\n")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "proof.json")], cwd=third, capture_output=True,
                         text=True, timeout=60, env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(third)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["0.5", "refused: the record does not hash to the proof's leaf_hash: the record "
                                       "was changed", "[]"]
