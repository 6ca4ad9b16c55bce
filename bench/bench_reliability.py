"""What docs/RELIABILITY.md reports, measured with real processes on the embedded Milvus:

1. the sockets `gmv serve` and its Milvus listen on (defaults);
2. kill -9 of `gmv serve`, and SIGTERM then SIGKILL 1 s later: how long until no process of
   that data dir's Milvus is left, and until a new `gmv serve` on it is SERVING;
3. kill -9 of the Milvus binary while two clients send: how long until health is NOT_SERVING
   and SERVING again, and whether every generation answered OK is in the ledger exactly once;
4. a second `gmv serve` on another data dir while the first runs;
5. `gmv index info` with `gmv milvus start` running, against one that starts its own Milvus;
6. a graceful stop (SIGTERM) of `gmv serve`.

    .venv/bin/python bench/bench_reliability.py [--rows 200] [--rounds 3]

Times vary from run to run on a shared machine: each row gives the median of --rounds.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GMV = [sys.executable, "-m", "gmv_server.cli"]


def processes_of(data_dir: Path) -> list[int]:
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if str(data_dir) in " ".join(process.info["cmdline"] or ()):
            found.append(process.info["pid"])
    return found


def wait_for(condition, timeout_s: float, step_s: float = 0.05) -> float:
    """Seconds until condition() is true (raises after timeout_s)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"not within {timeout_s} s")
        time.sleep(step_s)
    return time.monotonic() - start


def health(port: int) -> str:
    from gmv_server.healthcheck import check

    return check(f"127.0.0.1:{port}", "", 1.0)


