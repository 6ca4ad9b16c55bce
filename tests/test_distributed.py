"""The distributed build (`gmv index build --executor ray`) on a real local Ray cluster of a head
and two worker nodes (ray.cluster_utils.Cluster, one CPU each) and the session's embedded
Milvus: the same collection as the local build, a worker node killed mid-build, a driver
killed mid-build and run again, and a clear exit 2 without the `distributed` extra.

The Ray tests skip, saying why, where Ray is not installed; `make test` installs the extra.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import GMV, make_info, write_csv

from gmv_engine.ingest import ingest, read_manifest
from gmv_engine.milvus.index import IndexParams

ROWS = 300  # digits in the training set of these tests
BATCH = 8
HEADER = ["path", "training_id", "contributor_id", "label"]


def ray_or_skip():
    try:
        import ray
        import ray.cluster_utils
        import ray.data
    except ImportError as exc:
        pytest.skip(f"Ray is not installed ({exc}): pip install -e '.[distributed]' (make test installs it)")
    return ray


def retried(start, tries: int = 3):
    """start() again when Ray times out starting a node: it gives a new raylet a fixed 30 s to
    register with the GCS, which a machine loaded by other work can miss."""
    for attempt in range(tries):
        try:
            return start()
        except Exception:  # Ray raises a bare Exception for the timeout
            if attempt == tries - 1:
                raise


def start_cluster(workers: int, **head):
    """A ray.cluster_utils.Cluster: a head node with no CPU (the driver's) and `workers` nodes of one CPU."""
    from ray.cluster_utils import Cluster

    cluster = retried(lambda: Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                           **head}))
    try:
        cluster.workers = [retried(lambda: cluster.add_node(num_cpus=1)) for _ in range(workers)]
        cluster.wait_for_nodes()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node with no CPU (the driver's) and two worker nodes of one CPU each; this test
    process is connected as a driver. Dead nodes are noticed after ~5 s of missed checks."""
    ray = ray_or_skip()
    cluster = start_cluster(2, _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 5})
    try:
        ray.init(address=cluster.address, logging_level="WARNING")
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def training_set(digits, tmp_path_factory):
    """ROWS digits plus the rows a build must refuse or skip: a missing file, a corrupt one, a
    training_id again with other content, an empty contributor and the same bytes under a new id."""
    folder = tmp_path_factory.mktemp("distributed")
    rows = read_manifest(digits.manifest)[:ROWS]
    (folder / "images").mkdir()
    for row in rows:
        shutil.copy(row.path, folder / "images" / f"{row.training_id}.png")
    (folder / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = [[f"images/{r.training_id}.png", r.training_id, r.contributor_id, r.metadata["label"]] for r in rows]
    odd = [["images/absent.png", "missing-file", "c1", 0],
           ["images/corrupt.png", "corrupt-file", "c1", 0],
           [good[1][0], good[0][1], "c1", 0],
           [good[2][0], "no-contributor", "", 0],
           [good[3][0], "same-bytes-new-id", "someone", 0]]
    lines = good[:100] + odd + good[100:]
    return write_csv(folder / "train.csv", HEADER, lines), lines


@pytest.fixture(scope="module")
def local_build(index, training_set, offline_components):
    """The reference: the local build of the training set."""
    encoder, reranker = offline_components
    name = f"dist_local_{uuid.uuid4().hex[:8]}"
    report = ingest(index, name, read_manifest(training_set[0]), make_info(encoder, reranker), encoder, reranker,
                    IndexParams(nlist=8), batch_size=BATCH, progress=False)
    return name, report


def build_on_ray(index, name, manifest, components, **options):
    from gmv_engine.distributed import RayOptions, ingest_on_ray, read_source

    encoder, reranker = components
    return ingest_on_ray(index, name, read_source(manifest), make_info(encoder, reranker), encoder, reranker,
                         IndexParams(nlist=8), batch_size=BATCH, progress=False, options=RayOptions(**options))


def stored_rows(index, name) -> dict[str, tuple]:
    """training_id -> (contributor_id, content_hash, metadata) of every row, asserting each once."""
    rows = index.client.query(name, filter="", output_fields=["training_id", "contributor_id", "content_hash",
                                                              "metadata"], limit=16384, consistency_level="Strong")
    ids = [row["training_id"] for row in rows]
    assert len(ids) == len(set(ids)), "a training_id is in the collection more than once"
    return {row["training_id"]: (row["contributor_id"], row["content_hash"], row["metadata"]) for row in rows}


def expected_ids(lines) -> set[str]:
    return {line[1] for line in lines if not line[1].endswith(("-file", "-new-id")) and line[1] != "no-contributor"}


def test_without_the_extra_ray_exits_2_naming_it(tmp_path):
    """With Ray not importable (sys.modules["ray"] = None makes `import ray` fail as if it were
    not installed), --executor ray exits 2 before anything slow and says which extra to install."""
    manifest = write_csv(tmp_path / "m.csv", HEADER, [["a.png", "a", "c", 0]])
    code = ("import sys; sys.modules['ray'] = None; from gmv_server.cli import main; "
            f"sys.exit(main(['index', 'build', '--executor', 'ray', '--manifest', {str(manifest)!r}, "
            "'--collection', 'never_made', '--milvus-uri', 'http://127.0.0.1:1']))")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "[distributed]" in done.stderr and "--executor ray" in done.stderr
    assert time.monotonic() - started < 60


def test_parquet_and_uri_manifests_give_the_local_rows(training_set, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gmv_engine.decode import load_image_file
    from gmv_engine.distributed import read_image, read_source

    manifest, lines = training_set
    local = read_manifest(manifest)
    # A CSV named by URI is read through pyarrow's filesystem; its image paths stay URIs.
    by_uri = read_source(manifest.as_uri())
    assert [(r.line, r.training_id, r.contributor_id, r.metadata) for r in by_uri] == \
        [(r.line, r.training_id, r.contributor_id, r.metadata) for r in local]
    assert by_uri[0].path == (manifest.parent / lines[0][0]).as_uri()
    image, data = read_image(by_uri[0].path)
    assert data == load_image_file(local[0].path)[1] and image.size == load_image_file(local[0].path)[0].size
    # Parquet: the same rows, reported as "row N"; relative paths against the manifest's folder.
    table = pa.table({name: [str(line[i]) for line in lines] for i, name in enumerate(HEADER)})
    pq.write_table(table, manifest.parent / "train.parquet")
    parquet = read_source(manifest.parent / "train.parquet")
    assert [(r.training_id, r.contributor_id, r.metadata, r.path) for r in parquet] == \
        [(r.training_id, r.contributor_id, r.metadata, r.path) for r in local]
    assert parquet[0].where == "row 1"
    from gmv_engine.errors import ManifestError

    pq.write_table(pa.table({"path": ["a.png"]}), tmp_path / "bad.parquet")
    with pytest.raises(ManifestError, match="contributor_id"):
        read_source(tmp_path / "bad.parquet")
    with pytest.raises(ManifestError, match="cannot read"):
        read_source((tmp_path / "absent.parquet").as_uri())


@pytest.mark.e2e
def test_distributed_build_gives_the_local_collection(index, ray_cluster, training_set, local_build,
                                                      offline_components, digits):
    """Same rows, hashes, contributors, metadata, recall vectors, re-rank features, report and
    top-10 credits. The manifest is named by a file:// URI, so the workers read every image
    through pyarrow's filesystem, as they would from s3:// or gs://."""
    from gmv_engine.datasets import read_heldout
    from gmv_engine.decode import load_image_file
    from gmv_engine.pipeline import Attributor
    from gmv_engine.settings import Settings

    manifest, lines = training_set
    local_name, local = local_build
    name = f"dist_ray_{uuid.uuid4().hex[:8]}"
    report = build_on_ray(index, name, manifest.as_uri(), offline_components)
    assert (report.rows, report.inserted, report.already_present, report.duplicates) == \
        (local.rows, local.inserted, local.already_present, local.duplicates) == (len(lines), ROWS, 0, 1)
    assert [(b.where, b.training_id, b.reason.replace(manifest.parent.as_uri(), str(manifest.parent)))
            for b in report.bad] == [(b.where, b.training_id, b.reason) for b in local.bad]
    assert [b.where for b in report.bad] == ["line 102", "line 103", "line 104", "line 105"]
    assert report.per_contributor == local.per_contributor
    assert report.calibration == local.calibration and report.summary() == local.summary()
    assert report.index_state["total_rows"] == ROWS

    rows = stored_rows(index, name)
    assert rows == stored_rows(index, local_name) and set(rows) == expected_ids(lines)
    vectors, reference = index.sample_rows(name, 10_000), index.sample_rows(local_name, 10_000)
    assert vectors.keys() == reference.keys() and len(vectors) == ROWS
    for pk, vector in vectors.items():
        np.testing.assert_allclose(vector, reference[pk], rtol=1e-6, atol=1e-7)
    features, reference = index.fetch_features(name, vectors), index.fetch_features(local_name, vectors)
    assert features.keys() == reference.keys() and len(features) == ROWS
    for pk, feature in features.items():
        np.testing.assert_array_equal(feature, reference[pk])

    queries = [load_image_file(path)[0] for path, _, _ in read_heldout(digits.heldout)[:100]]
    for ours, theirs in zip(Attributor(index, name, Settings()).attribute(queries, top_k=10),
                            Attributor(index, local_name, Settings()).attribute(queries, top_k=10)):
        assert [(c.rank, c.training_id, c.contributor_id) for c in ours.credits] == \
            [(c.rank, c.training_id, c.contributor_id) for c in theirs.credits]
        assert [c.credit for c in ours.credits] == pytest.approx([c.credit for c in theirs.credits], rel=1e-5)
    index.drop(name)


@pytest.mark.e2e
def test_driver_killed_mid_build_then_run_again_inserts_only_the_missing_rows(index, milvus, ray_cluster,
                                                                              training_set, local_build, tmp_path):
    """`gmv index build --executor ray --ray-address ...` in a process of its own, killed with
    SIGKILL once it has committed some rows (inserts here are ~10 rows a call, not ~16 MB, so
    there are many), then run again: the second run finds the first run's rows, embeds and
    inserts only the others, and the collection ends with every row exactly once."""
    manifest, lines = training_set
    name = f"dist_resume_{uuid.uuid4().hex[:8]}"
    args = ["index", "build", "--executor", "ray", "--ray-address", ray_cluster.address, "--manifest", str(manifest),
            "--collection", name, "--milvus-uri", milvus.uri, "--data-dir", str(tmp_path), "--profile", "offline",
            "--batch-size", str(BATCH), "--nlist", "8"]
    small_inserts = ("import sys; import gmv_engine.ingest as ingest; ingest.INSERT_BYTES = 256 << 10; "
                     "from gmv_server.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen([sys.executable, "-c", small_inserts, *args], stderr=subprocess.PIPE, text=True,
                              env=env, start_new_session=True)
    inserted, seen = 0, []
    try:
        deadline = time.monotonic() + 240
        buffer = ""
        while time.monotonic() < deadline and inserted < 40:
            chunk = driver.stderr.read(1) if driver.poll() is None else driver.stderr.read()
            if not chunk:
                break
            buffer += chunk
            if chunk in "\r\n]":
                seen.append(buffer)
                found = re.findall(r"inserted=(\d+)", buffer)
                inserted = int(found[-1]) if found else inserted
                buffer = ""
        assert driver.poll() is None, "".join(seen)[-3000:]
        assert inserted >= 40, "".join(seen)[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
    assert inserted < ROWS  # killed mid-build

    again = subprocess.run([*GMV, *args, "--no-progress"], check=False, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 1, again.stderr  # 1: the bad rows of the manifest
    summary = re.search(r"(\d+) rows: (\d+) inserted, (\d+) already present, (\d+) duplicate", again.stdout)
    assert summary, again.stdout
    rows, inserted_again, present, duplicates = map(int, summary.groups())
    assert rows == len(lines) and duplicates == 1
    assert present >= inserted and inserted_again + present == ROWS and inserted_again < ROWS
    assert set(stored_rows(index, name)) == expected_ids(lines)
    assert stored_rows(index, name) == stored_rows(index, local_build[0])
    index.drop(name)


@pytest.mark.e2e
def test_worker_node_killed_mid_build_still_gives_every_row_once(index, ray_cluster, training_set, local_build,
                                                               offline_components, tmp_path):
    """A worker node is killed (no graceful exit) once the embed stage has started: Ray retries
    its tasks and restarts its actor on the other node; the driver keeps each row once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest, lines = training_set
    table = pa.table({column: [str(line[i]) for line in lines] for i, column in enumerate(HEADER)})
    pq.write_table(table, manifest.parent / "kill.parquet")  # and the Parquet path, for once
    name = f"dist_kill_{uuid.uuid4().hex[:8]}"
    embedding = threading.Event()

    class Started(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("embedding"):
                embedding.set()

    handler, logger = Started(), logging.getLogger("gmv_engine.distributed")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    result: dict = {}

    def run():
        try:
            result["report"] = build_on_ray(index, name, manifest.parent / "kill.parquet", offline_components)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    try:
        thread.start()
        assert embedding.wait(timeout=240), result
        time.sleep(0.5)
        assert thread.is_alive()  # the build is under way
        victim = ray_cluster.workers[1]
        ray_cluster.remove_node(victim, allow_graceful=False)
        thread.join(timeout=600)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    report = result["report"]
    local = local_build[1]
    assert (report.inserted, report.duplicates, len(report.bad)) == (local.inserted, local.duplicates, len(local.bad))
    assert [b.where for b in report.bad] == ["row 101", "row 102", "row 103", "row 104"]
    assert stored_rows(index, name) == stored_rows(index, local_build[0])
    assert index.count(name) == ROWS
    index.drop(name)
    ray_cluster.workers[1] = retried(lambda: ray_cluster.add_node(num_cpus=1))  # whole again for whoever comes next


def test_the_rayjob_runs_a_build_gmv_accepts_on_an_image_with_the_extra():
    """deploy/ray/rayjob.yaml: a KubeRay RayJob whose entrypoint is a `gmv index build
    --executor ray` this CLI parses, on a head that does no work, with GPU workers."""
    import shlex

    import yaml
    from gmv_server.cli import build_parser

    from gmv_engine.settings import Settings

    root = Path(__file__).resolve().parent.parent
    text = (root / "deploy" / "ray" / "rayjob.yaml").read_text()
    job = yaml.safe_load(text)
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "gmv"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.index_command, args.executor, args.ray_address) == ("index", "build", "ray", "auto")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    assert {name.removeprefix("GMV_").lower() for name in env} <= set(Settings.__dataclass_fields__)
    dockerfile = (root / "deploy" / "Dockerfile").read_text()
    assert "EXTRAS=distributed" in text and 'ARG EXTRAS=""' in dockerfile and "${EXTRAS:+[$EXTRAS]}" in dockerfile
