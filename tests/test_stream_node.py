"""A client in another language, written from the .proto alone, streams 1,000 distinct
generations (3 undecodable, 2 flat among them) through one AttributeStream as fast as it can:
every generation gets its own result, the flat ones q = 0, the bad ones INVALID_ARGUMENT, no
RESOURCE_EXHAUSTED, and the ledger holds each recorded generation once."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from gmv_client import GMVClient
from gmv_engine.datasets import read_heldout

from helpers import metric, png_bytes, start_server, stop_server

pytestmark = pytest.mark.e2e  # starts a real server and a Node.js subprocess

NODE_CLIENT = Path(__file__).resolve().parent.parent / "client" / "node"
TENANT = "node-stream"
GENERATIONS = 1000
BAD_AT = {13: b"\x89PNG\r\n\x1a\n not really a PNG", 501: b"\xff\xd8\xff\xe0 this is no JPEG" * 3,
          998: bytes(range(256)) * 4}
FLAT_AT = (250, 777)  # all black; fully transparent


@pytest.fixture(scope="module")
def node():
    if shutil.which("node") is None:
        pytest.skip("Node.js is not installed")
    if not (NODE_CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir() or not (
            NODE_CLIENT / "node_modules" / "@grpc" / "proto-loader").is_dir():
        pytest.skip("client/node/node_modules is missing (`make test` installs it with npm ci)")
    return shutil.which("node")


@pytest.fixture(scope="module")
def server(milvus, digits_collection, tmp_path_factory):
    log = tmp_path_factory.mktemp("stream-node") / "serve.log"
    running = start_server(milvus, digits_collection[0], log)
    running["ledger"] = log.parent / "ledger.sqlite3"  # start_server's data directory is log's folder
    yield running
    stop_server(running)


def perturbed(base: Image.Image, seed: int) -> Image.Image:
    """The held-out digit with a few pixels nudged by a seeded amount: a distinct generation
    that looks (and attributes) like its digit."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(base.convert("RGB"), dtype=np.int16).copy()
    for _ in range(8):
        y, x, c = rng.integers(0, pixels.shape[0]), rng.integers(0, pixels.shape[1]), rng.integers(0, 3)
        pixels[y, x, c] += int(rng.choice([-1, 1]) * rng.integers(3, 24))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def generations(digits, tmp_path_factory):
    """1,000 files named so that sorted order mixes the bad and the flat ones in:
    {kind: [generation_id, ...]} and the folder."""
    folder = tmp_path_factory.mktemp("generations")
    bases = [Image.open(path).convert("RGB") for path, _, _ in read_heldout(digits.heldout)]
    flats = [png_bytes(Image.new("RGB", (64, 64), (0, 0, 0))), png_bytes(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))]
    kinds: dict[str, list[str]] = {"good": [], "bad": [], "flat": []}
    digests = set()
    for i in range(GENERATIONS):
        if i in BAD_AT:
            kind, data, suffix = "bad", BAD_AT[i], ".png"
        elif i in FLAT_AT:
            kind, data, suffix = "flat", flats[FLAT_AT.index(i)], ".png"
        else:
            image = perturbed(bases[i % len(bases)], seed=i)
            kind, (data, suffix) = "good", ((jpeg_bytes(image), ".jpg") if i % 5 == 0 else (png_bytes(image), ".png"))
        digests.add(hashlib.sha256(data).hexdigest())
        stem = f"{i:04d}-{kind}"
        (folder / f"{stem}{suffix}").write_bytes(data)
        kinds[kind].append(stem)
    assert len(digests) == GENERATIONS, "the generations must be distinct images"
    assert [len(kinds[k]) for k in ("good", "bad", "flat")] == [995, 3, 2]
    return kinds, folder


def run_node(node, *args: str, timeout: float = 600) -> dict:
    run = subprocess.run([node, str(NODE_CLIENT / "stream_client.js"), *args], capture_output=True, text=True,
                         timeout=timeout, check=False)
    assert run.stdout, run.stderr
    return {**json.loads(run.stdout), "returncode": run.returncode, "stderr": run.stderr}


