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

With --compare the collections are kept and each is compared with the first run's: rows,
recall vectors, re-rank features, and the top-10 credits of 100 held-out images, both through
`Attributor` in this process and through a real `gmv serve` subprocess per collection (on this
Milvus, with the feature store the collections were built with and a ledger of its own),
queried through the Python SDK (`gmv_client.GMVClient`, record=False).

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


def build(kind: str, workers: int, index, manifest: Path, rows: int, components, batch_size: int,
          keep: bool = False) -> dict:
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
    if not keep:
        index.drop(name)
    return {"kind": kind, "workers": workers, "rows": rows, "rows_s": report.seconds["rows"],
            "scan_s": report.seconds.get("scan"), "total_s": total, "name": name, "report": report}


def served_top10(milvus_uri: str, feature_store: str, collection: str, queries: list[bytes]) -> list[list[tuple]]:
    """The top-10 credits of `queries` (image bytes) through a `gmv serve` subprocess serving
    `collection` on `milvus_uri` (gmv eval's own launcher), asked through the Python SDK: per
    query, its credits as (training_id, contributor_id, credit) in rank order."""
    from gmv_eval.command import served

    ledger = Path(tempfile.mkdtemp(prefix="gmv-bench-distributed-ledger-"))
    try:
        with served(milvus_uri, collection, "", {}, "cpu", ledger, ledger / "serve.log",
                    feature_store=feature_store) as client:
            return [[(c.training_id, c.contributor_id, c.credit) for c in
                     client.attribute(data, f"compare-{i}", top_k=10, record=False).credits]
                    for i, data in enumerate(queries)]
    finally:
        shutil.rmtree(ledger, ignore_errors=True)


def compare_served(milvus_uri: str, feature_store: str, ours: str, theirs: str, queries: list[bytes],
                   served: dict) -> str:
    """The top-10 credits of `queries` through `gmv serve` for each collection (served: a cache
    of served_top10 by collection): ids, contributors and ranks identical, credits within 1e-9."""
    for name in (ours, theirs):
        if name not in served:
            served[name] = served_top10(milvus_uri, feature_store, name, queries)
    same_top = same_credit = both = 0
    for x, y in zip(served[ours], served[theirs]):
        top = [c[:2] for c in x] == [c[:2] for c in y]
        credit = len(x) == len(y) and all(abs(a[2] - b[2]) <= 1e-9 for a, b in zip(x, y))
        same_top, same_credit, both = same_top + top, same_credit + credit, both + (top and credit)
    sizes = sorted({len(x) for x in served[ours]} | {len(y) for y in served[theirs]})
    return (f"{ours} vs {theirs} through gmv serve (one subprocess per collection, Python SDK): top-10 "
            f"(ids and contributors, in rank order) identical for {same_top} of {len(queries)} queries, credits "
            f"equal within 1e-9 for {same_credit}, both for **{both} of {len(queries)}** (credits per query: {sizes})")


def compare(index, ours: str, theirs: str, queries: list) -> str:
    """Whether two builds of the same images made the same collection: rows, recall vectors,
    re-rank features, and the top-10 credits of `queries` (PIL images) through Attributor."""
    import numpy as np

    from gmv_engine.pipeline import Attributor
    from gmv_engine.settings import Settings

    def rows(name):
        found = index.client.query(name, filter="", output_fields=["training_id", "contributor_id", "content_hash",
                                                                   "metadata"], limit=16384, consistency_level="Strong")
        return {row["training_id"]: (row["contributor_id"], row["content_hash"], row["metadata"]) for row in found}

    a, b = rows(ours), rows(theirs)
    vectors_a, vectors_b = index.sample_rows(ours, 16384), index.sample_rows(theirs, 16384)
    vector_diff = max(float(np.abs(vectors_a[pk] - vectors_b[pk]).max()) for pk in vectors_a)
    features_a, features_b = index.fetch_features(ours, vectors_a), index.fetch_features(theirs, vectors_a)
    features_same = features_a.keys() == features_b.keys() and all(
        np.array_equal(features_a[pk], features_b[pk]) for pk in features_a)
    same_top = same_credit = 0
    for x, y in zip(Attributor(index, ours, Settings()).attribute(queries, top_k=10),
                    Attributor(index, theirs, Settings()).attribute(queries, top_k=10)):
        same_top += [(c.training_id, c.contributor_id) for c in x.credits] == \
            [(c.training_id, c.contributor_id) for c in y.credits]
        same_credit += np.allclose([c.credit for c in x.credits], [c.credit for c in y.credits], rtol=1e-5)
    return (f"{ours} vs {theirs}: rows {len(a)} / {len(b)}, identical rows (id, contributor, hash, metadata): "
            f"{a == b}; recall vectors {len(vectors_a)} / {len(vectors_b)}, largest difference {vector_diff:.2e}; "
            f"re-rank features identical: {features_same}; top-10 (ids and contributors) identical for {same_top} of "
            f"{len(queries)} queries, credits equal within 1e-5 for {same_credit}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--profile", default="offline")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", default="ray1,ray2,local", help="comma-separated: local, ray1, ray2")
    parser.add_argument("--compare", action="store_true",
                        help="keep the collections and compare each with the first run's: rows, vectors, features, "
                             "top-10 credits of 100 held-out images")
    parser.add_argument("--images", help="folder for the generated PNGs (default: a temporary folder of its own, reused)")
    args = parser.parse_args()

    from gmv_engine.encoders import create_encoder
    from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port
    from gmv_engine.milvus.index import TrainingIndex
    from gmv_engine.profiles import get_profile
    from gmv_engine.rerankers import create_reranker

    images = Path(args.images) if args.images else Path(tempfile.gettempdir()) / "gmv-bench-distributed"
    manifest = make_images(images, args.rows + 100)  # 100 more: held-out queries for --compare
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
                results.append(build(kind, workers, index, manifest, args.rows, components, args.batch_size,
                                     keep=args.compare))
                shown = {k: v for k, v in results[-1].items() if k != "report"}
                print(f"<!-- {shown} -->", file=sys.stderr, flush=True)
            if args.compare:
                from gmv_engine.decode import load_image_file
                from gmv_engine.ingest import read_manifest

                held_out = read_manifest(manifest)[args.rows:args.rows + 100]
                queries = [load_image_file(row.path)[0] for row in held_out]
                query_bytes = [Path(row.path).read_bytes() for row in held_out]
                names = [r["name"] for r in results]
                served: dict = {}
                for other in names[1:]:
                    print(compare(index, other, names[0], queries), flush=True)
                    print(compare_served(milvus.uri, index.feature_store.uri, other, names[0], query_bytes, served),
                          flush=True)
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
