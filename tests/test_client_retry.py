"""The SDKs ride out a server restart: UNAVAILABLE (and RESOURCE_EXHAUSTED) are retried until the
call's deadline with jittered, capped backoff, over real sockets. The fast tests run a real gRPC
server of gmv.v1.AttributionService that answers UNAVAILABLE for a while, or one whose port
only starts listening late; the e2e test restarts `gmv serve` under a call in flight."""
from __future__ import annotations

import asyncio
import json
import random
import shutil
import statistics
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from gmv.v1 import attribution_pb2 as pb
from gmv.v1 import attribution_pb2_grpc as pb_grpc
from gmv_client import AsyncGMVClient, GMVClient, backoff_delay

from helpers import free_port, start_server, stop_server

NODE_DIR = Path(__file__).resolve().parent.parent / "client" / "node"
SLACK_S = 0.5  # scheduling slack on a loaded 2-core machine


class Flaky(pb_grpc.AttributionServiceServicer):
    """Answers `code` until `down_for`'s time has passed, then two credits (Attribute) or an
    IndexInfo; generation_id "bad" is INVALID_ARGUMENT at once. `calls`: each call's arrival."""

    def __init__(self):
        self.until, self.code, self.calls = 0.0, grpc.StatusCode.UNAVAILABLE, []

    def down_for(self, seconds: float, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        self.until, self.code = time.monotonic() + seconds, code
        self.calls.clear()

    def _gate(self, context, generation_id: str = "") -> None:
        self.calls.append(time.monotonic())
        if generation_id == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the image could not be decoded")
        if time.monotonic() < self.until:
            context.abort(self.code, "restarting")

    def Attribute(self, request, context):
        self._gate(context, request.generation_id)
        for rank in (1, 2):
            yield pb.Credit(generation_id=request.generation_id, rank=rank, training_id=f"t{rank}",
                            contributor_id="alice", credit=0.25, distance=1.0, quality=0.5)

    def GetIndexInfo(self, request, context):
        self._gate(context)
        return pb.IndexInfo(collection="c")

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.calls, self.calls[1:])]


def serve(service: Flaky, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_AttributionServiceServicer_to_server(service, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


@pytest.fixture
def flaky():
    service = Flaky()
    server, port = serve(service)
    service.target = f"127.0.0.1:{port}"
    yield service
    server.stop(0)


@pytest.fixture
def late_target():
    """A port nobody listens on for 2 s, then a (healthy) Flaky server."""
    port, started = free_port(), []
    timer = threading.Timer(2.0, lambda: started.append(serve(Flaky(), port)[0]))
    timer.start()
    yield f"127.0.0.1:{port}"
    timer.cancel()
    for server in started:
        server.stop(0)


def timed(function, *args, **kwargs):
    started = time.monotonic()
    try:
        return function(*args, **kwargs), None, time.monotonic() - started
    except grpc.RpcError as error:
        return None, error, time.monotonic() - started


# -- the backoff itself

def test_backoff_is_full_jitter_exponential_and_capped():
    rng = random.Random(7)
    for retry, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]):
        delays = [backoff_delay(retry, 0.1, 2.0, 2.0, rng) for _ in range(2000)]
        assert 0 <= min(delays) < 0.05 * ceiling and 0.95 * ceiling < max(delays) <= ceiling
        assert statistics.mean(delays) == pytest.approx(ceiling / 2, rel=0.1)
    assert backoff_delay(10_000, 0.1, 2.0, 2.0) <= 2.0  # no overflow however many retries


# -- the Python SDK, blocking

def test_an_outage_shorter_than_the_deadline_is_ridden_out(flaky):
    with GMVClient(flaky.target, timeout_s=8, max_backoff_s=0.5) as client:
        flaky.down_for(1.5)
        result, error, elapsed = timed(client.attribute, b"png", "gen-1")
        assert error is None and [c.training_id for c in result.credits] == ["t1", "t2"]
        assert 1.5 <= elapsed < 1.5 + 0.5 + SLACK_S and len(flaky.calls) >= 3
        flaky.down_for(1.0, grpc.StatusCode.RESOURCE_EXHAUSTED)  # a full queue: retried too
        info, error, elapsed = timed(client.index_info)
        assert error is None and info.collection == "c" and elapsed >= 1.0 and len(flaky.calls) >= 2


