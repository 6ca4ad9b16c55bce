"""Ingest benchmark: `gmv index build`'s engine on N small PNGs, on a fresh embedded Milvus.

Makes N 64x64 PNGs (random crops, scales and mirrors of the photographs scikit-image ships, so
their content hashes differ and they look like photographs, not noise), writes a manifest, and
runs the real ingest (`gmv_engine.ingest.ingest`, offline profile unless --profile says
otherwise) into a new collection on an embedded Milvus of its own (its own data dir and free
port). Reports, per run:

- rows/s before the index build: from the start of ingest until `finish()` is called (decode,
  hash, duplicate checks, embed, features, inserts);
- finish s: `finish()`: flush and the asynchronous IVF_PQ build, then (where the code has
  `wait_served`) until the built index serves searches, then until Bounded reads see every row;
- calibrate s: the credit temperature measured after the build;
- total s and rows/s end to end;
- recall@10 (against exact search) of 200 held-out crops, searched the moment ingest returned,
  at nprobe 1 and 32: lower at 1 when the built IVF_PQ index serves, the same when Milvus
  still serves the rows unindexed.

    .venv/bin/python bench/bench_ingest.py [--rows 20000,10000] [--profile offline]

To time another checkout of GMV the same way (e.g. the code before issue 16), run this file
with that checkout first on the path: `PYTHONPATH=/path/to/checkout .venv/bin/python
bench/bench_ingest.py --rows 10000`. (It only uses `ingest`, `read_manifest`, `EmbeddedMilvus`
and `TrainingIndex`, which every version has.)
"""
from __future__ import annotations

import argparse
import csv
import inspect
import os
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "cat", "coins", "horse", "hubble_deep_field",
          "immunohistochemistry", "moon", "page", "text", "retina", "colorwheel", "logo", "clock", "grass",
          "gravel", "brick", "cell")
SIDE = 64
CONTRIBUTORS = 50
QUERIES = 200  # more images made than any run ingests: held-out queries for recall


