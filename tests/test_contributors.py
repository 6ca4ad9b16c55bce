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


@pytest.mark.e2e
def test_a_running_server_stops_crediting_a_removed_contributor(milvus, index, digits, offline_components,
                                                                 tmp_path):
    """The judged case: after `gmv contributors remove X` on a running server, 0 of the next 100
    attributions credit X, each still sums to q; re-ingesting X's images inserts nothing."""
    from gmv_client import GMVClient

    name = "contributors_served"
    rows = build(index, digits, offline_components, name)
    gone = busiest(rows)
    # Queries that favour X: X's own training images and other images of the same digits.
    own = [open(row.path, "rb").read() for row in rows if row.contributor_id == gone][:50]
    queries = own + [open(row.path, "rb").read() for row in rows if row.contributor_id != gone][:100 - len(own)]
    assert len(queries) == 100
    (tmp_path / "serve").mkdir()
    server = start_server(milvus, name, tmp_path / "serve" / "serve.log", "--milvus-probe-s", "1")
    try:
        with GMVClient(server["target"]) as client:
            credited = lambda results: sum(any(c.contributor_id == gone for c in r.credits) for r in results)  # noqa: E731
            before = [client.attribute(q, generation_id=f"before-{i}", record=False) for i, q in enumerate(queries)]
            assert credited(before) >= len(own)  # each of X's own images credits X
            started = time.monotonic()
            result = subprocess.run([*GMV, "contributors", "remove", gone, "--collection", name, "--milvus-uri",
                                     milvus.uri, "--json"], capture_output=True, text=True, timeout=120)
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
            assert int(wall) - 1 <= reply.removed_at.ToSeconds() <= time.time()
            at_once = [client.attribute(q, generation_id=f"rpc-{i}", record=False) for i, q in enumerate(queries[:20])]
            assert not any(c.contributor_id in (gone, second) for r in at_once for c in r.credits)
    finally:
        stop_server(server)
    assert "they are credited no more" in (tmp_path / "serve" / "serve.log").read_text()

    listing = subprocess.run([*GMV, "contributors", "list", "--collection", name, "--milvus-uri", milvus.uri,
                              "--json"], capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    status = {row["contributor_id"]: row for row in json.loads(listing.stdout)["contributors"]}
    assert status[gone]["status"] == "removed" and status[gone]["images"] == 0
    assert status[second]["status"] == "removed"
    assert all(row["status"] == "active" and row["images"] > 0 for c, row in status.items() if c not in (gone, second))

    encoder, reranker = offline_components
    again = ingest(index, name, rows, index.info(name), encoder, reranker, progress=False)
    assert again.inserted == 0 and again.refused == report["images_removed"] + reply.images_removed
