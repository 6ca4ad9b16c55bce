"""The ledger behind a real `gmv serve`, on SQLite and on PostgreSQL: a server killed with
SIGKILL mid-stream leaves only whole records, a resend records each generation exactly once,
and what the ledger holds equals what clients were sent and what the engine computes."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import grpc
import pytest

from gmv.v1 import attribution_pb2 as pb
from gmv.v1 import attribution_pb2_grpc as pb_grpc
from gmv_client import GMVClient
from gmv_engine.datasets import read_heldout
from gmv_engine.milvus.embedded import free_port
from gmv_engine.ledger import open_ledger

pytestmark = pytest.mark.e2e  # starts real servers or subprocesses

GENERATIONS = 60


def start_server(milvus, collection: str, ledger_url: str, log_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gmv_server.cli", "serve", "--collection", collection, "--port", str(port),
         "--host", "127.0.0.1", "--milvus-uri", milvus.uri, "--ledger-url", ledger_url],
        stdout=log_path.open("a"), stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    with GMVClient(target) as client:
        try:
            client.wait_until_ready(timeout_s=180)
        except grpc.RpcError:
            process.kill()
            pytest.fail("server never became ready:\n" + log_path.read_text())
    return process, target


@pytest.fixture(scope="module")
def generations(digits):
    return [(f"gen-{path.stem}", path.read_bytes()) for path, _, _ in read_heldout(digits.heldout)[:GENERATIONS]]


@pytest.fixture(scope="module")
def engine_values(index, digits_collection, generations):
    """phi_i computed directly by the engine, in-process, with the server's default settings."""
    from gmv_engine.pipeline import Attributor

    attributor = Attributor(index, digits_collection[0])
    values: dict[str, float] = defaultdict(float)
    for result in attributor.attribute_bytes([data for _, data in generations]):
        for credit in result.credits:
            values[credit.training_id] += credit.credit
    return dict(values)


def test_sigkill_mid_stream_then_resend_records_each_generation_exactly_once(
        ledger_url, milvus, digits_collection, generations, engine_values, tmp_path):
    log = tmp_path / "serve.log"
    process, target = start_server(milvus, digits_collection[0], ledger_url, log)

    def slowly():  # paced, so the kill lands while generations are still arriving
        for gid, data in generations:
            yield pb.AttributeRequest(generation_id=gid, image=data)
            time.sleep(0.02)

    received = []
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as stream_error:
            for result in pb_grpc.AttributionServiceStub(channel).AttributeStream(slowly(), timeout=60):
                received.append(result)
                if len(received) == 15:
                    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert stream_error.value.code() == grpc.StatusCode.UNAVAILABLE

    with open_ledger(ledger_url) as ledger:
        assert ledger.integrity_problems() == []  # whole records only
        recorded_before = ledger.totals()[0]
        assert 15 <= recorded_before < GENERATIONS
        for result in received:  # whatever a client was sent is in the ledger, as sent
            record = ledger.get(result.generation_id)
            assert [(c.training_id, c.credit) for c in record.credits] == \
                [(c.training_id, c.credit) for c in result.credits]

    process, target = start_server(milvus, digits_collection[0], ledger_url, log)
    try:
        with GMVClient(target) as client:
            results = list(client.attribute_stream(generations))
            ledger_states = [r.ledger for r in results]
            assert sorted(r.generation_id for r in results) == sorted(gid for gid, _ in generations)
            assert ledger_states.count("replayed") == recorded_before
            assert ledger_states.count("recorded") == GENERATIONS - recorded_before

            # Sums in the ledger equal the sums of the credits streamed to the client.
            streamed_total = sum(c.credit for r in results for c in r.credits)
            streamed_by_contributor: dict[str, float] = defaultdict(float)
            for r in results:
                for contributor, credit in r.contributors:
                    streamed_by_contributor[contributor] += credit
            top = client.top_contributors(limit=1000)
            assert top.generations == GENERATIONS
            assert top.total_credit == pytest.approx(streamed_total, rel=1e-12)
            assert {c.contributor_id: c.value for c in top.items} == pytest.approx(dict(streamed_by_contributor), rel=1e-12)

            # phi_i from the ledger equals phi_i from the engine itself.
            valuation = client.valuation()
            assert {v.training_id: v.value for v in valuation.items} == pytest.approx(engine_values, rel=1e-9)

            # A recorded id with another image is refused; the record stands.
            with pytest.raises(grpc.RpcError) as conflict:
                client.attribute(generations[1][1], generations[0][0])
            assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
            # A preview (skip_ledger) is attributed but not recorded.
            preview = client.attribute(generations[0][1], "preview-1", record=False)
            assert preview.ledger == "not-recorded" and len(preview.credits) == 10
        with open_ledger(ledger_url) as ledger:
            assert ledger.totals()[0] == GENERATIONS and ledger.get("preview-1") is None
            assert ledger.integrity_problems() == []
    finally:
        process.terminate()
        process.wait(timeout=60)

    payouts(ledger_url, tmp_path, streamed_total, dict(streamed_by_contributor))


