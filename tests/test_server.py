"""`gmv serve` over real sockets, against the session's embedded Milvus."""
from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import urllib.request
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gmv.v1 import attribution_pb2 as pb
from gmv.v1 import attribution_pb2_grpc as pb_grpc
from gmv_client import AsyncGMVClient, GMVClient
from gmv_engine.settings import Settings
from gmv_engine.datasets import read_heldout
from gmv_engine.pipeline import Attributor

from helpers import metric, png_bytes, png_header_only, start_server, stop_server

pytestmark = pytest.mark.e2e  # starts real servers or subprocesses

SERVICE = "gmv.v1.AttributionService"


@pytest.fixture(scope="module")
def server(milvus, digits_collection, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    running = start_server(milvus, digits_collection[0], log, "--max-queue-delay-ms", "20")
    running["ledger_url"] = str(log.parent / "ledger.sqlite3")  # start_server's data directory is log's folder
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def images(digits):
    return [(path.stem, path.read_bytes()) for path, _, _ in read_heldout(digits.heldout)[:40]]


@pytest.fixture(scope="module")
def expected(index, digits_collection, images):
    """The in-process pipeline's results for the same images: what the server must return."""
    attributor = Attributor(index, digits_collection[0], Settings())
    return {gid: result for (gid, _), result in zip(images, attributor.attribute_bytes([data for _, data in images]))}


def assert_same(result, reference):
    assert [c.training_id for c in result.credits] == [c.training_id for c in reference.credits]
    assert [c.credit for c in result.credits] == pytest.approx([c.credit for c in reference.credits], rel=1e-6)
    assert [c.distance for c in result.credits] == pytest.approx([c.distance for c in reference.credits], rel=1e-5)
    assert result.quality == pytest.approx(reference.quality, rel=1e-6)


def test_health_serving_only_after_warm_up(server):
    log = server["log"].read_text()
    assert log.index("listening on") < log.index("SERVING collection")
    assert set(server["seen"]) <= {health_pb2.HealthCheckResponse.NOT_SERVING, health_pb2.HealthCheckResponse.SERVING}


def test_reflection_lists_the_service(server):
    stub = reflection_pb2_grpc.ServerReflectionStub(server["channel"])
    (response,) = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


def test_index_info(server, digits_collection):
    with GMVClient(server["target"]) as client:
        info = client.index_info()
    assert (info.collection, info.profile, info.encoder, info.reranker, info.quality) == (
        digits_collection[0], "offline", "pixels", "l2", "piqe")
    assert info.index_type == "IVF_PQ" and info.row_count == digits_collection[1].inserted
    assert info.index_params["m"] == "192" and info.search_params["top_k"] == "10"
    # The default T is the collection's calibrated one, as its build stored it.
    assert info.search_params["temperature_source"] == "calibrated"
    assert float(info.search_params["temperature"]) == pytest.approx(digits_collection[1].calibration.temperature)


def test_attribute_streams_credits_in_rank_order_equal_to_in_process(server, images, expected):
    stub = pb_grpc.AttributionServiceStub(server["channel"])
    for gid, data in images[:4]:
        credits = list(stub.Attribute(pb.AttributeRequest(generation_id=gid, image=data), timeout=30))
        assert [c.rank for c in credits] == list(range(1, 11))
        assert {c.generation_id for c in credits} == {gid}
        with GMVClient(server["target"]) as client:
            assert_same(client.attribute(data, gid), expected[gid])


def test_attribute_stream_returns_each_generation_once(server, images, expected):
    with GMVClient(server["target"]) as client:
        results = list(client.attribute_stream([(gid, data) for gid, data in images]))
    assert sorted(r.generation_id for r in results) == sorted(gid for gid, _ in images)
    for result in results:
        assert_same(result, expected[result.generation_id])
        assert sum(credit for _, credit in result.contributors) == pytest.approx(result.quality)


def test_32_concurrent_clients_get_their_own_results_in_batches(server, images, expected):
    port = server["metrics_port"]
    executions, generations = metric(port, "gmv_batch_executions_total"), metric(port, "gmv_generations_attributed_total")

    def one_client(i):
        gid, data = images[i]
        with GMVClient(server["target"]) as client:  # new ids, so each is computed, not replayed
            return gid, client.attribute(data, f"{gid}-concurrent")

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one_client, range(32)))
    for gid, result in results:
        assert result.generation_id == f"{gid}-concurrent" and result.ledger == "recorded"
        assert_same(result, expected[gid])
    executions = metric(port, "gmv_batch_executions_total") - executions
    generations = metric(port, "gmv_generations_attributed_total") - generations
    assert generations == 32
    assert generations / executions > 1, f"{executions:.0f} batches for 32 generations: no batching"


