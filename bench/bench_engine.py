"""Engine benchmark: ingest rate, per-stage attribution latency, and IVF_PQ recall vs nprobe.

Runs the in-process pipeline on a fresh embedded Milvus over scikit-learn's digits (offline
profile unless --profile says otherwise) and prints Markdown tables for docs/BENCHMARKS.md.

    .venv/bin/python bench/bench_engine.py [--profile offline] [--repeats 20] [--device auto]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from common import digits_on_embedded_milvus


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="offline")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per batch size")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from gmv_engine.settings import Settings
    from gmv_engine.datasets import read_heldout
    from gmv_engine.decode import load_image_file
    from gmv_engine.milvus.index import training_pk
    from gmv_engine.pipeline import STAGES, Attributor

    with digits_on_embedded_milvus(args.profile, args.device, "bench") as bench:
        profile, device, digits, rows = bench.profile, bench.device, bench.digits, bench.rows
        encoder, reranker, index, report = bench.encoder, bench.reranker, bench.index, bench.report
        print(f"# GMV engine benchmark\n\nprofile `{profile.name}` ({profile.description}); device `{device}`; "
              f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs; "
              f"{len(rows)} training digits, 32x32 RGB\n")
        print("## Ingest\n")
        print("| rows | inserted | wall s (embed + insert + flush + index build) | images/s |")
        print("|---:|---:|---:|---:|")
        print(f"| {report.rows} | {report.inserted} | {bench.ingest_seconds:.1f} | {report.inserted / bench.ingest_seconds:.0f} |\n")
        print(f"index: {report.index_state['index_type']} {report.index_state['params']}\n")

        heldout = [load_image_file(path)[0] for path, _, _ in read_heldout(digits.heldout)]
        encoded = [_png(image) for image in heldout]
        for title, cache_bytes in (("no feature cache: every re-rank feature fetched from Milvus", 0),
                                   ("feature cache warm: held-out set attributed once before timing", 256 << 20)):
            attributor = Attributor(index, "bench", Settings(), device=device, encoder=encoder,
                                    reranker=reranker, feature_cache_bytes=cache_bytes)
            attributor.attribute(heldout if cache_bytes else heldout[:8])  # warm-up
            print(f"## Attribution latency, {title}\n")
            print("In-process pipeline, PNG bytes in; stage columns are medians per call.\n")
            print("| batch | " + " | ".join(f"{stage} ms" for stage in STAGES)
                  + " | call p50 ms | call p99 ms | p50 per image ms |")
            print("|---:|" + "---:|" * (len(STAGES) + 3))
            for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
                _latency_row(attributor, encoded, batch_size, args.repeats, STAGES)
            print()

        print("## IVF_PQ recall against exact search (recall embedding, held-out queries)\n")
        train_vectors = encoder.embed([load_image_file(row.path)[0] for row in rows])
        train_pks = np.array([training_pk(row.training_id) for row in rows])
        queries = encoder.embed(heldout)
        exact = np.argsort(((queries[:, None, :] - train_vectors[None, :, :]) ** 2).sum(-1), axis=1)
        nlist = report.index_state["params"]["nlist"]
        print("| nprobe | exact top-10 in IVF_PQ top-100 | exact top-100 in IVF_PQ top-100 | search ms, 180 queries (median of 5) |")
        print("|---:|---:|---:|---:|")
        for nprobe in sorted({1, 4, 8, 16, 32, nlist}):
            timings = []
            for _ in range(5):
                start = time.perf_counter()
                hits = index.search("bench", queries, limit=100, nprobe=nprobe)
                timings.append(time.perf_counter() - start)
            elapsed = statistics.median(timings)
            found = [{h.pk for h in found} for found in hits]
            r10 = np.mean([len(set(train_pks[e[:10]]) & f) / 10 for e, f in zip(exact, found)])
            r100 = np.mean([len(set(train_pks[e[:100]]) & f) / 100 for e, f in zip(exact, found)])
            print(f"| {nprobe} | {r10:.3f} | {r100:.3f} | {1000 * elapsed:.0f} |")


def _latency_row(attributor, encoded, batch_size, repeats, stages) -> None:
    per_stage = {stage: [] for stage in stages}
    calls = []
    for repeat in range(repeats):
        offset = (repeat * batch_size) % (len(encoded) - batch_size)
        before = dict(attributor.times.seconds)
        start = time.perf_counter()
        attributor.attribute_bytes(encoded[offset : offset + batch_size])
        calls.append(time.perf_counter() - start)
        for stage in stages:
            per_stage[stage].append(attributor.times.seconds[stage] - before[stage])
    stage_cells = " | ".join(f"{1000 * statistics.median(per_stage[s]):.2f}" for s in stages)
    p50 = statistics.median(calls)
    print(f"| {batch_size} | {stage_cells} | {1000 * p50:.1f} | {1000 * percentile(calls, 99):.1f} | "
          f"{1000 * p50 / batch_size:.2f} |")


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


if __name__ == "__main__":
    main()
