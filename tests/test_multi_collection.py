"""One `gmv serve` for two collections built from different training sets: each request is
answered from the collection it names (through a Node.js client built from the .proto alone
and the Python SDK), models are loaded once and batches mix collections, the metrics carry the
collection, and `gmv attribute --server` carries collection, tenant, id prefix and no-record."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from gmv_client import AsyncGMVClient, GMVClient
from gmv_engine.datasets import read_heldout
from gmv_engine.ingest import ingest, read_manifest
from helpers import GMV, make_info, metric, metric_samples, start_server, stop_server

pytestmark = pytest.mark.e2e

LOW, HIGH = "digits_low", "digits_high"  # classes 0-4 and 5-9: disjoint training sets
NODE_CLIENT = Path(__file__).resolve().parent.parent / "client" / "node"


@pytest.fixture(scope="module")
def two_collections(index, digits, offline_components):
    encoder, reranker = offline_components
    rows = read_manifest(digits.manifest)
    for name, classes in ((LOW, "01234"), (HIGH, "56789")):
        subset = [row for row in rows if row.contributor_id[-1] in classes]
        report = ingest(index, name, subset, make_info(encoder, reranker), encoder, reranker, progress=False)
        assert not report.bad
    return {LOW: {f"digit-{c}" for c in "01234"}, HIGH: {f"digit-{c}" for c in "56789"}}


@pytest.fixture(scope="module")
def server(milvus, two_collections, tmp_path_factory):
    log = tmp_path_factory.mktemp("multi") / "serve.log"
    # A long batching delay, so requests for both collections that arrive together share a batch.
    running = start_server(milvus, LOW, log, "--collection", HIGH, "--max-queue-delay-ms", "300", verbose=True)
    yield running
    stop_server(running)


def test_list_collections_and_models_loaded_once(server):
    with GMVClient(server["target"]) as client:
        listed = client.list_collections()
        assert [info.collection for info in listed] == [LOW, HIGH]
        assert all(info.index_type == "IVF_PQ" and info.encoder == "pixels" for info in listed)
        assert client.index_info(HIGH).collection == HIGH
        with pytest.raises(grpc.RpcError) as caught:
            client.index_info()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # pixels, l2 and piqe: three models for two collections built the same way.
    assert "(3 models loaded)" in server["log"].read_text()


def test_each_request_is_answered_from_the_collection_it_names(server, digits, two_collections):
    heldout = read_heldout(digits.heldout)[:6]
    with GMVClient(server["target"]) as client:
        for path, _, _ in heldout:
            for collection, contributors in two_collections.items():
                result = client.attribute(path.read_bytes(), generation_id=f"py-{collection}-{path.stem}",
                                          collection=collection, record=False)
                assert {c.contributor_id for c in result.credits} <= contributors
        for name, code in (("", grpc.StatusCode.INVALID_ARGUMENT), ("nope", grpc.StatusCode.NOT_FOUND)):
            with pytest.raises(grpc.RpcError) as caught:
                client.attribute(heldout[0][0].read_bytes(), generation_id="py-x", collection=name, record=False)
            assert caught.value.code() == code, name
    samples = metric_samples(_scrape(server))
    for collection in (LOW, HIGH):
        key = f'gmv_requests_total{{code="OK",collection="{collection}",method="Attribute"}}'
        assert samples[key] == len(heldout), key
    assert samples['gmv_requests_total{code="NOT_FOUND",collection="",method="Attribute"}'] == 1
    assert samples['gmv_requests_total{code="INVALID_ARGUMENT",collection="",method="Attribute"}'] == 1


def test_requests_for_both_collections_share_a_batch(server, digits):
    heldout = read_heldout(digits.heldout)[6:14]
    executions_before = metric(server["metrics_port"], "gmv_batch_executions_total")

    async def burst():
        async with AsyncGMVClient(server["target"]) as client:
            return await asyncio.gather(*(
                client.attribute(path.read_bytes(), generation_id=f"burst-{collection}-{path.stem}",
                                 collection=collection, record=False)
                for path, _, _ in heldout for collection in (LOW, HIGH)))

    results = asyncio.run(burst())
    assert len(results) == 2 * len(heldout)
    executions = metric(server["metrics_port"], "gmv_batch_executions_total") - executions_before
    # 16 requests, 8 per collection: fewer than 2 batches means one batch held both collections.
    assert executions < 2, executions


def test_a_node_client_from_the_proto_picks_the_collection(server, digits, two_collections):
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("client/node/node_modules is missing: `make test` installs it with npm ci")
    image = str(read_heldout(digits.heldout)[0][0])
    run = subprocess.run(["node", str(NODE_CLIENT / "collections_client.js"), server["target"], image, LOW, HIGH],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert reply["listed"] == [LOW, HIGH]
    for collection, contributors in two_collections.items():
        answer = reply["byCollection"][collection]
        assert answer["info_collection"] == collection
        assert len(answer["contributors"]) == 5 and set(answer["contributors"]) <= contributors
    assert set(reply["byCollection"][LOW]["training_ids"]).isdisjoint(reply["byCollection"][HIGH]["training_ids"])
    assert (reply["unnamed"], reply["unknown"], reply["unnamedInfo"]) == ("INVALID_ARGUMENT", "NOT_FOUND",
                                                                          "INVALID_ARGUMENT")
    assert 'collection="digits_low"' in _scrape(server) and 'collection="digits_high"' in _scrape(server)


def _gmv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*GMV, *args], capture_output=True, text=True, timeout=180)


def _ledger_generations(server) -> int:
    with GMVClient(server["target"]) as client:
        return client.top_contributors().generations


def test_cli_through_the_server_with_collection_tenant_prefix_and_no_record(server, digits, two_collections):
    paths = [str(path) for path, _, _ in read_heldout(digits.heldout)[20:22]]
    before = _ledger_generations(server)
    # As a user runs it: a/0001.png and b/0001.png, two images under one file stem.
    folders = Path(server["log"]).parent / "generated"
    same_stem = []
    for folder, source in zip("ab", paths):
        (folders / folder).mkdir(parents=True, exist_ok=True)
        same_stem.append(str(shutil.copy(source, folders / folder / "0001.png")))
    run = _gmv("attribute", *same_stem, "--server", server["target"], "--collection", HIGH, "--tenant", "t",
               "--id-prefix", "run1-", "--no-record", "--json")
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(r["generation_id"], r["image"]) for r in records] == [("run1-0001", p) for p in same_stem]
    assert all({c["contributor_id"] for c in r["credits"]} <= two_collections[HIGH] for r in records)
    assert _ledger_generations(server) == before  # --no-record: the ledger is unchanged

    # Recorded: the first run records both; the second sends other bytes under one of the ids.
    recorded = _gmv("attribute", *paths, "--server", server["target"], "--collection", LOW, "--tenant", "t",
                    "--id-prefix", "run2-")
    assert recorded.returncode == 0, recorded.stderr
    assert _ledger_generations(server) == before + 2
    impostor = Path(server["log"]).parent / Path(paths[0]).name
    shutil.copy(read_heldout(digits.heldout)[30][0], impostor)  # same stem, another image
    conflict = _gmv("attribute", str(impostor), paths[1], "--server", server["target"], "--collection", LOW,
                    "--tenant", "t", "--id-prefix", "run2-", "--json")  # ids are per tenant
    assert conflict.returncode == 1
    assert f"{impostor}:" in conflict.stderr and "already recorded with a different image" in conflict.stderr
    assert [json.loads(line)["generation_id"] for line in conflict.stdout.splitlines()] == [f"run2-{Path(paths[1]).stem}"]
    assert _ledger_generations(server) == before + 2


def test_cli_refuses_flags_that_do_nothing_with_a_server(server, digits):
    path = str(read_heldout(digits.heldout)[0][0])
    run = _gmv("attribute", path, "--server", server["target"], "--collection", LOW, "--nprobe", "4",
               "--milvus-uri", "http://127.0.0.1:1")
    assert run.returncode == 2
    assert "--milvus-uri, --nprobe: no effect with --server" in run.stderr and "Traceback" not in run.stderr


def _scrape(server) -> str:
    import urllib.request

    return urllib.request.urlopen(f"http://127.0.0.1:{server['metrics_port']}/metrics", timeout=5).read().decode()