def payouts(ledger_url: str, tmp_path, total: float, by_contributor: dict[str, float]) -> None:
    """`gmv ledger top|value|export` read the same ledger; CSV and Parquet say the same."""
    def gmv(*args):
        run = subprocess.run([sys.executable, "-m", "gmv_server.cli", "ledger", *args, "--ledger-url", ledger_url],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout

    top = [json.loads(line) for line in gmv("top", "-n", "0", "--json").splitlines()]
    assert {row["contributor_id"]: row["value"] for row in top} == pytest.approx(by_contributor, rel=1e-12)
    values = [json.loads(line) for line in gmv("value", "--top", "3", "--json").splitlines()]
    assert len(values) == 3 and values[0]["value"] >= values[1]["value"] >= values[2]["value"]

    gmv("export", "--out", str(tmp_path / "payout.csv"), "--pool", "1000")
    gmv("export", "--out", str(tmp_path / "payout.parquet"), "--pool", "1000")
    with (tmp_path / "payout.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {row["contributor_id"]: float(row["value"]) for row in rows} == pytest.approx(by_contributor, rel=1e-12)
    assert sum(float(row["payout"]) for row in rows) == pytest.approx(1000.0)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "payout.parquet").to_pylist()
    assert [(r["contributor_id"], r["payout"]) for r in table] == \
        [(r["contributor_id"], pytest.approx(float(r["payout"]), rel=1e-12)) for r in rows]
    gmv("export", "--out", str(tmp_path / "lines.csv"), "--by", "credit")
    with (tmp_path / "lines.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == GENERATIONS * 10 and sum(float(r["credit"]) for r in lines) == pytest.approx(total)
    assert not list(tmp_path.glob("*.partial"))


def test_a_ledger_outage_is_unavailable_sends_nothing_and_recovers(milvus, digits_collection, generations, tmp_path):
    """PostgreSQL going down under a running server: calls fail UNAVAILABLE with no credits sent
    and nothing recorded; when it returns, the server reconnects by itself."""
    from helpers import PostgresServer, find_bindir

    if find_bindir() is None:
        pytest.skip("PostgreSQL is not installed (`make test` installs Debian's postgresql package)")
    database = PostgresServer(free_port()).start()
    try:
        url = database.url()
        process, target = start_server(milvus, digits_collection[0], url, tmp_path / "serve.log")
        try:
            with GMVClient(target, retries=0) as client:
                (gid, image), (gid_down, image_down) = generations[0], generations[1]
                assert client.attribute(image, gid).ledger == "recorded"
                database.pause()
                with pytest.raises(grpc.RpcError) as caught:
                    client.attribute(image_down, gid_down)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "ledger" in caught.value.details()
                database.resume()
                assert client.attribute(image_down, gid_down).ledger == "recorded"
                assert client.attribute(image, gid).ledger == "replayed"
            with open_ledger(url) as ledger:
                assert ledger.totals()[0] == 2 and ledger.integrity_problems() == []
        finally:
            process.terminate()
            process.wait(timeout=60)
    finally:
        database.stop()