def test_a_node_client_streams_1000_generations_as_fast_as_it_can(node, server, generations, tmp_path):
    kinds, folder = generations
    port = server["metrics_port"]
    attributed = metric(port, "gmv_generations_attributed_total")

    reply = run_node(node, server["target"], "--tenant", TENANT, str(folder))
    print(f"\n{reply['results']} results in {reply['wall_s']:.1f} s over one stream; errors {reply['errors']}")

    assert reply["returncode"] == 0 and reply["call_status"] == "OK", (reply["call_error"], reply["stderr"])
    assert reply["sent"] == GENERATIONS and reply["results"] == GENERATIONS
    results = {g["generation_id"]: g for g in reply["generations"]}
    assert sorted(results) == sorted(kinds["good"] + kinds["bad"] + kinds["flat"])  # each exactly once

    # No RESOURCE_EXHAUSTED (nor any other failure) but the three undecodable images.
    assert reply["errors"] == {"INVALID_ARGUMENT": 3}
    for gid in kinds["bad"]:
        assert results[gid]["error"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0], results[gid]
        assert results[gid]["error"]["name"] == "INVALID_ARGUMENT" and results[gid]["credits"] == 0
    for gid in kinds["good"]:
        result = results[gid]
        assert result["error"] is None and result["credits"] == 10 and result["quality"] > 0, result
        assert result["credit_sum"] == pytest.approx(result["quality"], abs=1e-9)
        assert result["ledger"] == "LEDGER_STATE_RECORDED"
    for gid in kinds["flat"]:  # legal: a result with q = 0 and no error, recorded like any other
        result = results[gid]
        assert result["error"] is None and result["quality"] == 0.0 and result["credit_sum"] == 0.0, result
        assert result["ledger"] == "LEDGER_STATE_RECORDED"
    assert reply["with_credits"] == 997 and sum(r["credit_sum"] > 0 for r in results.values()) == 995

    recorded = kinds["good"] + kinds["flat"]
    assert metric(port, "gmv_generations_attributed_total") - attributed == len(recorded)
    try:
        rejected = metric(port, "gmv_queue_rejected_total")
    except KeyError:  # no sample: nothing was ever refused
        rejected = 0
    assert rejected == 0

    # The ledger holds each recorded generation once, with its credits summing to its quality.
    total_quality = sum(results[gid]["quality"] for gid in recorded)
    with GMVClient(server["target"]) as client:
        valuation = client.valuation(tenant_id=TENANT)
        top = client.top_contributors(tenant_id=TENANT, limit=100)
    assert valuation.generations == top.generations == len(recorded)
    assert valuation.total_credit == pytest.approx(total_quality, rel=1e-9)
    assert sum(v.value for v in valuation.items) == pytest.approx(total_quality, rel=1e-9)
    assert sum(c.value for c in top.items) == pytest.approx(total_quality, rel=1e-9)
    with sqlite3.connect(server["ledger"]) as db:
        rows = db.execute("SELECT generation_id, COUNT(*) FROM generations WHERE tenant_id = ? GROUP BY generation_id",
                          (TENANT,)).fetchall()
        credits = db.execute("SELECT COUNT(*) FROM credits JOIN generations USING (tenant_id, generation_id) "
                             "WHERE tenant_id = ?", (TENANT,)).fetchone()[0]
    assert sorted(gid for gid, _ in rows) == sorted(recorded) and all(count == 1 for _, count in rows)
    assert credits == 10 * len(recorded)

    # Resending some of the same generations replays their records: nothing is recorded twice.
    again = tmp_path / "again"
    again.mkdir()
    resent = kinds["good"][:20] + kinds["flat"] + kinds["bad"][:1]
    for path in folder.iterdir():
        if path.stem in resent:
            shutil.copy(path, again / path.name)
    replay = run_node(node, server["target"], "--tenant", TENANT, str(again))
    assert replay["returncode"] == 0 and replay["results"] == len(resent) and replay["errors"] == {"INVALID_ARGUMENT": 1}
    for result in replay["generations"]:
        if result["error"] is None:
            assert result["ledger"] == "LEDGER_STATE_REPLAYED"
            assert result["quality"] == results[result["generation_id"]]["quality"]
    with GMVClient(server["target"]) as client:
        assert client.valuation(tenant_id=TENANT).generations == len(recorded)