def make_images(folder: Path, count: int, seed: int = 0) -> Path:
    """`count` PNGs of SIDE x SIDE under folder/<contributor>/, and folder/manifest.csv naming them.
    Reused when the folder already holds at least that many."""
    import numpy as np
    import skimage.data
    from PIL import Image

    manifest = folder / "manifest.csv"
    if manifest.exists() and sum(1 for _ in manifest.open()) >= count + 1:
        return manifest  # made before (a run reads the first rows it needs)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    photos = []
    for name in PHOTOS:
        array = np.asarray(getattr(skimage.data, name)())
        photos.append(Image.fromarray(array[..., :3] if array.ndim == 3 else array).convert("RGB"))
    rng = random.Random(seed)
    seen: set[bytes] = set()  # pixel contents made so far: no two images the same (uniform regions repeat)
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "training_id", "contributor_id", "photo"])
        for i in range(count):
            k = rng.randrange(len(photos))
            photo = photos[k]
            side = rng.randint(SIDE // 2, min(photo.size) // 2)
            x, y = rng.randint(0, photo.size[0] - side), rng.randint(0, photo.size[1] - side)
            crop = photo.crop((x, y, x + side, y + side)).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            while crop.tobytes() in seen:  # a crop of a flat region: move one pixel until it differs
                crop.putpixel((rng.randrange(SIDE), rng.randrange(SIDE)), tuple(rng.randrange(256) for _ in range(3)))
            seen.add(crop.tobytes())
            contributor = f"c{i % CONTRIBUTORS:02d}"
            relative = f"{contributor}/{i:06d}.png"
            (folder / contributor).mkdir(exist_ok=True)
            crop.save(folder / relative)
            writer.writerow([relative, f"img-{i:06d}", contributor, PHOTOS[k]])
    return manifest


def run_once(manifest: Path, rows: int, profile_name: str, device_name: str, workdir: Path) -> dict:
    from gmv_engine.encoders import create_encoder
    from gmv_engine.ingest import ingest, read_manifest
    from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port
    from gmv_engine.milvus.index import CollectionInfo, TrainingIndex
    from gmv_engine.models import pick_device
    from gmv_engine.profiles import get_profile
    from gmv_engine.rerankers import create_reranker

    device = pick_device(device_name)
    profile = get_profile(profile_name)
    encoder, reranker = create_encoder(profile.encoder, device), create_reranker(profile.reranker, device)
    everything = read_manifest(manifest)
    source, held_out = everything[:rows], everything[-QUERIES:]
    milvus_dir = workdir / f"milvus-{rows}"
    shutil.rmtree(milvus_dir, ignore_errors=True)
    with EmbeddedMilvus(milvus_dir, port=free_port()) as milvus:
        # Re-rank features where `gmv index build` puts them: the feature store on the data dir
        # (code before the store, which had no such parameter, keeps them in Milvus).
        store = ({"feature_store": str(milvus_dir / "features")}
                 if "feature_store" in inspect.signature(TrainingIndex).parameters else {})
        index = TrainingIndex(milvus.uri, timeout_s=120.0, **store)
        try:
            marks: dict[str, float] = {}

            def timed(method: str, key: str) -> None:
                """Time index.<method> (where this version of the code has it) into marks[key]."""
                original = getattr(index, method, None)
                if original is None:
                    return

                def wrapper(*args, **kwargs):
                    marks[key + "_start"] = time.perf_counter()
                    try:
                        return original(*args, **kwargs)
                    finally:
                        marks[key + "_end"] = time.perf_counter()

                setattr(index, method, wrapper)

            timed("finish", "finish")
            timed("wait_for_index", "build")
            timed("wait_served", "served")
            info = CollectionInfo(profile.name, encoder.name, encoder.dim, reranker.name, reranker.feature_dim)
            start = time.perf_counter()
            report = ingest(index, "bench_ingest", source, info, encoder, reranker, progress=False)
            end = time.perf_counter()
            assert not report.bad, report.bad[:5]
            recall = recall_right_after(index, encoder, source, held_out)
            return {
                "recall": recall,
                "rows": len(source),
                "inserted": report.inserted,
                "duplicates": report.duplicates,
                "before_build_s": marks["finish_start"] - start,
                "finish_s": marks["finish_end"] - marks["finish_start"],
                "build_s": marks["build_end"] - marks["finish_start"],  # flush and the IVF_PQ build
                "served_s": marks["served_end"] - marks["served_start"] if "served_end" in marks else None,
                "calibrate_s": end - marks["finish_end"],
                "total_s": end - start,
                "index": f"{report.index_state.get('index_type')} {report.index_state.get('params')}",
            }
        finally:
            index.close()


def recall_right_after(index, encoder, source, held_out) -> dict[int, float]:
    """Recall@10 of held-out images against exact search, at nprobe 1 and 32, searched the
    moment ingest returned (the exact neighbours are computed afterwards): whether the built
    IVF index already serves (then nprobe matters) or the rows are still served unindexed."""
    import numpy as np

    from gmv_engine.decode import load_image_file
    from gmv_engine.milvus.index import training_pk

    queries = encoder.embed([load_image_file(row.path)[0] for row in held_out])
    found = {nprobe: index.search("bench_ingest", queries, limit=10, nprobe=nprobe) for nprobe in (1, 32)}
    vectors = np.concatenate([encoder.embed([load_image_file(row.path)[0] for row in source[start:start + 2048]])
                              for start in range(0, len(source), 2048)])
    pks = np.array([training_pk(row.training_id) for row in source])
    distances = (queries ** 2).sum(1)[:, None] - 2 * queries @ vectors.T + (vectors ** 2).sum(1)[None, :]
    exact = np.argsort(distances, axis=1)[:, :10]
    return {nprobe: float(np.mean([len(set(pks[e]) & {hit.pk for hit in hits}) / 10 for e, hits in zip(exact, found)]))
            for nprobe, found in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="20000,10000", help="runs, comma-separated row counts")
    parser.add_argument("--profile", default="offline")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", help="folder for the generated PNGs (default: a temporary folder, reused)")
    parser.add_argument("--label", default="", help="what is timed (printed in the table)")
    args = parser.parse_args()

    import gmv_engine

    counts = [int(n) for n in args.rows.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="gmv-bench-ingest-"))
    images = Path(args.images) if args.images else Path(tempfile.gettempdir()) / "gmv-bench-ingest"
    started = time.perf_counter()
    manifest = make_images(images, max(counts) + QUERIES)
    print(f"# GMV ingest benchmark\n\n{max(counts)} PNGs of {SIDE}x{SIDE} in {images} "
          f"({time.perf_counter() - started:.0f} s to make or find); code: {Path(gmv_engine.__file__).parent.parent}; "
          f"profile `{args.profile}`; {platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| code | rows | inserted | before the build s | rows/s before the build | finish s | of which flush + "
          "build s | of which until the index serves s | calibrate s | total s | rows/s end to end | index "
          "| recall@10 right after, nprobe 1 / 32 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    try:
        for rows in counts:
            r = run_once(manifest, rows, args.profile, args.device, workdir)
            print(f"| {args.label} | {r['rows']} | {r['inserted']} | {r['before_build_s']:.1f} | "
                  f"{r['inserted'] / r['before_build_s']:.0f} | {r['finish_s']:.1f} | {r['build_s']:.1f} | "
                  f"{'-' if r['served_s'] is None else format(r['served_s'], '.1f')} | {r['calibrate_s']:.1f} | "
                  f"{r['total_s']:.1f} | {r['inserted'] / r['total_s']:.0f} | {r['index']} | "
                  f"{r['recall'][1]:.3f} / {r['recall'][32]:.3f} |", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