def test_an_outage_longer_than_the_deadline_fails_by_the_deadline(flaky):
    with GMVClient(flaky.target, timeout_s=30, max_backoff_s=0.3) as client:
        flaky.down_for(60)
        _, error, elapsed = timed(client.attribute, b"png", "gen-1", timeout_s=2.0)  # a per-call deadline
    assert error.code() == grpc.StatusCode.UNAVAILABLE and error.details() == "restarting"
    # retried until a sleep would have reached past the deadline, and not after it
    assert 2.0 - 0.3 <= elapsed <= 2.0 + SLACK_S and len(flaky.calls) >= 5


def test_sleeps_are_jittered_and_capped(flaky):
    with GMVClient(flaky.target, timeout_s=3, backoff_s=0.05, max_backoff_s=0.2) as client:
        flaky.down_for(60)
        _, error, _ = timed(client.index_info)
    gaps = flaky.gaps()  # each gap: one sleep plus a round trip
    assert error.code() == grpc.StatusCode.UNAVAILABLE and len(gaps) >= 10
    assert max(gaps) <= 0.2 + SLACK_S  # uncapped, the 6th sleep alone would be up to 3.2 s
    assert statistics.pstdev(gaps[3:]) > 0.02, gaps  # at the cap, sleeps still differ: jittered
    assert min(gaps[3:]) < 0.15, gaps  # full jitter: some sleeps well under the cap


def test_a_retries_cap_still_applies(flaky):
    with GMVClient(flaky.target, timeout_s=10, retries=2, backoff_s=0.01) as client:
        flaky.down_for(60)
        _, error, elapsed = timed(client.index_info)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and len(flaky.calls) == 3 and elapsed < 1


def test_a_non_retryable_error_raises_at_once(flaky):
    with GMVClient(flaky.target, timeout_s=10) as client:
        _, error, elapsed = timed(client.attribute, b"png", "bad")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(flaky.calls) == 1 and elapsed < 0.5


def test_a_port_that_starts_listening_late(late_target):
    with GMVClient(late_target, timeout_s=10, max_backoff_s=0.5) as client:
        result, error, elapsed = timed(client.attribute, b"png", "gen-1")
    # up to 2 s listening late, ~1.2 s more for the channel's next reconnect, then a sleep of <= 0.5 s
    assert error is None and len(result.credits) == 2 and 1.9 <= elapsed < 2.0 + 1.2 + 0.5 + SLACK_S


def test_wait_until_ready_polls_through_an_outage(flaky):
    with GMVClient(flaky.target, retries=0) as client:  # `retries` does not limit waiting
        flaky.down_for(1.0)
        info, error, elapsed = timed(client.wait_until_ready, timeout_s=10, poll_s=0.2)
    assert error is None and info.collection == "c" and elapsed >= 1.0 and max(flaky.gaps()) <= 0.2 + SLACK_S


# -- the Python SDK, asyncio

def test_async_client_rides_out_an_outage_and_keeps_its_deadline(flaky):
    async def main():
        async with AsyncGMVClient(flaky.target, timeout_s=8, max_backoff_s=0.3) as client:
            outcomes = {}
            for name, outage, timeout_s, generation_id in [("short", 1.5, None, "gen-1"), ("long", 60, 2.0, "gen-2"),
                                                           ("invalid", 0, None, "bad")]:
                flaky.down_for(outage)
                started = time.monotonic()
                try:
                    outcomes[name] = (await client.attribute(b"png", generation_id, timeout_s=timeout_s),
                                      time.monotonic() - started, len(flaky.calls))
                except grpc.RpcError as error:
                    outcomes[name] = (error, time.monotonic() - started, len(flaky.calls))
            return outcomes

    outcomes = asyncio.run(main())
    result, elapsed, calls = outcomes["short"]
    assert len(result.credits) == 2 and 1.5 <= elapsed < 1.5 + 0.3 + SLACK_S and calls >= 3
    error, elapsed, calls = outcomes["long"]
    assert error.code() == grpc.StatusCode.UNAVAILABLE and 2.0 - 0.3 <= elapsed <= 2.0 + SLACK_S
    error, elapsed, calls = outcomes["invalid"]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and calls == 1 and elapsed < 0.5


def test_async_client_reaches_a_port_that_starts_listening_late(late_target):
    async def main():
        async with AsyncGMVClient(late_target, timeout_s=10, max_backoff_s=0.5) as client:
            return await client.index_info()

    started = time.monotonic()
    assert asyncio.run(main()).collection == "c" and time.monotonic() - started >= 1.9