def test_async_client(server, images, expected):
    import asyncio

    async def main():
        async with AsyncGMVClient(server["target"]) as client:
            # Previews: not recorded, so these ids (recorded elsewhere with k=10) are recomputed.
            return await asyncio.gather(*(client.attribute(data, gid, top_k=5, record=False) for gid, data in images[:6]))

    for (gid, _), result in zip(images, asyncio.run(main())):
        assert len(result.credits) == 5 and result.ledger == "not-recorded"
        assert [c.training_id for c in result.credits] == [c.training_id for c in expected[gid].credits[:5]]


@pytest.mark.parametrize("request_kwargs, code, message", [
    (dict(generation_id="g", image=b""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (dict(generation_id="g", image=b"garbage"), grpc.StatusCode.INVALID_ARGUMENT, "could not be decoded"),
    (dict(generation_id="g", image=png_header_only(100_000, 100_000)), grpc.StatusCode.INVALID_ARGUMENT, "pixels"),
    (dict(generation_id="g", image=b"x" * (21 * 1024 * 1024)), grpc.StatusCode.INVALID_ARGUMENT, "bytes; the limit"),
    (dict(generation_id="", image=b"x"), grpc.StatusCode.INVALID_ARGUMENT, "generation_id"),
    (dict(generation_id="g", image=b"x", top_k=1000), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
])
def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(server, images, request_kwargs, code, message):
    stub = pb_grpc.AttributionServiceStub(server["channel"])
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Attribute(pb.AttributeRequest(**request_kwargs), timeout=30))
    assert caught.value.code() == code and message in caught.value.details()
    gid, data = images[0]
    assert len(list(stub.Attribute(pb.AttributeRequest(generation_id=gid, image=data), timeout=30))) == 10


def test_bad_request_in_a_stream_is_its_own_result_and_the_stream_goes_on(server, images):
    stub = pb_grpc.AttributionServiceStub(server["channel"])
    requests = [pb.AttributeRequest(generation_id="ok", image=images[0][1]),
                pb.AttributeRequest(generation_id="broken", image=b"garbage"),
                pb.AttributeRequest(generation_id="ok-too", image=images[1][1])]
    results = {r.generation_id: r for r in stub.AttributeStream(iter(requests), timeout=30)}
    assert set(results) == {"ok", "broken", "ok-too"}
    assert results["broken"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "could not be decoded" in results["broken"].error.message and not results["broken"].credits
    assert not results["ok"].HasField("error") and len(results["ok-too"].credits) == 10


def flat_images() -> list[bytes]:
    """What a safety checker returns: all black, and fully transparent."""
    from PIL import Image

    return [png_bytes(Image.new("RGB", (64, 64), (0, 0, 0))), png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))]


def test_a_long_stream_with_bad_and_flat_images_completes(server, images):
    """Longer than the queue (256): the server reads the stream only as fast as it computes."""
    stub = pb_grpc.AttributionServiceStub(server["channel"])
    flat = flat_images()
    requests = []
    for i in range(300):
        if i in (7, 150, 299):
            image = b"\x89PNG\r\n\x1a\n not really"
        elif i in (40, 200):
            image = flat[i % 2]
        else:
            image = images[i % len(images)][1]
        requests.append(pb.AttributeRequest(generation_id=f"long-{i}", image=image, skip_ledger=True))
    results = {r.generation_id: r for r in stub.AttributeStream(iter(requests), timeout=300)}
    assert len(results) == 300
    errors = {gid: r.error.code for gid, r in results.items() if r.HasField("error")}
    assert errors == {f"long-{i}": grpc.StatusCode.INVALID_ARGUMENT.value[0] for i in (7, 150, 299)}
    for i in (40, 200):  # a flat image is legal: q = 0 and zero credits
        result = results[f"long-{i}"]
        assert result.quality == 0.0 and len(result.credits) == 10 and all(c.credit == 0.0 for c in result.credits)
    assert all(len(r.credits) == 10 for gid, r in results.items() if gid not in errors)


def test_a_black_image_among_concurrent_calls_fails_nobody(server, images):
    black = flat_images()[0]

    def call(i):
        data = black if i == 5 else images[i % len(images)][1]
        with GMVClient(server["target"]) as client:
            return client.attribute(data, generation_id=f"concurrent-black-{i}")

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(16)))
    assert len(results) == 16 and results[5].quality == 0.0
    assert all(abs(sum(c.credit for c in r.credits) - r.quality) < 1e-9 for r in results)


