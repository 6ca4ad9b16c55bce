"""Contributors' opt-out on the real embedded Milvus: `gmv contributors remove` takes a
contributor's images out of the index and the re-rank store, blocks them from re-ingest, and a
running server stops crediting them within seconds."""
import json
import subprocess
import sys
import time

import pytest

from gmv_engine.ingest import ingest, read_manifest
from gmv_engine.milvus.erasure import blocked_hashes, contributor_counts, remove_contributor, removals
from gmv_engine.milvus.index import CollectionInfo
from gmv_engine.pipeline import Attributor
from gmv_engine.settings import Settings

from helpers import png_bytes, start_server, stop_server

GMV = [sys.executable, "-m", "gmv_server.cli"]


def build(index, digits, offline_components, name: str):
    encoder, reranker = offline_components
    info = CollectionInfo("offline", encoder.name, encoder.dim, reranker.name, reranker.feature_dim)
    index.drop(name)
    rows = read_manifest(digits.manifest)[::4]  # ~400 rows over the digits' contributors
    report = ingest(index, name, rows, info, encoder, reranker, progress=False)
    assert not report.bad
    return rows


def busiest(rows) -> str:
    counts = {}
    for row in rows:
        counts[row.contributor_id] = counts.get(row.contributor_id, 0) + 1
    return max(counts, key=counts.get)


def test_remove_takes_rows_out_blocks_reingest_and_is_listed(index, digits, offline_components):
    name = "contributors_removal"
    rows = build(index, digits, offline_components, name)
    gone = busiest(rows)
    theirs = [row for row in rows if row.contributor_id == gone]
    before = contributor_counts(index, name)
    assert before[gone] == len(theirs) and removals(index, name).version == 0

    removal = remove_contributor(index, name, gone)
    assert removal.rows == len(theirs) == removal.hashes_blocked and removal.removed_at <= time.time()
    after = contributor_counts(index, name)
    assert gone not in after and sum(after.values()) == sum(before.values()) - len(theirs)
    assert removals(index, name).contributors[gone] == removal and removals(index, name).version >= 1
    # Nothing of theirs is found, by search or by feature fetch.
    attributor = Attributor(index, name, Settings())
    assert attributor.excluded == {gone}
    pks = {row.training_id for row in theirs}
    for result in attributor.attribute_bytes([open(row.path, "rb").read() for row in theirs[:20]]):
        assert all(c.contributor_id != gone and c.training_id not in pks for c in result.credits)
        assert sum(c.credit for c in result.credits) == pytest.approx(result.quality)

    # A re-ingest of the same images (and any new image under their id) inserts nothing.
    encoder, reranker = offline_components
    report = ingest(index, name, rows, index.info(name), encoder, reranker, progress=False)
    assert report.inserted == 0 and report.refused == len(theirs) == len(report.bad)
    assert all("refused: contributor" in bad.reason and gone in bad.reason for bad in report.bad)
    assert "refused: removed contributors" in report.summary()
    import hashlib

    digests = [hashlib.sha256(open(row.path, "rb").read()).hexdigest() for row in theirs[:5]]
    assert blocked_hashes(index, name, digests) == dict.fromkeys(digests, gone)
    # Removing again is harmless (it finishes an interrupted removal).
    again = remove_contributor(index, name, gone)
    assert again.rows == removal.rows and again.removed_at == removal.removed_at


