"""Scale benchmark: GMV's own index code on the embedded Milvus at growing row counts, faiss
beside it, and `gmv serve` at 100k real images with cold and warm caches.

    .venv/bin/python bench/bench_scale.py engine [--sizes 10000,100000,1000000] [--dim 768]
    .venv/bin/python bench/bench_scale.py served [--rows 100000] [--stores files,milvus] [--clients 32]

`engine`: synthetic vectors with the structure of image embeddings (a mixture of 1,000
anisotropic clusters, `--dim` recall dimensions; 3,072 float re-rank features per row, the
offline profile's), written through TrainingIndex (create, insert, finish: the calls
`gmv index build` makes) into a fresh embedded Milvus per size, with the re-rank features in
the feature store. Per size: insert rate, the IVF_PQ build (finish() until the built index
serves), Milvus' resident memory and the feature store's bytes on disk, recall (the exact
top-10 of 200 queries inside IVF_PQ's top K' = 100) across nprobe, search p50/p99 for nq=1
and nq=32, feature-fetch latency for 100 candidates (feature store; `--milvus-features` adds
a Milvus NAME__rerank collection to compare, at the cost of its memory). faiss'
IndexIVFPQ with the same nlist, m and nbits runs beside it on the same vectors: the
reference the paper used.

`served`: `--rows` real 64x64 PNGs (bench_ingest.make_images) ingested with the offline
profile by `gmv_engine.ingest` (features in the feature store, or with `--stores milvus` in
Milvus as before the store), then a fresh `gmv serve` driven by `--clients` client threads
through the Python SDK with held-out crops it has never seen: first with a cold cache (a
new server, and the kernel's page cache dropped where this process may: root), then warm (the
same images again, new generation ids). Every request is recorded in the server's ledger.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

K_PRIME, QUERIES, FEATURE_DIM = 100, 200, 3072
NPROBES = (1, 4, 8, 16, 32, 64)


# -- helpers ---------------------------------------------------------------------------------
def milvus_rss_mb(server) -> float:
    """Resident memory of the embedded Milvus' process tree."""
    import psutil

    try:
        root = psutil.Process(server._proc.pid)
    except (psutil.NoSuchProcess, AttributeError):
        return float("nan")
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total / 2**20


def percentiles(seconds: list[float]) -> tuple[float, float]:
    return 1000 * statistics.median(seconds), 1000 * float(np.percentile(seconds, 99))


def drop_page_cache() -> bool:
    """Drop the kernel's clean page cache (root only): a cold feature store is read from disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def synthetic(rows: int, dim: int, seed: int) -> np.ndarray:
    """Clustered vectors: 1,000 centres, each cluster stretched along its own few directions
    (image embeddings are neither uniform nor isotropic)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, dim)).astype(np.float32)
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, 50_000):
        n = min(50_000, rows - start)
        which = rng.integers(0, 1000, n)
        spread = rng.normal(size=(n, 8)).astype(np.float32) @ rng.normal(size=(8, dim)).astype(np.float32) * 0.15
        out[start:start + n] = centres[which] + spread + 0.25 * rng.normal(size=(n, dim)).astype(np.float32)
    return out


