"""Ledger recording throughput with and without the tamper-evident leaf hashes, and the time
to seal, verify and prove a month.

    git archive 71dc4ce~2 gmv_engine | tar -x -C /tmp/gmv-before   # the ledger before this work
    python bench/bench_ledger_seal.py --baseline-src /tmp/gmv-before     # throughput
    python bench/bench_ledger_seal.py --skip-throughput --seal-records 100000   # seal/verify/prove

Throughput: each run records --batches group commits of --batch records (10 credits each,
stamped now, as the server records them) into a fresh ledger through `Ledger.record_many`, in
a worker process, for three codes in turn: this checkout, this checkout with the leaf
hashing switched off (what the hashing itself costs), and --baseline-src (GMV from before
the leaf hashes); the order alternates between runs, so drift on a shared machine hits all
alike. Reports the median records/s of --runs runs per code and backend. PostgreSQL is a throwaway server on loopback (tests/helpers.py), SQLite a
file in a temporary folder (WAL, synchronous=FULL: one fsync per batch).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_records(n: int, recorded_at: float = 0.0, tenant: str = "tenant-1"):
    from gmv_engine.credit import Credit
    from gmv_engine.ledger import GenerationRecord, settings_hash

    settings = {"top_k": 10, "temperature": 0.01}
    records = []
    for _ in range(n):
        credits = tuple(Credit(rank, f"train-{uuid.uuid4().hex[:12]}", f"contrib-{rank % 7}", 0.9 / 10, 0.01 * rank)
                        for rank in range(1, 11))
        records.append(GenerationRecord(uuid.uuid4().hex, tenant, "digits", "offline", settings_hash(settings),
                                        uuid.uuid4().hex * 2, sum(c.credit for c in credits), credits,
                                        recorded_at, settings))
    return records


def worker(url: str, batches: int, batch: int, no_leaf_hash: bool) -> None:
    """Record `batches` group commits into `url`; print the seconds they took."""
    from gmv_engine.ledger import open_ledger

    if no_leaf_hash:  # this code with the hashing switched off: what the hashing itself costs
        import gmv_engine.ledger

        gmv_engine.ledger._leaf_hash = lambda record: None

    groups = [make_records(batch) for _ in range(batches)]
    with open_ledger(url) as ledger:
        ledger.record_many(make_records(batch))  # warm: connection, statement caches
        started = time.perf_counter()
        for group in groups:
            ledger.record_many(group)
        elapsed = time.perf_counter() - started
    import gmv_engine

    print(json.dumps({"seconds": elapsed, "records": batches * batch, "code": gmv_engine.__file__}))


def fresh_url(backend: str, postgres, folder: Path, n: int) -> str:
    if backend == "sqlite":
        return str(folder / f"ledger-{n}.sqlite3")
    return postgres.create_database(f"gmv_bench_{n}_{uuid.uuid4().hex[:8]}")


def throughput(args, postgres, folder: Path) -> dict:
    codes = {"with leaf hashes": (str(ROOT), False), "hashing off": (str(ROOT), True)}
    if args.baseline_src:
        codes["before (baseline)"] = (str(Path(args.baseline_src).resolve()), False)
    results: dict[tuple[str, str], list[float]] = {}
    n = 0
    for backend in args.backends:
        for run in range(args.runs):
            for code, (src, no_hash) in (codes.items() if run % 2 == 0 else reversed(list(codes.items()))):
                n += 1
                url = fresh_url(backend, postgres, folder, n)
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, str(ROOT / "server")]))
                out = subprocess.run([sys.executable, __file__, "--worker", url, "--batches", str(args.batches),
                                      "--batch", str(args.batch), *(["--no-leaf-hash"] if no_hash else [])],
                                     env=env, capture_output=True, text=True, check=True, cwd=folder)
                measured = json.loads(out.stdout.strip().splitlines()[-1])
                results.setdefault((backend, code), []).append(measured["records"] / measured["seconds"])
    report = {}
    for (backend, code), rates in results.items():
        report[f"{backend}: {code}"] = statistics.median(rates)
        print(f"{backend:10s} {code:18s} median {statistics.median(rates):8.0f} records/s  "
              f"(runs: {', '.join(f'{r:.0f}' for r in rates)})")
    for backend in args.backends:
        now, off = report[f"{backend}: with leaf hashes"], report[f"{backend}: hashing off"]
        print(f"{backend:10s} with leaf hashes / hashing off = {now / off:.3f}")
        if args.baseline_src:
            before = report[f"{backend}: before (baseline)"]
            print(f"{backend:10s} with leaf hashes / before = {now / before:.3f}")
    return report


def seal_timing(args, postgres, folder: Path) -> None:
    """Fill a month with --seal-records records, then time seal, verify and one proof."""
    import dataclasses

    from gmv_engine import transparency
    from gmv_engine.ledger import open_ledger

    since, until = transparency.month_bounds(args.month)
    for backend in args.backends:
        url = fresh_url(backend, postgres, folder, 10_000 + len(backend))
        key = transparency.generate_key_file(folder / f"key-{backend}.pem")
        with open_ledger(url) as ledger:
            started = time.perf_counter()
            step = (until - since) / args.seal_records
            for i in range(0, args.seal_records, 256):
                group = make_records(min(256, args.seal_records - i))
                ledger.record_many([dataclasses.replace(r, recorded_at=since + (i + j) * step)
                                    for j, r in enumerate(group)])
            filled = time.perf_counter() - started
            started = time.perf_counter()
            checkpoint = ledger.seal(args.month, key)
            seal_s = time.perf_counter() - started
            started = time.perf_counter()
            report = ledger.verify(args.month, [key.public_key()])
            verify_s = time.perf_counter() - started
            assert report.ok and report.records == args.seal_records, report.findings[:5]
            record = ledger.get(ledger.sealed_leaves(args.month)[args.seal_records // 2][1])
            started = time.perf_counter()
            proof = ledger.prove(record.generation_id, record.tenant_id)
            prove_s = time.perf_counter() - started
            started = time.perf_counter()
            transparency.check_proof(proof, [key.public_key()])
            check_ms = (time.perf_counter() - started) * 1000
        print(f"{backend:10s} {args.seal_records} records ({args.seal_records * 10} credits; filled in {filled:.0f} s): "
              f"seal {seal_s:.1f} s, verify {verify_s:.1f} s, prove {prove_s:.2f} s, check-proof {check_ms:.1f} ms "
              f"({len(proof['audit_path'])} hashes); root {checkpoint.root_hash[:16]}...")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-leaf-hash", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, default=150, help="group commits per run (default 150)")
    parser.add_argument("--batch", type=int, default=32, help="records per group commit (default 32)")
    parser.add_argument("--runs", type=int, default=5, help="runs per code and backend (default 5)")
    parser.add_argument("--backends", default="sqlite,postgresql", type=lambda s: s.split(","))
    parser.add_argument("--baseline-src", help="a checkout of GMV without leaf hashes, to compare against")
    parser.add_argument("--seal-records", type=int, default=0, help="time seal/verify/prove of a month of N records")
    parser.add_argument("--month", default="2026-01", help="the month --seal-records fills (default 2026-01)")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.batches, args.batch, args.no_leaf_hash)
        return
    sys.path[:0] = [str(ROOT), str(ROOT / "server"), str(ROOT / "tests")]
    postgres = None
    if "postgresql" in args.backends:
        from gmv_engine.milvus.embedded import free_port
        from helpers import PostgresServer

        postgres = PostgresServer(free_port()).start()
    try:
        with tempfile.TemporaryDirectory(prefix="gmv-bench-ledger-") as folder:
            if not args.skip_throughput:
                throughput(args, postgres, Path(folder))
            if args.seal_records:
                seal_timing(args, postgres, Path(folder))
    finally:
        if postgres is not None:
            postgres.stop()


if __name__ == "__main__":
    main()
