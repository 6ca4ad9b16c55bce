"""Serving benchmark: latency (p50/p99) and throughput of `gmv serve` against client
concurrency and the dynamic batcher's max batch size, over real sockets.

    .venv/bin/python bench/bench_server.py [--requests 96] [--batch-sizes 1,8,32] [--concurrency 1,8,32] [--rounds 1]

Starts a fresh embedded Milvus, indexes the digits with the offline profile (unless
--profile), then for each max batch size starts a server and drives it with N client
threads, each with its own channel, sending PNG bytes through the Python client SDK.
Every request has a new generation_id, so each is computed and, unless the cell's ledger
column says "skip" (skip_ledger: previews), recorded in the server's SQLite ledger. With
--rounds N every cell is run N times on the same server, in turn, and the median throughput of
each is printed after the table (on a shared machine, compare medians).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import platform
import statistics
import time
import uuid
import urllib.request

import numpy as np

from common import digits_on_embedded_milvus, serving


def scrape(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    # Summed over label sets (generations are counted per collection).
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="offline")
    parser.add_argument("--requests", type=int, default=96, help="requests per cell")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--max-queue-delay-ms", type=float, default=5.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ledger", default="record,skip", help="record: ids recorded in the ledger; skip: previews")
    parser.add_argument("--rounds", type=int, default=1, help="run every cell this many times, in turn")
    args = parser.parse_args()

    from gmv_engine.datasets import read_heldout
    from gmv_engine.milvus.embedded import free_port

    with digits_on_embedded_milvus(args.profile, args.device, "bench_serve") as bench:
        device = bench.device
        images = [(path.stem, path.read_bytes()) for path, _, _ in read_heldout(bench.digits.heldout)]
        print(f"# GMV serving benchmark\n\nprofile `{bench.profile.name}`; device `{device}`; {platform.machine()}, "
              f"{os.cpu_count()} CPUs; max queue delay {args.max_queue_delay_ms} ms; {args.requests} requests per cell; "
              "clients on the same machine (they share its CPUs with the server)\n")
        print("| max batch | clients | ledger | p50 ms | p99 ms | throughput gen/s | mean batch size |")
        print("|---:|---:|---|---:|---:|---:|---:|")
        throughputs: dict[tuple[int, int, str], list[float]] = {}
        for max_batch in [int(b) for b in args.batch_sizes.split(",")]:
            port, metrics_port = free_port(), free_port()
            flags = ("--metrics-port", str(metrics_port), "--max-batch-size", str(max_batch),
                     "--max-queue-delay-ms", str(args.max_queue_delay_ms))
            with serving(bench, "bench_serve", port, *flags, warm=images[:16]) as target:
                for _ in range(args.rounds):
                    for clients in [int(c) for c in args.concurrency.split(",")]:
                        for mode in args.ledger.split(","):
                            throughputs.setdefault((max_batch, clients, mode), []).append(
                                _cell(target, metrics_port, images, max_batch, clients, args.requests, mode == "record"))
        if args.rounds > 1:
            print(f"\nmedian throughput over {args.rounds} rounds (gen/s):")
            for (max_batch, clients, mode), values in throughputs.items():
                print(f"- max batch {max_batch}, {clients} clients, {mode}: {statistics.median(values):.1f} "
                      f"({', '.join(f'{v:.1f}' for v in values)})")


def _cell(target, metrics_port, images, max_batch, clients, total, record: bool) -> float:
    from gmv_client import GMVClient

    per_client = max(1, total // clients)
    executions = scrape(metrics_port, "gmv_batch_executions_total")
    generations = scrape(metrics_port, "gmv_generations_attributed_total")

    def drive(worker: int) -> list[float]:
        latencies = []
        with GMVClient(target) as client:
            for i in range(per_client):
                _, data = images[(worker * per_client + i) % len(images)]
                start = time.perf_counter()
                client.attribute(data, uuid.uuid4().hex, record=record)
                latencies.append(time.perf_counter() - start)
        return latencies

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        latencies = [lat for worker in pool.map(drive, range(clients)) for lat in worker]
    wall = time.perf_counter() - start
    batches = scrape(metrics_port, "gmv_batch_executions_total") - executions
    done = scrape(metrics_port, "gmv_generations_attributed_total") - generations
    print(f"| {max_batch} | {clients} | {'record' if record else 'skip'} | {1000 * statistics.median(latencies):.1f} | "
          f"{1000 * float(np.percentile(latencies, 99)):.1f} | {len(latencies) / wall:.0f} | {done / batches:.1f} |",
          flush=True)
    return len(latencies) / wall


if __name__ == "__main__":
    main()