@pytest.mark.parametrize("field, value, message", [
    ("generation_id", "x" * 1_000_000, "generation_id is 1000000 bytes; the limit is 128"),
    ("generation_id", "line\nforged", "control characters"),
    ("tenant_id", "t" * 129, "tenant_id is 129 bytes"),
])
def test_ids_are_bounded_and_printable_and_nothing_is_recorded(server, images, field, value, message):
    stub = pb_grpc.AttributionServiceStub(server["channel"])
    request = {"generation_id": "bounded-id", "image": images[0][1], field: value}
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Attribute(pb.AttributeRequest(**request), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()
    assert len(caught.value.details()) < 1000
    import sqlite3

    with sqlite3.connect(Path(server["log"]).parent / "ledger.sqlite3") as db:
        ids = [row[0] for row in db.execute("SELECT generation_id FROM generations")]
    assert "bounded-id" not in ids and not any(len(i) > 128 for i in ids)


def test_a_callers_string_echoed_in_an_error_is_escaped_in_the_status_and_the_log(server, images):
    stub = pb_grpc.AttributionServiceStub(server["channel"])
    forged = "nope\nERROR gmv.server: forged line " + "x" * 20_000
    request = pb.AttributeRequest(generation_id="escaped-1", image=images[0][1], collection=forged)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Attribute(request, timeout=30))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND, caught.value.details()
    assert "\\n" in caught.value.details() and "\n" not in caught.value.details()
    assert len(caught.value.details()) < 1000
    time.sleep(0.5)  # the log line is written
    assert not any(line.startswith("ERROR gmv.server: forged") for line in Path(server["log"]).read_text().splitlines())


def test_valuation_of_too_many_ids_is_invalid_argument(server):
    with GMVClient(server["target"]) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.valuation(training_ids=[f"t{i}" for i in range(10_001)])
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "the limit is 10000" in caught.value.details()


