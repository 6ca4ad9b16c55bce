"""Monitoring against the real parts: a `gmv serve` on real sockets (JSON logs), Debian's
promtool on its live /metrics, and a real Prometheus that scrapes it, loads the alert rules
of deploy/ and answers PromQL, including every query of the Grafana dashboard."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest

from gmv.v1 import attribution_pb2 as pb
from gmv.v1 import attribution_pb2_grpc as pb_grpc
from gmv_client import GMVClient
from gmv_engine.datasets import read_heldout
from gmv_engine.milvus.embedded import free_port

from helpers import metric_samples as samples
from helpers import start_server, stop_server

pytestmark = pytest.mark.e2e  # starts real servers or subprocesses

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gmv.json"
GPU_METRICS = {"gmv_gpu_memory_allocated_bytes", "gmv_gpu_memory_reserved_bytes", "gmv_gpu_memory_total_bytes"}
OK_REQUESTS, BAD_REQUESTS = 6, 2  # what `traffic` sends


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed: `make test` installs Debian's prometheus package (apt-get)")
    return path


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def sample_names(text: str) -> set[str]:
    return {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", key).group(0) for key in samples(text)}


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bgmv_[a-z0-9_]+", expr))


@pytest.fixture(scope="module")
def server(milvus, digits_collection, tmp_path_factory):
    running = start_server(milvus, digits_collection[0], tmp_path_factory.mktemp("metrics") / "serve.log",
                           "--log-format", "json", "--max-queue-delay-ms", "20", verbose=True)
    yield running
    stop_server(running)


@pytest.fixture(scope="module")
def traffic(server, digits):
    """OK_REQUESTS attributions (two of them concurrent, so batches form) and BAD_REQUESTS bad images."""
    images = [(path.stem, path.read_bytes()) for path, _, _ in read_heldout(digits.heldout)[:OK_REQUESTS]]
    with GMVClient(server["target"]) as client:
        list(client.attribute_stream(images[:2]))  # one AttributeStream call of 2 generations
        for gid, data in images[2:]:
            client.attribute(data, gid)
    stub = pb_grpc.AttributionServiceStub(server["channel"])
    for i in range(BAD_REQUESTS):
        with pytest.raises(grpc.RpcError):
            list(stub.Attribute(pb.AttributeRequest(generation_id=f"broken-{i}", image=b"not an image"), timeout=10))
    return {"generations": [gid for gid, _ in images], "text": scrape(server["metrics_port"])}


@pytest.fixture(scope="module")
def prometheus(server, traffic, tmp_path_factory):
    """A real Prometheus on a free loopback port scraping the server every second, with the
    alert rules of deploy/ loaded; its own config and data dir, stopped afterwards."""
    binary = need("prometheus")
    root = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    config = root / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "gmv",
                            "static_configs": [{"targets": [f"127.0.0.1:{server['metrics_port']}"]}]}],
    }))
    log = root / "prometheus.log"
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log.open("w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if urllib.request.urlopen(f"{base}/-/ready", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus never became ready:\n" + log.read_text()
            time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def promql(base: str, query: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert reply["status"] == "success", (query, reply)
    return reply["data"]["result"]


def wait_for(base: str, query: str, expected: float, timeout_s: float = 30.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = promql(base, query)
        if result and float(result[0]["value"][1]) == expected:
            return result
        assert time.monotonic() < deadline, f"{query} = {result}, expected {expected}"
        time.sleep(0.5)


def test_live_metrics_pass_promtool_check_metrics(server, traffic):
    promtool = need("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=scrape(server["metrics_port"]),
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), check.stdout + check.stderr


def test_requests_stages_and_batches_are_counted(server, traffic, digits_collection):
    values = samples(traffic["text"])
    c = f'collection="{digits_collection[0]}"'  # request-level series carry the collection
    assert values[f'gmv_requests_total{{code="OK",{c},method="Attribute"}}'] == OK_REQUESTS - 2
    assert values[f'gmv_requests_total{{code="OK",{c},method="AttributeStream"}}'] == 1
    assert values[f'gmv_requests_total{{code="INVALID_ARGUMENT",{c},method="Attribute"}}'] == BAD_REQUESTS
    assert values[f'gmv_requests_total{{code="OK",{c},method="GetIndexInfo"}}'] == 0  # exported before any call
    assert values[f"gmv_generations_attributed_total{{{c}}}"] == OK_REQUESTS
    assert values[f"gmv_generation_duration_seconds_count{{{c}}}"] == OK_REQUESTS
    assert values[f"gmv_generation_quality_count{{{c}}}"] == OK_REQUESTS
    assert values[f'gmv_generation_quality_bucket{{{c},le="1.0"}}'] == OK_REQUESTS
    assert 0 < values[f"gmv_generation_quality_sum{{{c}}}"] <= OK_REQUESTS
    executions = values["gmv_batch_executions_total"]
    assert 1 <= executions <= OK_REQUESTS and values["gmv_batch_size_sum"] == OK_REQUESTS
    # Per generation: queue (only those that reached the batcher) and decode (bad images too).
    assert values['gmv_stage_seconds_count{stage="queue"}'] == OK_REQUESTS
    assert values['gmv_stage_seconds_count{stage="decode"}'] == OK_REQUESTS
    # Per batch, each stage once; the warm-up batch is not counted.
    for stage in ("embed", "recall", "rerank", "quality", "credit"):
        assert values[f'gmv_stage_seconds_count{{stage="{stage}"}}'] == executions, stage
        assert values[f'gmv_stage_seconds_sum{{stage="{stage}"}}'] > 0, stage
    # The ledger's series are exported from the start. A recording server records each generation
    # once, in transactions that group the generations finishing together.
    recorded = values[f'gmv_ledger_writes_total{{{c},outcome="recorded"}}']
    transactions = values['gmv_stage_seconds_count{stage="ledger_write"}']
    assert recorded in (0, OK_REQUESTS) and (transactions > 0) == (recorded > 0) and transactions <= recorded
    for outcome in ("recorded", "replayed", "conflict", "error"):
        assert f'gmv_ledger_writes_total{{{c},outcome="{outcome}"}}' in values
    assert values['gmv_milvus_request_duration_seconds_count{operation="search"}'] >= executions
    assert values["gmv_milvus_up"] == 1
    assert values["gmv_queue_capacity"] == 256 and values["gmv_queue_depth"] == 0
    (info,) = [key for key in values if key.startswith("gmv_build_info{")]
    for label in ('version="0.1.0"', f'collection="{digits_collection[0]}"', 'profile="offline"',
                  'encoder="pixels"', 'reranker="l2"', 'quality="piqe"', 'device="cpu"'):
        assert label in info, info


def test_milvus_errors_are_counted_and_a_missing_collection_is_not_down(index):
    from gmv_engine.errors import CollectionNotFoundError
    from gmv_server.metrics import ServerMetrics

    metrics = ServerMetrics()
    index.call_observer = metrics.observe_milvus_call
    try:
        index.list_collections()
        with pytest.raises(CollectionNotFoundError):
            index.count("no_such_collection")
    finally:
        index.call_observer = None
    assert metrics.milvus_errors.labels(operation="query")._value.get() == 1
    assert metrics.milvus_seconds.labels(operation="list_collections")._sum.get() > 0
    assert metrics.milvus_up._value.get() == 1


def test_json_logs_carry_the_generation_id(server, traffic):
    lines = [json.loads(line) for line in server["log"].read_text().splitlines() if line.startswith("{")]
    assert lines, server["log"].read_text()
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    attributed = {line["generation_id"] for line in lines if line["message"].startswith("attributed in")}
    assert attributed == set(traffic["generations"])
    failed = [line for line in lines if "failed with INVALID_ARGUMENT" in line["message"]]
    assert {line["generation_id"] for line in failed} == {f"broken-{i}" for i in range(BAD_REQUESTS)}
    # Every line of the request logger is about one request, so carries its id.
    requests = [line for line in lines if line["logger"] == "gmv.server.requests"]
    assert len(requests) == OK_REQUESTS + BAD_REQUESTS
    assert all(line.get("generation_id") for line in requests), requests


def test_prometheus_scrapes_the_server_and_counts_its_requests(prometheus, server, traffic):
    target = f"127.0.0.1:{server['metrics_port']}"
    wait_for(prometheus, f'up{{job="gmv", instance="{target}"}}', 1)
    wait_for(prometheus, 'sum(gmv_requests_total{job="gmv", method="Attribute", code="OK"})', OK_REQUESTS - 2)
    wait_for(prometheus, 'sum(gmv_requests_total{job="gmv", code="INVALID_ARGUMENT"})', BAD_REQUESTS)
    wait_for(prometheus, 'sum(gmv_generations_attributed_total{job="gmv"})', OK_REQUESTS)
    # And a request made now shows up in a later scrape.
    with GMVClient(server["target"]) as client:
        client.index_info()
    wait_for(prometheus, 'sum(gmv_requests_total{job="gmv", method="GetIndexInfo", code="OK"})', 1)


def test_alert_rules_load_and_evaluate_in_prometheus(prometheus, server, traffic):
    wait_for(prometheus, 'up{job="gmv"}', 1)
    deadline = time.monotonic() + 30
    while True:  # rules are evaluated every second; wait for a first evaluation of each
        reply = json.loads(urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10).read())
        rules = [rule for group in reply["data"]["groups"] for rule in group["rules"]]
        if rules and all(rule.get("lastEvaluation", "").startswith("20") and rule["health"] != "unknown"
                         for rule in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.5)
    assert {rule["name"] for rule in rules} == {"GMVHighErrorRate", "GMVHighLatencyP99", "GMVMilvusUnreachable",
                                                "GMVQueueSaturated", "GMVDown"}
    assert all(rule["health"] == "ok" for rule in rules), rules
    # A healthy server raises none of them (bad images are the caller's errors).
    assert all(rule["state"] == "inactive" for rule in rules), rules
    live = sample_names(scrape(server["metrics_port"]))
    for rule in rules:
        assert metric_names(rule["query"]) <= live, rule["query"]


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] if panel["type"] != "row"
            for target in panel["targets"]]


def test_every_dashboard_query_names_an_exported_metric_and_runs(prometheus, server, traffic):
    live = sample_names(scrape(server["metrics_port"]))
    queries = dashboard_queries()
    assert len(queries) >= 15
    wait_for(prometheus, 'up{job="gmv"}', 1)
    time.sleep(3)  # a few scrapes, so rate() over the window has points
    for title, expr in queries:
        names = metric_names(expr)
        assert names, f"panel '{title}' queries no GMV metric: {expr}"
        # GPU memory is exported only by a server on CUDA (tests/test_gpu_metrics.py).
        assert names - GPU_METRICS <= live, f"panel '{title}' names metrics the server does not export: {names - live}"
        result = promql(prometheus, expr.replace("$__rate_interval", "1m"))
        if not names & GPU_METRICS and "RESOURCE_EXHAUSTED" not in expr and "INTERNAL" not in expr:
            assert result, f"panel '{title}' is empty over a serving server's data: {expr}"


def test_healthcheck_module_reports_serving_and_unreachable(server):
    check = [sys.executable, "-m", "gmv_server.healthcheck"]
    ok = subprocess.run([*check, server["target"]], capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    nobody = subprocess.run([*check, f"127.0.0.1:{free_port()}", "--timeout", "1"], capture_output=True, text=True,
                            timeout=30)
    assert nobody.returncode == 1 and "UNREACHABLE" in nobody.stdout, nobody.stdout + nobody.stderr
