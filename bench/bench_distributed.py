"""Distributed build benchmark: `gmv index build --executor ray` against the local build, on this machine.

Makes N 64x64 PNGs (bench_ingest.make_images: crops of scikit-image's photographs), starts one
embedded Milvus of its own (own data dir, free port, features in a temporary feature store),
and builds the same manifest three ways into new collections:

- local: `gmv_engine.ingest.ingest`, the default build (a thread pool decodes, this process embeds);
- ray, 1 worker: `gmv_engine.distributed.ingest_on_ray` on a ray.cluster_utils.Cluster of a
  head node with no CPU (the driver's) and one worker node of one CPU;
- ray, 2 workers: the same with two worker nodes of one CPU each.

Per run: seconds until the rows are in (before the index build: read, hash, decode, check,
embed, insert), of which the distributed build's scan (create, scan, plan), rows/s before the
build, the overhead per row against the local build (ms), and seconds end to end (with the
IVF_PQ build and the calibration, which are the same code in both). Every run must insert the
same N rows.

On a 2-core machine the driver, Milvus and the Ray workers share the same two cores, so this
measures what Ray adds per row (scheduling, serialisation, the second read), not how a cluster
scales; docs/SCALE.md ("Distributed build") says what follows for 10M-1B images.

    .venv/bin/python bench/bench_distributed.py [--rows 10000] [--profile offline] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_ingest import SIDE, make_images  # the same images as the ingest benchmark


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


def build(kind: str, workers: int, index, manifest: Path, rows: int, components, batch_size: int) -> dict:
    from gmv_engine.ingest import ingest, read_manifest
    from gmv_engine.milvus.index import CollectionInfo

    encoder, reranker, profile = components
    info = CollectionInfo(profile, encoder.name, encoder.dim, reranker.name, reranker.feature_dim)
    source = read_manifest(manifest)[:rows]
    name = f"bench_{kind}_{workers}"
    start = time.perf_counter()
    if kind == "local":
        report = ingest(index, name, source, info, encoder, reranker, batch_size=batch_size, progress=False)
    else:
        import ray

        from gmv_engine.distributed import RayOptions, ingest_on_ray

        cluster = start_cluster(workers)
        try:
            ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
            start = time.perf_counter()  # the cluster's start is not the build's
            report = ingest_on_ray(index, name, source, info, encoder, reranker, batch_size=batch_size,
                                   progress=False, options=RayOptions(address=cluster.address))
        finally:
            ray.shutdown()
            cluster.shutdown()
    total = time.perf_counter() - start
    assert report.inserted == rows and not report.bad, (report.summary(), report.bad[:3])
    index.drop(name)
    return {"kind": kind, "workers": workers, "rows": rows, "rows_s": report.seconds["rows"],
            "scan_s": report.seconds.get("scan"), "total_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--profile", default="offline")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", default="ray1,ray2,local", help="comma-separated: local, ray1, ray2")
    parser.add_argument("--images", help="folder for the generated PNGs (default: a temporary folder of its own, reused)")
    args = parser.parse_args()

    from gmv_engine.encoders import create_encoder
    from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port
    from gmv_engine.milvus.index import TrainingIndex
    from gmv_engine.profiles import get_profile
    from gmv_engine.rerankers import create_reranker

    images = Path(args.images) if args.images else Path(tempfile.gettempdir()) / "gmv-bench-distributed"
    manifest = make_images(images, args.rows)
    profile = get_profile(args.profile)
    components = (create_encoder(profile.encoder, "cpu"), create_reranker(profile.reranker, "cpu"), profile.name)
    workdir = Path(tempfile.mkdtemp(prefix="gmv-bench-distributed-"))
    print(f"# GMV distributed build benchmark\n\n{args.rows} PNGs of {SIDE}x{SIDE}; profile `{profile.name}` "
          f"({profile.encoder} + {profile.reranker}); batch {args.batch_size}; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, shared by the driver, Milvus and the Ray nodes\n")
    print("| build | worker nodes | rows | of which scan s | rows in s | rows/s before the build "
          "| overhead per row vs local, ms | end to end s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    try:
        with EmbeddedMilvus(workdir / "milvus", port=free_port()) as milvus:
            index = TrainingIndex(milvus.uri, timeout_s=120.0, feature_store=str(workdir / "features"))
            results = []
            for run in args.runs.split(","):
                kind, workers = ("local", 0) if run == "local" else ("ray", int(run[3:]))
                results.append(build(kind, workers, index, manifest, args.rows, components, args.batch_size))
                print(f"<!-- {results[-1]} -->", file=sys.stderr, flush=True)
            local = next((r for r in results if r["kind"] == "local"), None)
            for r in results:
                overhead = (f"{1000 * (r['rows_s'] - local['rows_s']) / r['rows']:.2f}"
                            if local and r["kind"] != "local" else "-")
                scan = "-" if r["scan_s"] is None else f"{r['scan_s']:.1f}"
                print(f"| {r['kind']} | {r['workers'] or '-'} | {r['rows']} | {scan} | {r['rows_s']:.1f} | "
                      f"{r['rows'] / r['rows_s']:.0f} | {overhead} | {r['total_s']:.1f} |", flush=True)
            index.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
