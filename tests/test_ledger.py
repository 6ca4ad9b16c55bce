"""The royalty ledger on both backends (a SQLite file and a real PostgreSQL server): every test
here runs twice through the `ledger_url` fixture."""
from __future__ import annotations

import threading

import pytest

from gmv_engine.errors import GenerationConflictError, GMVError, LedgerUnavailableError
from gmv_engine.credit import Credit
from gmv_engine.ledger import SCHEMA_VERSION, GenerationRecord, Window, open_ledger, settings_hash


def make_record(generation_id: str, credits: list[tuple[str, str, float]], image: str = "image-a",
                recorded_at: float = 0.0, tenant: str = "tenant-1", collection: str = "digits") -> GenerationRecord:
    rows = tuple(Credit(rank, training_id, contributor, credit, 0.1 * rank)
                 for rank, (training_id, contributor, credit) in enumerate(credits, start=1))
    settings = {"top_k": len(credits)}
    return GenerationRecord(generation_id, tenant, collection, "offline", settings_hash(settings), image,
                            sum(c.credit for c in rows), rows, recorded_at, settings)


# Three generations at t=100, 200, 300 (Unix seconds); contributors x (images a, b) and y (c).
RECORDS = [
    make_record("g1", [("a", "x", 0.5), ("c", "y", 0.25)], recorded_at=100),
    make_record("g2", [("a", "x", 0.25), ("b", "x", 0.125)], recorded_at=200, tenant="tenant-2"),
    make_record("g3", [("c", "y", 0.5)], recorded_at=300),
]


def test_the_same_generation_twice_is_one_record_with_identical_credits(ledger_url):
    with open_ledger(ledger_url) as ledger:
        first, new = ledger.record(RECORDS[0])
        again, new_again = ledger.record(make_record("g1", [("a", "x", 0.5), ("c", "y", 0.25)], recorded_at=999))
        assert (new, new_again) == (True, False)
        assert again.credits == first.credits and again.recorded_at == 100  # the first record, untouched
        assert ledger.totals() == (1, pytest.approx(0.75))


def test_the_same_id_with_another_image_is_refused_and_the_record_kept(ledger_url):
    with open_ledger(ledger_url) as ledger:
        ledger.record(RECORDS[0])
        with pytest.raises(GenerationConflictError, match="already recorded with a different image"):
            ledger.record(make_record("g1", [("b", "x", 0.9)], image="image-b"))
        assert ledger.get("g1").credits == RECORDS[0].credits
        assert ledger.totals() == (1, pytest.approx(0.75))


def test_a_group_commit_records_each_id_once_and_reports_conflicts_per_record(ledger_url):
    with open_ledger(ledger_url) as ledger:
        ledger.record(RECORDS[2])
        outcomes = ledger.record_many([
            RECORDS[0],
            make_record("g1", [("a", "x", 0.5), ("c", "y", 0.25)]),  # the same id again, same image
            RECORDS[1],
            make_record("g3", [("a", "x", 0.5)], image="other"),  # recorded before, other image
        ])
        assert [o[1] if isinstance(o, tuple) else type(o) for o in outcomes] == [True, False, True, GenerationConflictError]
        assert outcomes[1][0].credits == RECORDS[0].credits
        assert ledger.totals()[0] == 3 and not ledger.integrity_problems()


def test_a_failed_transaction_keeps_none_of_its_records(ledger_url):
    broken = make_record("g2", [("a", "x", 0.25), (None, "x", 0.125)])  # NOT NULL fails at the 2nd credit
    with open_ledger(ledger_url) as ledger:
        with pytest.raises(GMVError):
            ledger.record_many([RECORDS[0], broken])
        assert ledger.totals() == (0, 0.0) and ledger.get("g1") is None
        ledger.record(RECORDS[0])  # the connection is still usable
        assert ledger.totals()[0] == 1


def test_values_and_contributors_over_windows(ledger_url):
    with open_ledger(ledger_url) as ledger:
        for record in RECORDS:
            ledger.record(record)
        values = {v.training_id: (v.contributor_id, v.value, v.generations) for v in ledger.values()}
        assert values == {"a": ("x", 0.75, 2), "c": ("y", 0.75, 2), "b": ("x", 0.125, 1)}
        assert [v.training_id for v in ledger.values()] == ["a", "c", "b"]  # value desc, then id
        assert [v.training_id for v in ledger.values(limit=1)] == ["a"]
        assert [v.value for v in ledger.values(training_ids=["b"])] == [0.125]
        # [150, 300): only g2.
        assert {v.training_id: v.value for v in ledger.values(Window(150, 300))} == {"a": 0.25, "b": 0.125}
        contributors = ledger.contributors()
        assert [(c.contributor_id, c.value, c.generations, c.training_images) for c in contributors] == [
            ("x", 0.875, 2, 2), ("y", 0.75, 2, 1)]
        assert [(c.contributor_id, c.value) for c in ledger.contributors(Window(tenant_id="tenant-2"))] == [("x", 0.375)]
        assert ledger.contributors(Window(collection="other")) == []
        assert ledger.totals(Window(since=200)) == (2, pytest.approx(0.875))
        rows = list(ledger.iter_credits(Window(until=200)))
        assert [(r[0], r[7], r[8]) for r in rows] == [("g1", 1, "a"), ("g1", 2, "c")]