# -- the Node.js helpers (client/node/gmv_proto.js), through client/node/retry_probe.js

def probe(target: str, method: str = "Attribute", request: dict | None = None, **options) -> dict:
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("client/node/node_modules is missing (`npm ci` in client/node; `make test` runs it)")
    spec = {"target": target, "method": method, "request": request or {"generation_id": "gen-1", "image": "png"},
            "options": options}
    run = subprocess.run(["node", "retry_probe.js", json.dumps(spec)], cwd=NODE_DIR, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_node_rides_out_an_outage_shorter_than_the_deadline(flaky):
    flaky.down_for(2.5)  # node's own start takes part of it
    outcome = probe(flaky.target, timeoutMs=8000, maxBackoffMs=500)
    assert outcome["ok"] and outcome["credits"] == 2 and outcome["retries"], outcome
    assert {r["code"] for r in outcome["retries"]} == {"UNAVAILABLE"}
    flaky.down_for(2.5, grpc.StatusCode.RESOURCE_EXHAUSTED)
    outcome = probe(flaky.target, "GetIndexInfo", {}, timeoutMs=8000, maxBackoffMs=500)
    assert outcome["ok"] and {r["code"] for r in outcome["retries"]} == {"RESOURCE_EXHAUSTED"}, outcome


def test_node_fails_by_the_deadline_with_jittered_capped_sleeps(flaky):
    flaky.down_for(60)
    outcome = probe(flaky.target, timeoutMs=2500, initialBackoffMs=50, maxBackoffMs=200)
    assert not outcome["ok"] and outcome["code"] == "UNAVAILABLE", outcome
    assert 2500 - 200 <= outcome["elapsedMs"] <= 2500 + 1000 * SLACK_S
    delays = [r["delayMs"] for r in outcome["retries"]]
    assert len(delays) >= 10 and max(delays) <= 200 and statistics.pstdev(delays[3:]) > 20, delays


def test_node_retries_cap_and_non_retryable_errors(flaky):
    flaky.down_for(60)
    outcome = probe(flaky.target, timeoutMs=10000, retries=2, initialBackoffMs=10)
    assert outcome["code"] == "UNAVAILABLE" and len(outcome["retries"]) == 2 and len(flaky.calls) == 3, outcome
    flaky.down_for(0)
    outcome = probe(flaky.target, request={"generation_id": "bad", "image": "png"}, timeoutMs=10000)
    assert outcome["code"] == "INVALID_ARGUMENT" and outcome["retries"] == [] and len(flaky.calls) == 1, outcome


def test_node_reaches_a_port_that_starts_listening_late(late_target):
    outcome = probe(late_target, timeoutMs=10000, maxBackoffMs=500)
    assert outcome["ok"] and outcome["credits"] == 2 and outcome["retries"], outcome


# -- end to end: `gmv serve` restarted under a call in flight

@pytest.mark.e2e
def test_a_call_rides_out_a_server_restart_and_is_recorded_once(milvus, digits_collection, digits, tmp_path):
    from gmv_engine.datasets import read_heldout

    image = read_heldout(digits.heldout)[0][0].read_bytes()
    tenant, generation_id = "restart", "across-a-restart"
    first = start_server(milvus, digits_collection[0], tmp_path / "serve-1.log")  # the ledger: in tmp_path
    port = first["port"]
    stop_server(first)

    outcome = {}

    def call():
        with GMVClient(f"127.0.0.1:{port}") as client:
            started = time.monotonic()
            try:
                outcome["result"] = client.attribute(image, generation_id, tenant_id=tenant, timeout_s=90)
            except grpc.RpcError as error:
                outcome["error"] = error
            outcome["elapsed"] = time.monotonic() - started

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive(), outcome  # refused, and retrying
    second = start_server(milvus, digits_collection[0], tmp_path / "serve-2.log", port=port)
    try:
        thread.join(timeout=120)
        assert not thread.is_alive() and "error" not in outcome, outcome
        result = outcome["result"]
        assert result.ledger == "recorded" and len(result.credits) == 10 and outcome["elapsed"] < 90
        with GMVClient(second["target"]) as client:
            assert client.attribute(image, generation_id, tenant_id=tenant).ledger == "replayed"
            assert client.valuation(tenant_id=tenant).generations == 1
    finally:
        stop_server(second)
