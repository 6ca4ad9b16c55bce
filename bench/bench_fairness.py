"""Fair queueing benchmark: one tenant floods `gmv serve` while another sends single requests.

    .venv/bin/python bench/bench_fairness.py [--flood 5000] [--flood-concurrency 256] [--probes 200]

Starts a fresh embedded Milvus (or uses the one at GMV_BENCH_MILVUS_URI), indexes the digits
with the offline profile, and for each queue policy (fair, the default; fifo, arrival order,
for comparison) starts a server and measures tenant "probe"'s single requests, one at a time:
first on the idle server, then while tenant "flood" sends --flood unary requests with
--flood-concurrency in flight (each a new generation, recorded in the ledger), from its own
process, through the Python SDK. A flood request refused past the tenant's share
(RESOURCE_EXHAUSTED) is retried by the SDK with its jittered exponential backoff
(--flood-resend-ms N instead resends after ~N ms, however often refused: a client that ignores
backoff), so every one of the flood's requests is computed in the end; the server's
gmv_queue_rejected_total counts the refusals. The issue's bar: the probe's p99 under the flood
within 3x of its idle p99.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
import uuid

import numpy as np

from common import digits_on_embedded_milvus, serving


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=5000, help="requests the flooding tenant sends")
    parser.add_argument("--flood-concurrency", type=int, default=256)
    parser.add_argument("--flood-resend-ms", type=float, default=0.0,
                        help="resend a refused flood request after ~this many ms instead of the SDK's backoff")
    parser.add_argument("--probes", type=int, default=200, help="single requests of the other tenant per phase")
    parser.add_argument("--policies", default="fair,fifo")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    from gmv_engine.datasets import read_heldout
    from gmv_engine.milvus.embedded import free_port

    with digits_on_embedded_milvus("offline", args.device, "bench_fair") as bench:
        images = [path.read_bytes() for path, _, _ in read_heldout(bench.digits.heldout)]
        print(f"# GMV fair queueing benchmark\n\nprofile `offline`; device `{bench.device}`; {platform.machine()}, "
              f"{os.cpu_count()} CPUs; max batch {args.max_batch_size}; flood: {args.flood} unary requests, "
              f"{args.flood_concurrency} in flight, from one tenant, refusals "
              f"{'resent after ~%g ms' % args.flood_resend_ms if args.flood_resend_ms else 'retried with the SDK backoff'}; probes: {args.probes} single requests, one at a "
              "time, from another tenant; every request recorded; clients on the same machine as the server\n")
        print("| queue policy | probe p50 idle ms | probe p99 idle ms | probe p50 flood ms | probe p99 flood ms | "
              "p99 flood / idle | flood OK | flood refusals (resent) | flood gen/s |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for policy in args.policies.split(","):
            metrics_port = free_port()
            flags = ("--queue-policy", policy, "--max-batch-size", str(args.max_batch_size),
                     "--metrics-port", str(metrics_port))
            warm = list(enumerate(images[:32]))
            with serving(bench, "bench_fair", free_port(), *flags, warm=warm, tenant_id="probe") as target:
                row = asyncio.run(_phases(target, images, args, metrics_port))
                print(f"| {policy} | " + " | ".join(row), flush=True)


async def _probe(stub, pb, images, count: int, stop: asyncio.Event | None = None) -> list[float]:
    latencies = []
    for i in range(count):
        if stop is not None and stop.is_set():
            break
        request = pb.AttributeRequest(generation_id=uuid.uuid4().hex, image=images[i % len(images)], tenant_id="probe")
        start = time.perf_counter()
        async for _ in stub.Attribute(request, timeout=60):
            pass
        latencies.append(time.perf_counter() - start)
    return latencies


def _flood(target: str, images: list[bytes], count: int, concurrency: int, resend_s: float, outcomes) -> None:
    """The flooding tenant, in its own process, so its client work does not slow the probe's."""
    import grpc

    from gmv_client import AsyncGMVClient

    async def run():
        counts: dict[str, int] = {}
        sent = iter(range(count))
        # resend_s: no backoff growth, a fixed ~resend_s sleep between attempts (retries forever).
        backoff = dict(backoff_s=resend_s * 2, backoff_multiplier=1.0, max_backoff_s=resend_s * 2) if resend_s else {}
        async with AsyncGMVClient(target, timeout_s=600, **backoff) as client:

            async def flooder():
                for i in sent:
                    try:
                        await client.attribute(images[i % len(images)], uuid.uuid4().hex, tenant_id="flood")
                        code = "OK"
                    except grpc.aio.AioRpcError as error:
                        code = error.code().name
                    counts[code] = counts.get(code, 0) + 1

            await asyncio.gather(*(flooder() for _ in range(concurrency)))
        outcomes.update(counts)

    asyncio.run(run())


async def _phases(target: str, images: list[bytes], args, metrics_port: int) -> list[str]:
    import multiprocessing

    import grpc

    from gmv.v1 import attribution_pb2 as pb
    from gmv.v1 import attribution_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as probe_channel:
        probe_stub = pb_grpc.AttributionServiceStub(probe_channel)
        idle = await _probe(probe_stub, pb, images, args.probes)
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager:
            outcomes = manager.dict()
            flood = context.Process(target=_flood, args=(target, images, args.flood, args.flood_concurrency,
                                                         args.flood_resend_ms / 1000, outcomes))
            start = time.perf_counter()
            flood.start()
            await asyncio.sleep(2.0)  # the flood's process starts and fills the queue first
            done = asyncio.Event()
            watcher = asyncio.create_task(_set_when_done(flood, done))
            flooded = await _probe(probe_stub, pb, images, args.probes, done)
            await watcher
            wall = time.perf_counter() - start
            outcomes = dict(outcomes)
    p99_idle, p99_flood = (float(np.percentile(x, 99)) for x in (idle, flooded))
    ok = outcomes.get("OK", 0)
    refused = _refusals(metrics_port)
    others = {k: v for k, v in outcomes.items() if k != "OK"}
    if others:
        print(f"flood outcomes besides OK: {others}", file=sys.stderr)
    return [f"{1000 * statistics.median(idle):.1f}", f"{1000 * p99_idle:.1f}", f"{1000 * statistics.median(flooded):.1f}",
            f"{1000 * p99_flood:.1f}", f"{p99_flood / p99_idle:.2f}x ({len(flooded)} probes)", str(ok), str(refused),
            f"{ok / wall:.0f}"]


def _refusals(metrics_port: int) -> int:
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("gmv_queue_rejected_total")))


async def _set_when_done(process, event: asyncio.Event) -> None:
    await asyncio.to_thread(process.join)
    event.set()


if __name__ == "__main__":
    main()