def serve(data_dir: Path, port: int, milvus_port: int, metrics_port: int | None = None) -> subprocess.Popen:
    flags = ["--metrics-port", str(metrics_port)] if metrics_port else []
    return subprocess.Popen([*GMV, "serve", "--collection", "served", "--port", str(port), "--data-dir",
                             str(data_dir), "--milvus-port", str(milvus_port), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def build(data_dir: Path, rows: int) -> Path:
    from gmv_engine.datasets import export_digits
    from gmv_engine.encoders import create_encoder
    from gmv_engine.ingest import ingest, read_manifest
    from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port
    from gmv_engine.milvus.index import CollectionInfo, TrainingIndex
    from gmv_engine.rerankers import create_reranker

    digits = export_digits(data_dir.parent / "digits")
    encoder, reranker = create_encoder("pixels"), create_reranker("l2")
    with EmbeddedMilvus(data_dir / "milvus", port=free_port()) as milvus:
        index = TrainingIndex(milvus.uri)
        ingest(index, "served", read_manifest(digits.manifest)[:rows],
               CollectionInfo("offline", encoder.name, encoder.dim, reranker.name, reranker.feature_dim),
               encoder, reranker, progress=False)
        index.close()
    return digits.heldout


def main() -> None:
    import psutil

    from gmv_client import GMVClient
    from gmv_engine.datasets import read_heldout
    from gmv_engine.ledger import open_ledger
    from gmv_engine.milvus.embedded import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200, help="training digits in the served collection")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of each timed step (the median is shown)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gmv-reliability-"))
    template = work / "template"
    heldout = build(template, args.rows)
    images = [example[0].read_bytes() for example in read_heldout(heldout)[:8]]
    rows: list[tuple[str, str]] = []

    data_dir = work / "served"
    shutil.copytree(template, data_dir)
    port, milvus_port, metrics_port = free_port(), free_port(), free_port()

    # 1 and 6 (first start): sockets, time to SERVING.
    server = serve(data_dir, port, milvus_port, metrics_port)
    first_start = wait_for(lambda: health(port) == "SERVING", 300, 0.2)
    tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    pids = {p.pid for p in tree}
    sockets = sorted({f"{c.laddr.ip}:{c.laddr.port}" for c in psutil.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN and c.pid in pids})
    rows.append(("listening sockets of gmv serve and its Milvus", ", ".join(sockets)))
    rows.append(("`gmv serve` first start to SERVING (fresh data dir copy)", f"{first_start:.1f} s"))

    # 2: deaths of gmv serve.
    for death in ("kill -9", "SIGTERM, SIGKILL 1 s later"):
        gone, back = [], []
        for _ in range(args.rounds):
            if death != "kill -9":
                server.send_signal(signal.SIGTERM)
                time.sleep(1)
            server.kill()
            server.wait()
            gone.append(wait_for(lambda: not processes_of(data_dir / "milvus"), 30))
            server = serve(data_dir, port, milvus_port, metrics_port)
            back.append(wait_for(lambda: health(port) == "SERVING", 120, 0.2))
        rows.append((f"{death} of `gmv serve`: no Milvus process of its data dir left after",
                     f"{statistics.median(gone):.2f} s (max {max(gone):.2f})"))
        rows.append((f"{death} of `gmv serve`: a new `gmv serve` on the data dir SERVING after",
                     f"{statistics.median(back):.1f} s (max {max(back):.1f})"))

    # 3: kill -9 of the Milvus binary while clients send.
    answered: list[str] = []
    stop = threading.Event()

    def send(worker: int) -> None:
        with GMVClient(f"127.0.0.1:{port}", timeout_s=90) as client:
            n = 0
            while not stop.is_set():
                generation_id = f"bench-{worker}-{n}"
                try:
                    client.attribute(images[n % len(images)], generation_id)
                    answered.append(generation_id)
                except Exception:  # noqa: BLE001 - counted by what is missing from `answered`
                    pass
                n += 1
                time.sleep(0.05)

    senders = [threading.Thread(target=send, args=(w,)) for w in range(2)]
    for sender in senders:
        sender.start()
    time.sleep(3)
    down, up = [], []
    for _ in range(args.rounds):
        binary = [p for p in psutil.Process(server.pid).children(recursive=True) if p.name() == "milvus"]
        binary[0].kill()
        killed = time.monotonic()
        wait_for(lambda: health(port) != "SERVING", 30, 0.1)
        down.append(time.monotonic() - killed)
        wait_for(lambda: health(port) == "SERVING", 120, 0.2)
        up.append(time.monotonic() - killed)
        time.sleep(3)
    stop.set()
    for sender in senders:
        sender.join()
    rows.append(("kill -9 of the Milvus binary: health NOT_SERVING after", f"{statistics.median(down):.1f} s "
                                                                          f"(max {max(down):.1f})"))
    rows.append(("kill -9 of the Milvus binary: SERVING again (restarted) after", f"{statistics.median(up):.1f} s "
                                                                                 f"(max {max(up):.1f})"))

    # 4: a second serve beside the first.
    other_dir = work / "other"
    shutil.copytree(template, other_dir)
    other_port = free_port()
    other = serve(other_dir, other_port, free_port())
    second = wait_for(lambda: health(other_port) == "SERVING", 300, 0.2)
    both = health(port) == "SERVING" and health(other_port) == "SERVING"
    other.send_signal(signal.SIGTERM)
    other.wait(timeout=60)
    rows.append(("a second `gmv serve` on another data dir, while the first serves: SERVING after",
                 f"{second:.1f} s (both SERVING: {both})"))

    # 6: graceful stop.
    server.send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    server.wait(timeout=120)
    rows.append(("SIGTERM of `gmv serve` (drain, then Milvus' own stop): exited after",
                 f"{time.monotonic() - stopped:.1f} s"))
    with open_ledger(str(data_dir / "ledger.sqlite3")) as ledger:
        recorded = ledger.totals()[0]
        missing = sum(ledger.get(g) is None for g in answered)
    rows.append(("generations answered OK during the Milvus kills / recorded in the ledger / missing",
                 f"{len(answered)} / {recorded} / {missing}"))

    # 5: gmv milvus start, then gmv index info.
    dev = ["--data-dir", str(other_dir), "--milvus-port", str(free_port())]

    def timed(*command: str) -> float:
        start = time.monotonic()
        subprocess.run([*GMV, *command], check=True, capture_output=True)
        return time.monotonic() - start

    alone = timed("index", "info", "--collection", "served", *dev)
    subprocess.run([*GMV, "milvus", "start", *dev], check=True, capture_output=True)
    try:
        reused = [timed("index", "info", "--collection", "served", *dev) for _ in range(args.rounds)]
    finally:
        subprocess.run([*GMV, "milvus", "stop", *dev], check=True, capture_output=True)
    rows.append(("`gmv index info` starting its own Milvus", f"{alone:.1f} s"))
    rows.append(("`gmv index info` with `gmv milvus start` running", f"{statistics.median(reused):.2f} s "
                                                                    f"(max {max(reused):.2f})"))
    print(f"| what ({args.rounds} rounds, {args.rows} training rows) | measured |\n|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
