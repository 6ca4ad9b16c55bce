"""Contributors' erasures in the ledger (schema migration 5), on SQLite and a real PostgreSQL
(`ledger_url`): each removal recorded once however often it is recorded again, generation
records untouched, and a ledger from before the table gains it when opened. The removal itself
on the real Milvus, and both doors (CLI and RPC), are tested in tests/test_contributors.py."""
from __future__ import annotations

import dataclasses

import pytest

import gmv_engine.ledger as ledger_module
from gmv_engine.credit import Credit
from gmv_engine.ledger import Erasure, GenerationRecord, open_ledger, settings_hash


def make_record(generation_id: str, credits: list[tuple[str, str, float]], recorded_at: float) -> GenerationRecord:
    rows = tuple(Credit(rank, training_id, contributor, credit, 0.1 * rank)
                 for rank, (training_id, contributor, credit) in enumerate(credits, start=1))
    settings = {"top_k": len(credits)}
    return GenerationRecord(generation_id, "tenant-1", "art", "offline", settings_hash(settings), "image",
                            sum(c.credit for c in rows), rows, recorded_at, settings)


RECORDS = [make_record("g1", [("a1", "alice", 0.5), ("b1", "bob", 0.25)], 1_700_000_000.0),
           make_record("g2", [("a2", "alice", 0.75)], 1_700_000_100.0)]
# removed_at as Milvus keeps it: a float from time.time(), through JSON.
ALICE = Erasure("art", "alice", 1_700_000_200.123456789, 2, 2, 3, "cli", "ops@host")


def test_an_erasure_is_recorded_once_and_the_generations_that_credited_them_stay(ledger_url):
    with open_ledger(ledger_url) as ledger:
        ledger.record_many(RECORDS)
        before = (ledger.totals(), ledger.contributors(), list(ledger.iter_records()))
        first, new = ledger.record_erasure(ALICE)
        assert new and first.recorded_at > 0 and dataclasses.replace(first, recorded_at=0.0) == ALICE
        # The same removal run again (a later removals version, another requester, as a re-run
        # that finished an interrupted removal would give): the first record stands.
        again, new_again = ledger.record_erasure(dataclasses.replace(ALICE, removals_version=5, requested_via="rpc",
                                                                     requested_by="key k1", tenant_id="ops"))
        assert not new_again and again == first
        assert ledger.erasures() == [first]
        # The audit trail is untouched: every record that credited alice is still there.
        assert (ledger.totals(), ledger.contributors(), list(ledger.iter_records())) == before
        assert ledger.contributors()[0].contributor_id == "alice"
        report = ledger.verify()
        assert report.ok and any("1 contributor erasure(s) recorded" in note for note in report.notes)


def test_each_removal_is_its_own_erasure_and_they_are_read_by_collection_or_contributor(ledger_url):
    bob = Erasure("art", "bob", 1_700_000_300.5, 1, 1, 4, "rpc", "key k1 from ipv4:127.0.0.1:5000", "ops")
    elsewhere = dataclasses.replace(ALICE, collection="photos", removed_at=1_700_000_400.25)
    with open_ledger(ledger_url) as ledger:
        for erasure in (elsewhere, bob, ALICE):
            assert ledger.record_erasure(erasure)[1]
        assert [(e.collection, e.contributor_id) for e in ledger.erasures()] == [("art", "alice"), ("art", "bob"),
                                                                                 ("photos", "alice")]
        assert [e.contributor_id for e in ledger.erasures("art")] == ["alice", "bob"]
        assert [e.collection for e in ledger.erasures(contributor_id="alice")] == ["art", "photos"]
        assert ledger.erasures("art", "bob")[0].tenant_id == "ops"
        assert ledger.erasures("nowhere") == []


def test_a_ledger_from_before_erasures_gains_the_table_and_keeps_its_records(ledger_url, monkeypatch):
    monkeypatch.setattr(ledger_module, "MIGRATIONS", ledger_module.MIGRATIONS[:4])
    monkeypatch.setattr(ledger_module, "SCHEMA_VERSION", 4)
    with open_ledger(ledger_url) as ledger:
        ledger.record_many(RECORDS)
        assert ledger.schema_version() == 4
    monkeypatch.undo()
    with open_ledger(ledger_url) as ledger:
        assert ledger.schema_version() == ledger_module.SCHEMA_VERSION == 5
        assert ledger.totals() == (2, pytest.approx(1.5)) and ledger.verify().ok
        assert ledger.erasures() == [] and ledger.record_erasure(ALICE)[1]