def test_the_erasure_is_recorded_in_the_ledger_once_and_past_records_stay(index, digits, offline_components,
                                                                          ledger_url):
    """On each backend: a removal interrupted before the ledger heard of it is recorded by the
    run that finishes it, with its first time; running it again records nothing more."""
    from gmv_engine.credit import Credit
    from gmv_engine.ledger import GenerationRecord, open_ledger
    from gmv_engine.optout import CLI, RPC, remove

    name = "contributors_ledger"
    rows = build(index, digits, offline_components, name)
    gone = busiest(rows)
    theirs = [row for row in rows if row.contributor_id == gone]
    with open_ledger(ledger_url) as ledger:
        credited = GenerationRecord("before", "tenant-1", name, "offline", "s", "image", 0.5,
                                    (Credit(1, theirs[0].training_id, gone, 0.5, 0.1),), time.time() - 60)
        ledger.record(credited)
        # The Milvus part only, as a run that stopped before writing to the ledger leaves it.
        interrupted = remove(index, None, name, gone, requested_via=CLI, requested_by="ops@host")
        assert interrupted.erasure is None and ledger.erasures() == []
        finished = remove(index, ledger, name, gone, requested_via=RPC, requested_by="key k1 from ipv4:10.0.0.1:1",
                          tenant_id="ops")
        erasure = finished.erasure
        assert finished.recorded_now and ledger.erasures(name) == [erasure]
        assert (erasure.contributor_id, erasure.removed_at) == (gone, interrupted.removal.removed_at)
        assert erasure.images_removed == erasure.hashes_blocked == len(theirs)
        assert erasure.removals_version == removals(index, name).version >= 2
        assert (erasure.requested_via, erasure.requested_by, erasure.tenant_id) == (RPC, "key k1 from ipv4:10.0.0.1:1",
                                                                                  "ops")
        again = remove(index, ledger, name, gone, requested_via=CLI, requested_by="ops@host")
        assert not again.recorded_now and again.erasure == erasure and ledger.erasures() == [erasure]
        assert removals(index, name).version > erasure.removals_version  # Milvus' version moved on; the ledger did not
        # The audit trail: the generation that credited them before is there as it was.
        assert ledger.get("before", "tenant-1") == credited and ledger.totals() == (1, pytest.approx(0.5))
        assert ledger.verify().ok