# -- engine ----------------------------------------------------------------------------------
def engine(args) -> None:
    import faiss

    from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port
    from gmv_engine.milvus.index import CollectionInfo, IndexParams, TrainingIndex, TrainingRow

    print(f"# GMV scale benchmark: engine\n\n{platform.machine()}, {os.cpu_count()} CPUs; recall dim {args.dim}; "
          f"re-rank features {FEATURE_DIM} floats; {QUERIES} queries; K' = {K_PRIME}\n")
    results = []
    for rows in [int(n) for n in args.sizes.split(",")]:
        workdir = Path(tempfile.mkdtemp(prefix=f"gmv-scale-{rows}-", dir=args.workdir))
        vectors = synthetic(rows + QUERIES, args.dim, seed=rows)
        queries, vectors = vectors[-QUERIES:], vectors[:-QUERIES]
        features_rng = np.random.default_rng(1)
        params = IndexParams().resolve(rows, args.dim)
        result = {"rows": rows, "nlist": params.nlist, "m": params.m, "nbits": params.nbits}
        try:
            with EmbeddedMilvus(workdir / "milvus", port=free_port()) as milvus:
                index = TrainingIndex(milvus.uri, timeout_s=600.0, feature_store=str(workdir / "features"))
                info = CollectionInfo("bench", "synthetic", args.dim, "l2", FEATURE_DIM)
                index.create("scale", info, params, rows, load_new=False)
                baseline_mb = milvus_rss_mb(milvus)
                start = time.perf_counter()
                batch = 8192
                for first in range(0, rows, batch):
                    n = min(batch, rows - first)
                    batch_rows = [TrainingRow(f"t{first + i}", f"c{(first + i) % 1000}", f"{first + i:064x}")
                                  for i in range(n)]
                    index.insert("scale", batch_rows, vectors[first:first + n],
                                 features_rng.random((n, FEATURE_DIM), dtype=np.float32))
                result["insert_rows_s"] = rows / (time.perf_counter() - start)
                start = time.perf_counter()
                index.finish("scale", timeout_s=7200)
                result["build_s"] = time.perf_counter() - start
                result["milvus_mb"] = milvus_rss_mb(milvus) - baseline_mb
                result["store_mb"] = index.feature_store.nbytes(index.info("scale").feature_store) / 2**20
                pks = np.array([row.pk for row in (TrainingRow(f"t{i}", "", "") for i in range(rows))])
                exact = exact_top10(vectors, queries)
                result["recall"], result["search"] = {}, {}
                for nprobe in NPROBES:
                    found = index.search("scale", queries, limit=K_PRIME, nprobe=nprobe)
                    result["recall"][nprobe] = recall_inside(exact, pks, [[h.pk for h in hits] for hits in found])
                for nq in (1, 32):
                    times = []
                    for i in range(60):
                        chunk = queries[(i * nq) % QUERIES:][:nq]
                        t = time.perf_counter()
                        index.search("scale", chunk, limit=K_PRIME, nprobe=32)
                        times.append(time.perf_counter() - t)
                    result["search"][nq] = percentiles(times[5:])
                rng = np.random.default_rng(2)
                fetch = []
                for _ in range(200):
                    wanted = pks[rng.choice(rows, K_PRIME, replace=False)]
                    t = time.perf_counter()
                    got = index.fetch_features("scale", wanted.tolist())
                    fetch.append(time.perf_counter() - t)
                    assert len(got) == K_PRIME
                result["fetch_store"] = percentiles(fetch[10:])
                if args.milvus_features:
                    result["fetch_milvus"], result["milvus_features_mb"] = milvus_fetch(
                        milvus, rows, pks, features_rng)
                index.close()
            result["faiss"] = faiss_reference(faiss, vectors, queries, exact, params)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    print_engine(results)


def milvus_fetch(milvus, rows: int, pks: np.ndarray, rng) -> tuple[tuple[float, float], float]:
    """The same fetch from a Milvus NAME__rerank collection, as before the feature store."""
    from gmv_engine.milvus.index import CollectionInfo, IndexParams, TrainingIndex, TrainingRow

    index = TrainingIndex(milvus.uri, timeout_s=600.0)  # no store: features in Milvus
    info = CollectionInfo("bench", "synthetic", 8, "l2", FEATURE_DIM)
    index.create("scale_milvus", info, IndexParams(index_type="FLAT"), rows, load_new=False)
    before = milvus_rss_mb(milvus)
    for first in range(0, rows, 4096):
        n = min(4096, rows - first)
        index.insert("scale_milvus", [TrainingRow(f"t{first + i}", "c", f"{i:064x}") for i in range(n)],
                     np.zeros((n, 8), np.float32), rng.random((n, FEATURE_DIM), dtype=np.float32))
    index.finish("scale_milvus", timeout_s=3600)
    grown = milvus_rss_mb(milvus) - before
    pick = np.random.default_rng(2)
    times = []
    for _ in range(60):
        wanted = pks[pick.choice(rows, K_PRIME, replace=False)]
        t = time.perf_counter()
        index.fetch_features("scale_milvus", wanted.tolist())
        times.append(time.perf_counter() - t)
    index.drop("scale_milvus")
    index.close()
    return percentiles(times[5:]), grown