def test_passed_deadline_is_not_computed(server, images):
    stub = pb_grpc.AttributionServiceStub(server["channel"])
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Attribute(pb.AttributeRequest(generation_id="late", image=images[0][1]), timeout=0.001))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_cli_remote_mode_prints_what_local_mode_prints(server, milvus, digits, digits_collection, tmp_path):
    paths = [str(path) for path, _, _ in read_heldout(digits.heldout)[:2]]
    cli = [sys.executable, "-m", "gmv_server.cli", "attribute", *paths, "--json"]
    remote = subprocess.run([*cli, "--server", server["target"]], capture_output=True, text=True, timeout=120)
    local = subprocess.run([*cli, "--collection", digits_collection[0], "--milvus-uri", milvus.uri,
                            "--data-dir", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert remote.returncode == local.returncode == 0, remote.stderr + local.stderr
    for r, l in zip(remote.stdout.splitlines(), local.stdout.splitlines()):
        r, l = json.loads(r), json.loads(l)
        assert (r["generation_id"], r["image"]) == (l["generation_id"], l["image"])
        assert [c["training_id"] for c in r["credits"]] == [c["training_id"] for c in l["credits"]]
        assert r["quality"] == pytest.approx(l["quality"])


def test_committed_stubs_match_the_proto(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "client"))
    from generate_stubs import generate

    generate(tmp_path)
    committed = Path(__file__).resolve().parent.parent / "client" / "gmv" / "v1"
    for name in ("attribution_pb2.py", "attribution_pb2.pyi", "attribution_pb2_grpc.py"):
        assert (tmp_path / "gmv" / "v1" / name).read_text() == (committed / name).read_text(), (
            f"client/gmv/v1/{name} is out of date: run `.venv/bin/python client/generate_stubs.py`")


NODE_CLIENT = Path(__file__).resolve().parent.parent / "client" / "node"


def test_a_node_client_built_from_the_proto_calls_every_rpc(server, digits, images, expected):
    import shutil

    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("client/node/node_modules is missing: `make test` installs it with npm ci")
    paths = [str(path) for path, _, _ in read_heldout(digits.heldout)[:3]]
    run = subprocess.run(["node", str(NODE_CLIENT / "gmv_client.js"), server["target"], *paths],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    reply = json.loads(run.stdout)
    assert reply["info"]["index_type"] == "IVF_PQ" and reply["info"]["encoder"] == "pixels"
    first = Path(paths[0]).stem
    assert [c["rank"] for c in reply["credits"]] == [1, 2, 3, 4, 5]
    assert [c["training_id"] for c in reply["credits"]] == [c.training_id for c in expected[first].credits[:5]]
    assert sorted(r["generation_id"] for r in reply["results"]) == sorted(f"node-{Path(p).stem}" for p in paths)
    # The stream resent the first id: the ledger replays it; the others are new.
    assert sorted(r["ledger"] for r in reply["results"]) == [1, 1, 2]  # LEDGER_STATE_RECORDED twice, REPLAYED once
    assert reply["invalid"] == "INVALID_ARGUMENT"
    assert reply["valuation"]["generations"] == 3 and reply["top"]["generations"] == 3
    total = sum(r["quality"] for r in reply["results"])
    assert reply["valuation"]["total_credit"] == pytest.approx(total)
    assert sum(v["value"] for v in reply["valuation"]["values"]) == pytest.approx(total)


def test_ledger_queries_refuse_an_empty_window(server):
    with GMVClient(server["target"]) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.top_contributors(since=200.0, until=100.0)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "until must be after since" in caught.value.details()
        assert client.valuation(since=0.0, until=1.0).generations == 0  # 1970: nothing recorded then


def _raw_attribute_request(generation_id: bytes, image: bytes) -> bytes:
    """An AttributeRequest on the wire, built by hand: field 1 (generation_id) may hold bytes
    that are not UTF-8, which protobuf's own serializer refuses to write."""
    def field(number: int, value: bytes) -> bytes:
        return bytes([number << 3 | 2]) + _varint(len(value)) + value
    return field(1, generation_id) + field(2, image)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


@pytest.mark.parametrize("payload", [
    _raw_attribute_request(b"gen-\xff\xfe", b"x"),  # a string field that is not UTF-8
    b"\x0a\xff\xff\xff\xff\x0f",  # a length past the end of the message
    b"\xff\xff\xff",  # not a message at all
], ids=["invalid-utf8", "truncated", "garbage"])
def test_malformed_requests_get_invalid_argument_not_unknown(server, images, payload):
    identity = lambda data: data  # noqa: E731 - send the bytes as they are
    attribute = server["channel"].unary_stream(f"/{SERVICE}/Attribute", request_serializer=identity,
                                              response_deserializer=pb.Credit.FromString)
    with pytest.raises(grpc.RpcError) as caught:
        list(attribute(payload, timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    info = server["channel"].unary_unary(f"/{SERVICE}/GetIndexInfo", request_serializer=identity,
                                         response_deserializer=pb.IndexInfo.FromString)
    with pytest.raises(grpc.RpcError) as caught:
        info(b"\x0a\x02\xff\xfe", timeout=30)  # collection: not UTF-8
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stream = server["channel"].stream_stream(f"/{SERVICE}/AttributeStream", request_serializer=identity,
                                             response_deserializer=pb.AttributionResult.FromString)
    good = pb.AttributeRequest(generation_id="malformed-neighbour", image=images[0][1], skip_ledger=True)
    results = list(stream(iter([payload, good.SerializeToString()]), timeout=30))
    assert len(results) == 2
    failed = [r for r in results if r.HasField("error")]
    assert len(failed) == 1 and failed[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert any(r.generation_id == "malformed-neighbour" and len(r.credits) == 10 for r in results)