def test_the_command_line_records_the_erasure_in_the_configured_ledger(milvus, index, digits, offline_components,
                                                                       ledger_url, tmp_path):
    """`gmv contributors remove` writes to the ledger `gmv serve` and `gmv ledger` use: the
    data dir's SQLite file, or --ledger-url; `list` and `gmv ledger erasures` read it back."""
    name = "contributors_cli_ledger"
    rows = build(index, digits, offline_components, name)
    gone = busiest(rows)
    where = ["--data-dir", str(tmp_path)] if ledger_url.endswith(".sqlite3") else ["--ledger-url", ledger_url]
    assert not ledger_url.endswith(".sqlite3") or ledger_url == str(tmp_path / "ledger.sqlite3")

    def gmv(*args):
        result = subprocess.run([*GMV, *args, *where], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    listed = json.loads(gmv("contributors", "list", "--collection", name, "--milvus-uri", milvus.uri, "--json"))
    assert all(row["status"] == "active" for row in listed["contributors"])
    first = json.loads(gmv("contributors", "remove", gone, "--collection", name, "--milvus-uri", milvus.uri, "--json"))
    assert first["ledger_recorded_now"] and first["images_removed"] == sum(r.contributor_id == gone for r in rows)
    text = gmv("contributors", "remove", gone, "--collection", name, "--milvus-uri", milvus.uri)
    assert f"recorded in the ledger before, at {first['ledger_recorded_at']}" in text
    erasures = [json.loads(line) for line in gmv("ledger", "erasures", "--json").splitlines()]
    assert len(erasures) == 1
    assert (erasures[0]["collection"], erasures[0]["contributor_id"], erasures[0]["requested_via"],
            erasures[0]["images_removed"]) == (name, gone, "cli", first["images_removed"])
    assert "@" in erasures[0]["requested_by"] and erasures[0]["tenant_id"] == ""
    assert gone in gmv("ledger", "erasures", "--collection", name) and "0 erasure(s)" in gmv(
        "ledger", "erasures", "--collection", "elsewhere")
    status = {row["contributor_id"]: row for row in json.loads(gmv("contributors", "list", "--collection", name,
                                                                   "--milvus-uri", milvus.uri, "--json"))["contributors"]}
    assert status[gone]["status"] == "removed" and status[gone]["ledger_recorded_at"] == first["ledger_recorded_at"]
    assert f"in the ledger since {first['ledger_recorded_at']}" in gmv("contributors", "list", "--collection", name,
                                                                        "--milvus-uri", milvus.uri)


@pytest.mark.e2e
def test_a_running_server_stops_crediting_a_removed_contributor(milvus, index, digits, offline_components,
                                                                 tmp_path):
    """The judged case: after `gmv contributors remove X` on a running server, 0 of the next 100
    attributions credit X, each still sums to q; re-ingesting X's images inserts nothing. Both
    erasures are in the server's ledger, the RPC's with the admin key and tenant that asked."""
    from gmv_client import GMVClient
    from gmv_engine.ledger import open_ledger

    name = "contributors_served"
    rows = build(index, digits, offline_components, name)
    gone = busiest(rows)
    # Queries that favour X: X's own training images and other images of the same digits.
    own = [open(row.path, "rb").read() for row in rows if row.contributor_id == gone][:50]
    queries = own + [open(row.path, "rb").read() for row in rows if row.contributor_id != gone][:100 - len(own)]
    assert len(queries) == 100
    (tmp_path / "serve").mkdir()
    ledger_path = tmp_path / "serve" / "ledger.sqlite3"  # the server's: its data dir's
    with open_ledger(str(ledger_path)) as ledger:
        admin, key = ledger.create_key("ops", ["admin"])
    server = start_server(milvus, name, tmp_path / "serve" / "serve.log", "--milvus-probe-s", "1")
    try:
        with GMVClient(server["target"], api_key=key) as client:
            credited = lambda results: sum(any(c.contributor_id == gone for c in r.credits) for r in results)  # noqa: E731
            before = [client.attribute(q, generation_id=f"before-{i}", record=False) for i, q in enumerate(queries)]
            assert credited(before) >= len(own)  # each of X's own images credits X
            started = time.monotonic()
            result = subprocess.run([*GMV, "contributors", "remove", gone, "--collection", name, "--milvus-uri",
                                     milvus.uri, "--data-dir", str(tmp_path / "serve"), "--json"],
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout)
            assert report["images_removed"] == sum(row.contributor_id == gone for row in rows)
            time.sleep(max(0.0, 2.5 - (time.monotonic() - started)))  # a probe (1 s) and a margin
            after = [client.attribute(q, generation_id=f"after-{i}", record=False) for i, q in enumerate(queries)]
            assert credited(after) == 0
            for r in after:
                assert len(r.credits) == 10 and sum(c.credit for c in r.credits) == pytest.approx(r.quality)
            # The admin RPC does the same; the server it is sent to excludes them at once.
            second = next(c for c in sorted({row.contributor_id for row in rows}) if c != gone)
            wall = time.time()
            reply = client.remove_contributor(second)
            assert (reply.collection, reply.contributor_id) == (name, second) and reply.images_removed > 0
            assert int(wall) - 1 <= reply.removed_at.ToSeconds() <= reply.ledger_recorded_at.ToSeconds() <= time.time()
            at_once = [client.attribute(q, generation_id=f"rpc-{i}", record=False) for i, q in enumerate(queries[:20])]
            assert not any(c.contributor_id in (gone, second) for r in at_once for c in r.credits)
    finally:
        stop_server(server)
    assert "they are credited no more" in (tmp_path / "serve" / "serve.log").read_text()
    with open_ledger(str(ledger_path)) as ledger:
        erasures = {e.contributor_id: e for e in ledger.erasures(name)}
    assert set(erasures) == {gone, second}
    assert (erasures[gone].requested_via, erasures[gone].tenant_id, erasures[gone].images_removed) == (
        "cli", "", report["images_removed"])
    assert (erasures[second].requested_via, erasures[second].tenant_id, erasures[second].images_removed) == (
        "rpc", "ops", reply.images_removed)
    assert erasures[second].requested_by.startswith(f"key {admin.key_id} from ")
    assert erasures[second].recorded_at == pytest.approx(reply.ledger_recorded_at.ToNanoseconds() / 1e9, abs=1e-6)

    listing = subprocess.run([*GMV, "contributors", "list", "--collection", name, "--milvus-uri", milvus.uri,
                              "--data-dir", str(tmp_path / "serve"), "--json"], capture_output=True, text=True,
                             timeout=120)
    assert listing.returncode == 0, listing.stderr
    status = {row["contributor_id"]: row for row in json.loads(listing.stdout)["contributors"]}
    assert status[gone]["status"] == "removed" and status[gone]["images"] == 0
    assert status[second]["status"] == "removed" and status[second]["ledger_recorded_at"]
    assert status[gone]["ledger_recorded_at"] == report["ledger_recorded_at"]
    assert all(row["status"] == "active" and row["images"] > 0 for c, row in status.items() if c not in (gone, second))

    encoder, reranker = offline_components
    again = ingest(index, name, rows, index.info(name), encoder, reranker, progress=False)
    assert again.inserted == 0 and again.refused == report["images_removed"] + reply.images_removed
