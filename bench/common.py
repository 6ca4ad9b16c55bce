"""What both benchmarks set up: the digits, the profile's components, and a fresh embedded Milvus
(or the Milvus at GMV_BENCH_MILVUS_URI)."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator


@dataclass
class DigitsBench:
    profile: object
    device: str
    digits: object  # gmv_engine.datasets.DigitsExport
    rows: list
    encoder: object
    reranker: object
    milvus_uri: str
    index: object  # gmv_engine.milvus.index.TrainingIndex
    report: object  # gmv_engine.ingest.IngestReport
    ingest_seconds: float


@contextlib.contextmanager
def digits_on_embedded_milvus(profile_name: str, device_name: str, collection: str) -> Iterator[DigitsBench]:
    """Index the digits' training split into `collection` on a fresh embedded Milvus."""
    from gmv_engine.profiles import get_profile
    from gmv_engine.datasets import export_digits
    from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port
    from gmv_engine.encoders import create_encoder
    from gmv_engine.milvus.index import CollectionInfo, TrainingIndex
    from gmv_engine.ingest import ingest, read_manifest
    from gmv_engine.models import configure_model_dir, pick_device
    from gmv_engine.rerankers import create_reranker

    configure_model_dir(None)
    device = pick_device(device_name)
    profile = get_profile(profile_name)
    workdir = Path(tempfile.mkdtemp(prefix="gmv-bench-"))
    digits = export_digits(workdir / "digits")
    rows = read_manifest(digits.manifest)
    encoder, reranker = create_encoder(profile.encoder, device), create_reranker(profile.reranker, device)
    existing = os.environ.get("GMV_BENCH_MILVUS_URI")  # a Milvus already running (the ingest resumes)
    with contextlib.nullcontext(SimpleNamespace(uri=existing)) if existing else \
            EmbeddedMilvus(workdir / "milvus", port=free_port()) as milvus:
        # A Milvus that outlives this run keeps its collections, so their features must outlive it too.
        features = Path(tempfile.gettempdir()) / f"gmv-bench-features-{_slug(existing)}" if existing else \
            workdir / "features"
        index = TrainingIndex(milvus.uri, feature_store=str(features))
        info = CollectionInfo(profile.name, encoder.name, encoder.dim, reranker.name, reranker.feature_dim)
        start = time.perf_counter()
        report = ingest(index, collection, rows, info, encoder, reranker, progress=False)
        seconds = time.perf_counter() - start
        try:
            yield DigitsBench(profile, device, digits, rows, encoder, reranker, milvus.uri, index, report, seconds)
        finally:
            index.close()


def _slug(uri: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in uri)


@contextlib.contextmanager
def serving(bench: DigitsBench, collection: str, port: int, *flags: str, warm: list[tuple[str, bytes]] = (),
            tenant_id: str = "") -> Iterator[str]:
    """`gmv serve` on the bench's Milvus with its own ledger, warmed with `warm` (id, image)
    pairs; yields its target, and stops it after the block."""
    import subprocess
    import sys

    from gmv_client import GMVClient

    server = subprocess.Popen(
        [sys.executable, "-m", "gmv_server.cli", "serve", "--collection", collection, "--port", str(port), *flags,
         "--milvus-uri", bench.milvus_uri, "--device", bench.device, "--host", "127.0.0.1",
         *(("--feature-store", bench.index.feature_store.uri) if bench.index.feature_store else ()),
         "--data-dir", tempfile.mkdtemp(prefix="gmv-bench-ledger-")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        target = f"127.0.0.1:{port}"
        with GMVClient(target) as client:
            client.wait_until_ready()
            for gid, data in warm:  # the feature cache, the models and the ledger
                client.attribute(data, f"warm-{gid}", tenant_id=tenant_id)
        yield target
    finally:
        server.terminate()
        server.wait(timeout=60)