def test_two_replicas_recording_the_same_ids_at_once_record_each_once(ledger_url):
    """Two ledgers on one database (as two server replicas): every id is recorded once, and
    both replicas see the same credits for it."""
    records = [make_record(f"r{i}", [("a", "x", 0.5), ("b", "y", 0.25)]) for i in range(40)]
    replicas = [open_ledger(ledger_url), open_ledger(ledger_url)]
    outcomes: dict[int, list] = {}

    def write(n):
        outcomes[n] = [replicas[n].record_many(records[i:i + 4]) for i in range(0, len(records), 4)]

    threads = [threading.Thread(target=write, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    new = [o[1] for n in range(2) for group in outcomes[n] for o in group]
    assert new.count(True) == 40 and new.count(False) == 40
    assert replicas[0].totals() == (40, pytest.approx(30.0)) and not replicas[0].integrity_problems()
    for replica in replicas:
        replica.close()


def test_schema_migrations_run_once_and_a_newer_schema_is_refused(ledger_url):
    with open_ledger(ledger_url) as ledger:
        ledger.record(RECORDS[0])
        assert ledger.schema_version() == SCHEMA_VERSION
    with open_ledger(ledger_url) as ledger:  # reopening migrates nothing and keeps the data
        assert ledger.schema_version() == SCHEMA_VERSION and ledger.totals()[0] == 1
        ledger._execute(ledger._connection(), "INSERT INTO schema_migrations VALUES (99, 'future', 0)")
    with pytest.raises(GMVError, match="schema version 99"):
        open_ledger(ledger_url)


def test_records_are_checked_before_anything_is_written(ledger_url):
    with open_ledger(ledger_url) as ledger:
        with pytest.raises(ValueError, match="ranks"):
            ledger.record(GenerationRecord("g", "", "c", "offline", "h", "i", 0.5,
                                           (Credit(2, "a", "x", 0.5, 0.1),)))
        with pytest.raises(ValueError, match="finite"):
            ledger.record(make_record("g", [("a", "x", float("nan"))]))
        assert ledger.totals() == (0, 0.0)


def test_an_unreachable_postgres_is_unavailable_not_a_crash():
    from gmv_engine.milvus.embedded import free_port

    with pytest.raises(LedgerUnavailableError, match="cannot open the ledger"):
        open_ledger(f"postgresql://gmv:secret@127.0.0.1:{free_port()}/gmv")


def test_ledger_urls():
    with pytest.raises(ValueError, match="unsupported ledger URL"):
        open_ledger("mysql://host/db")
    from gmv_engine.ledger import Ledger

    assert Ledger.safe_url.fget(type("L", (), {"url": "postgresql://gmv:secret@db:5432/x"})()) == \
        "postgresql://gmv:***@db:5432/x"


def test_a_version_1_ledger_is_migrated_to_per_tenant_ids_keeping_every_record(ledger_url, monkeypatch):
    """Ledgers written before generations were keyed by (tenant, id) keep every record and
    credit; afterwards two tenants may record the same generation_id, each its own."""
    import dataclasses

    import gmv_engine.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "MIGRATIONS", ledger_module.MIGRATIONS[:1])
    monkeypatch.setattr(ledger_module, "SCHEMA_VERSION", 1)
    with open_ledger(ledger_url) as ledger:  # rows as version 1 wrote them
        conn = ledger._connection()
        ledger._begin(conn)
        for r in RECORDS:
            ledger._execute(conn, "INSERT INTO generations (generation_id, recorded_at, tenant_id, collection, profile, "
                                  "settings_hash, image_sha256, quality) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (r.generation_id, r.recorded_at, r.tenant_id, r.collection, r.profile, r.settings_hash,
                             r.image_sha256, r.quality))
            for c in r.credits:
                ledger._execute(conn, "INSERT INTO credits (generation_id, rank, training_id, contributor_id, credit, "
                                      "distance) VALUES (?, ?, ?, ?, ?, ?)",
                                (r.generation_id, c.rank, c.training_id, c.contributor_id, c.credit, c.distance))
        conn.execute("COMMIT")
    monkeypatch.undo()
    before = [dataclasses.replace(r, settings={}) for r in RECORDS]  # settings are not read back
    with open_ledger(ledger_url) as ledger:
        assert ledger.schema_version() == SCHEMA_VERSION
        assert [ledger.get(r.generation_id, r.tenant_id) for r in RECORDS] == before
        assert not ledger.integrity_problems()
        other_tenant = dataclasses.replace(RECORDS[0], tenant_id=RECORDS[0].tenant_id + "-other", image_sha256="f" * 64)
        stored, new = ledger.record(other_tenant)
        assert new and ledger.get(other_tenant.generation_id, other_tenant.tenant_id).image_sha256 == "f" * 64
        assert ledger.get(RECORDS[0].generation_id, RECORDS[0].tenant_id) == before[0]  # the first tenant's, untouched
        assert ledger.totals()[0] == len(RECORDS) + 1 and not ledger.integrity_problems()


def test_the_sqlite_ledger_is_its_owners_alone_and_urls_are_masked_in_every_form(tmp_path):
    import stat

    from gmv_engine.ledger import mask_url

    path = tmp_path / "private" / "ledger.sqlite3"
    with open_ledger(str(path)) as ledger:
        ledger.record(RECORDS[0])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    for url, masked in [("postgresql://gmv:s3cret@db:5432/x", "postgresql://gmv:***@db:5432/x"),
                        ("postgresql://gmv:p@ss@db/x", "postgresql://gmv:***@db/x"),
                        ("postgresql://db/x?user=gmv&password=s3cret&sslmode=require",
                         "postgresql://db/x?user=gmv&password=***&sslmode=require"),
                        ("postgresql://gmv@db/x", "postgresql://gmv@db/x")]:
        assert mask_url(url) == masked