def exact_top10(vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    best = []
    norms = (vectors ** 2).sum(1)
    for q in queries:
        best.append(np.argpartition(norms - 2 * vectors @ q, 10)[:10])
    return np.array(best)


def recall_inside(exact: np.ndarray, pks: np.ndarray, found: list[list[int]]) -> float:
    return float(np.mean([len(set(pks[e].tolist()) & set(f)) / 10 for e, f in zip(exact, found)]))


def faiss_reference(faiss, vectors, queries, exact, params) -> dict:
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    quantizer = faiss.IndexFlatL2(vectors.shape[1])
    ivfpq = faiss.IndexIVFPQ(quantizer, vectors.shape[1], params.nlist, params.m, params.nbits)
    start = time.perf_counter()
    ivfpq.train(vectors[np.random.default_rng(0).choice(len(vectors), min(len(vectors), 256 * params.nlist,
                                                                           max(len(vectors), 1)), replace=False)])
    ivfpq.add(vectors)
    out = {"build_s": time.perf_counter() - start, "recall": {}, "search": {}}
    ids = np.arange(len(vectors))
    for nprobe in NPROBES:
        ivfpq.nprobe = nprobe
        _, found = ivfpq.search(queries, K_PRIME)
        out["recall"][nprobe] = recall_inside(exact, ids, found.tolist())
    ivfpq.nprobe = 32
    for nq in (1, 32):
        times = []
        for i in range(60):
            chunk = queries[(i * nq) % QUERIES:][:nq]
            t = time.perf_counter()
            ivfpq.search(chunk, K_PRIME)
            times.append(time.perf_counter() - t)
        out["search"][nq] = percentiles(times[5:])
    return out


def print_engine(results: list[dict]) -> None:
    print("\n| rows | nlist / m | insert rows/s | build s (faiss s, ratio) | Milvus RSS MB | feature store MB "
          "| search nq=1 p50/p99 ms (faiss p50) | nq=32 p50/p99 ms (faiss p50) | fetch 100 features p50/p99 ms "
          "(Milvus p50) |")
    print("|---:|---|---:|---|---:|---:|---|---|---|")
    for r in results:
        f = r["faiss"]
        milvus = f"{r['fetch_milvus'][0]:.1f}" if "fetch_milvus" in r else "-"
        print(f"| {r['rows']:,} | {r['nlist']} / {r['m']} | {r['insert_rows_s']:,.0f} | {r['build_s']:.0f} "
              f"({f['build_s']:.0f}, {r['build_s'] / f['build_s']:.1f}x) | {r['milvus_mb']:,.0f} | "
              f"{r['store_mb']:,.0f} | {r['search'][1][0]:.1f}/{r['search'][1][1]:.1f} ({f['search'][1][0]:.1f}) | "
              f"{r['search'][32][0]:.1f}/{r['search'][32][1]:.1f} ({f['search'][32][0]:.1f}) | "
              f"{r['fetch_store'][0]:.2f}/{r['fetch_store'][1]:.2f} ({milvus}) |")
    print("\nRecall: the exact top-10 inside the top K' = 100, Milvus IVF_PQ / faiss IVFPQ\n")
    print("| rows | " + " | ".join(f"nprobe {n}" for n in NPROBES) + " |")
    print("|---:|" + "---|" * len(NPROBES))
    for r in results:
        print(f"| {r['rows']:,} | " + " | ".join(
            f"{r['recall'][n]:.3f} / {r['faiss']['recall'][n]:.3f}" for n in NPROBES) + " |")


def plot(args) -> None:
    """The curves of docs/SCALE.md, from `engine --json` results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(args.json).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r["rows"] for r in results]

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        line = ax.plot(NPROBES, [r["recall"][str(n)] for n in NPROBES], marker="o", label=f"Milvus {r['rows']:,}")
        ax.plot(NPROBES, [r["faiss"]["recall"][str(n)] for n in NPROBES], linestyle="--",
                color=line[0].get_color(), label=f"faiss {r['rows']:,}")
    ax.set(xscale="log", xlabel="nprobe", ylabel="exact top-10 inside top K'=100", title="IVF_PQ recall")
    ax.set_xticks(NPROBES, [str(n) for n in NPROBES])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "recall.png", dpi=110)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(rows, [r["build_s"] for r in results], marker="o", label="Milvus (finish(): built and served)")
    axes[0].plot(rows, [r["faiss"]["build_s"] for r in results], marker="o", linestyle="--", label="faiss train+add")
    axes[0].set(title="IVF_PQ build, s", xlabel="rows")
    for nq in ("1", "32"):
        axes[1].plot(rows, [r["search"][nq][0] for r in results], marker="o", label=f"Milvus nq={nq} p50")
        axes[1].plot(rows, [r["faiss"]["search"][nq][0] for r in results], marker="o", linestyle="--",
                     label=f"faiss nq={nq} p50")
    axes[1].set(title="search at nprobe 32, ms", xlabel="rows", yscale="log")
    axes[2].plot(rows, [r["fetch_store"][0] for r in results], marker="o", label="feature store p50")
    if all("fetch_milvus" in r for r in results):
        axes[2].plot(rows, [r["fetch_milvus"][0] for r in results], marker="o", linestyle="--",
                     label="Milvus collection p50")
    axes[2].set(title="fetch 100 re-rank features, ms", xlabel="rows", yscale="log")
    for ax in axes:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    print(f"wrote {out / 'recall.png'} and {out / 'curves.png'}")


# -- served ----------------------------------------------------------------------------------
def served(args) -> None:
    from bench_ingest import make_images
    from gmv_client import GMVClient
    from gmv_engine.encoders import create_encoder
    from gmv_engine.ingest import ingest, read_manifest
    from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port
    from gmv_engine.milvus.index import CollectionInfo, TrainingIndex
    from gmv_engine.profiles import get_profile
    from gmv_engine.rerankers import create_reranker

    images = Path(args.images)
    manifest = make_images(images, args.rows + args.queries)
    everything = read_manifest(manifest)
    source, held_out = everything[:args.rows], everything[-args.queries:]
    queries = [(row.training_id, row.path.read_bytes()) for row in held_out]
    profile = get_profile("offline")
    encoder, reranker = create_encoder(profile.encoder, "cpu"), create_reranker(profile.reranker, "cpu")
    info = CollectionInfo(profile.name, encoder.name, encoder.dim, reranker.name, reranker.feature_dim)
    print(f"# GMV scale benchmark: served\n\n{args.rows:,} training PNGs, offline profile; {platform.machine()}, "
          f"{os.cpu_count()} CPUs; {args.queries} held-out queries per pass; clients on the same machine\n")
    print("| features in | clients | cache | p50 ms | p99 ms | generations/s |")
    print("|---|---:|---|---:|---:|---:|")
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="gmv-scale-served-", dir=args.workdir))
    try:
        with EmbeddedMilvus(workdir / "milvus", port=free_port()) as milvus:
            for store in args.stores.split(","):
                feature_store = str(workdir / "features") if store == "files" else None
                index = TrainingIndex(milvus.uri, timeout_s=600.0, feature_store=feature_store)
                name = f"scale_{store}"
                start = time.perf_counter()
                report = ingest(index, name, source, info, encoder, reranker, progress=False)
                print(f"<!-- {store}: {report.inserted} rows ingested ({report.already_present} there already) in "
                      f"{time.perf_counter() - start:.0f} s -->", flush=True)
                index.close()
                for clients in [int(c) for c in args.clients.split(",")]:
                    dropped = drop_page_cache()
                    port = free_port()
                    command = [sys.executable, "-m", "gmv_server.cli", "serve", "--collection", name, "--port",
                               str(port), "--milvus-uri", milvus.uri, "--device", "cpu", "--host", "127.0.0.1",
                               "--data-dir", str(workdir / f"serve-{store}-{clients}"), "--max-batch-size", "32"]
                    if feature_store:
                        command += ["--feature-store", feature_store]
                    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    try:
                        target = f"127.0.0.1:{port}"
                        with GMVClient(target) as client:
                            client.wait_until_ready(timeout_s=300)
                        for cache in ("cold" + ("" if dropped else " (page cache kept: not root)"), "warm"):
                            p50, p99, rate = drive(target, queries, clients)
                            print(f"| {store} | {clients} | {cache} | {p50:.0f} | {p99:.0f} | {rate:.1f} |",
                                  flush=True)
                    finally:
                        server.terminate()
                        server.wait(timeout=60)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def drive(target: str, queries: list[tuple[str, bytes]], clients: int) -> tuple[float, float, float]:
    from gmv_client import GMVClient

    def work(worker: int) -> list[float]:
        latencies = []
        with GMVClient(target, timeout_s=300) as client:
            for _, data in queries[worker::clients]:
                t = time.perf_counter()
                client.attribute(data, uuid.uuid4().hex)
                latencies.append(time.perf_counter() - t)
        return latencies

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [lat for worker in pool.map(work, range(clients)) for lat in worker]
    wall = time.perf_counter() - start
    p50, p99 = percentiles(latencies)
    return p50, p99, len(latencies) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    e = commands.add_parser("engine")
    e.add_argument("--sizes", default="10000,100000")
    e.add_argument("--dim", type=int, default=768)
    e.add_argument("--milvus-features", action="store_true", help="also time fetching from a Milvus collection")
    e.add_argument("--workdir", default=None)
    e.add_argument("--json", help="also write the results here (for `plot`)")
    p = commands.add_parser("plot", help="draw docs/scale/*.png from an `engine --json` file")
    p.add_argument("json")
    p.add_argument("--out", default=str(Path(__file__).parent.parent / "docs" / "scale"))
    s = commands.add_parser("served")
    s.add_argument("--rows", type=int, default=100_000)
    s.add_argument("--queries", type=int, default=640)
    s.add_argument("--stores", default="files", help="files (the feature store), milvus (NAME__rerank), or both")
    s.add_argument("--clients", default="32")
    s.add_argument("--images", default=str(Path(tempfile.gettempdir()) / "gmv-bench-ingest"))
    s.add_argument("--workdir", default=None)
    s.add_argument("--keep", help="a folder kept after the run (Milvus, features): a second run with the same "
                                  "folder serves what the first built (ingest finds every row there already)")
    args = parser.parse_args()
    {"engine": engine, "served": served, "plot": plot}[args.command](args)


if __name__ == "__main__":
    main()
