"""`gmv eval photos`: does credit reach the photograph a generated image was made from?

On the real-photo set of `photos_data` (no download), each re-ranker serves its collection
through `gmv serve` with the default settings (so the calibrated temperature), and every
augmented query is attributed over AttributeStream. Per augmentation: top-1 right source, top-1
right contributor, and the share of the generation's credit that reaches the right source and
the right contributor, under the server's T and, recomputed from the distances it returned,
under the paper's T = 1.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from .photos_data import AUGMENTATIONS, PHOTOS, build_photo_set

log = logging.getLogger(__name__)

PAPER_T = 1.0
PHOTO_RERANKERS = ("none", "l2", "aligned_l2")  # those measured when present (and asked for)


def shares(credits, temperature: float) -> np.ndarray:
    """Each kept image's share of the credit under T (the credit function at q = 1), whatever q is."""
    from gmv_engine.credit import credits_from_distances

    return credits_from_distances([c.distance for c in credits], 1.0, temperature)


def score(results: dict, generations, training: dict, temperature: float) -> dict:
    """{augmentation or "all": {top1_source, top1_contributor, share_source, share_contributor, n}}."""
    sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(5))
    for g in generations:
        credits = results[g.generation_id].credits
        split = shares(credits, temperature)
        source, contributor = g.labels["source_id"], g.labels["contributor_id"]
        row = np.array([
            bool(credits) and credits[0].training_id == source,
            bool(credits) and credits[0].contributor_id == contributor,
            sum(s for c, s in zip(credits, split) if c.training_id == source),
            sum(s for c, s in zip(credits, split) if c.contributor_id == contributor),
            1.0,
        ], dtype=np.float64)
        sums[g.labels["augmentation"]] += row
        sums["all"] += row
    keys = ("top1_source", "top1_contributor", "share_source", "share_contributor")
    return {aug: {**{k: float(v[i] / v[4]) for i, k in enumerate(keys)}, "n": int(v[4])}
            for aug, v in sums.items()}


def check_server_temperature(results: dict, temperature: float) -> None:
    """The credits the server sent are q · softmax(-d/T) with the T it reports."""
    for result in results.values():
        if result.quality > 0 and result.credits:
            sent = np.array([c.credit for c in result.credits]) / result.quality
            if not np.allclose(sent, shares(result.credits, temperature), atol=1e-6):
                raise RuntimeError(f"{result.generation_id}: the server's credits do not follow T = {temperature}")


def run_photos(args, index, data_dir: Path, workdir: Path, device: str, settings, results: dict,
               rerankers: dict, profile, encoder, quality, server_settings: dict) -> None:
    """Build, serve and score every photo variant into results["photos"]."""
    from .command import _build, load_dataset, served, stream

    start = time.perf_counter()
    if not 1 <= args.photo_count <= len(PHOTOS) or min(args.photo_queries, args.crops_per_photo) < 1:
        raise ValueError(f"--photos must lie between 1 and {len(PHOTOS)}, --photo-queries and --crops-per-photo "
                         "be at least 1")
    photo_set = build_photo_set(workdir / "data" / "photos", photos=PHOTOS[:args.photo_count],
                                crops_per_photo=args.crops_per_photo, queries=args.photo_queries, seed=args.seed)
    dataset = load_dataset("photos", photo_set.manifest, photo_set.generated)
    qualities_seen: list[float] = []
    record: dict = {
        "data": {"photos": list(photo_set.photos), "contributors": photo_set.contributors,
                 "training_images": photo_set.training, "queries": photo_set.queries,
                 "augmentations": list(AUGMENTATIONS), "seconds": time.perf_counter() - start},
        "variants": {}, "recall": "IVF_PQ" if "IVF_PQ" in args.recall else args.recall[0],
    }
    wanted = [name for name in PHOTO_RERANKERS if name in rerankers]
    stored_by = next((name for name in wanted if name != "none"), None)
    collections = {name: _build(index, results, dataset, record["recall"], rerankers[name], profile.name, encoder)
                   for name in wanted if name != "none"}
    for name in wanted:
        collection = collections.get(name) or collections.get(stored_by)
        if collection is None:
            continue
        log.info("photos: re-ranker %s on %s", name, collection)
        with served(index.uri, collection, name, server_settings, device, data_dir,
                    workdir / "logs" / f"serve-{collection}-{name}.log", milvus_token=settings.milvus_token,
                    model_dir=settings.model_dir, feature_store=index.feature_store and index.feature_store.uri) as client:
            info = client.index_info()  # the settings it serves with: T, recall_mirror
            by_id, seconds = stream(client, dataset.generations, args.top_k)
        temperature = float(info.search_params["temperature"])
        check_server_temperature(by_id, temperature)
        if not qualities_seen:
            qualities_seen = [r.quality for r in by_id.values()]
        record["variants"][name] = {
            "temperature": temperature, "temperature_source": info.search_params.get("temperature_source", ""),
            "recall_mirror": info.search_params.get("recall_mirror", ""),
            "served": score(by_id, dataset.generations, dataset.training, temperature),
            "paper_t": score(by_id, dataset.generations, dataset.training, PAPER_T),
            "stream_seconds": seconds,
        }
    q = np.array(qualities_seen)
    record["quality"] = {"metric": quality.name, "zero_share": float(np.mean(q == 0)) if q.size else math.nan,
                         "median": float(np.median(q)) if q.size else math.nan}
    record["seconds"] = time.perf_counter() - start
    results["photos"] = record


def photos_section(photos: dict) -> list[str]:
    """The report's section for `gmv eval photos`."""
    from .report import _pct, _table

    data = photos["data"]
    lines = ["## Real photographs: credit to the right source", "",
             f"{data['training_images']} training crops of {len(data['photos'])} photographs that scikit-image and "
             f"scikit-learn ship ({', '.join(data['photos'])}), the photographs dealt round robin to "
             f"{data['contributors']} contributors; {data['queries']} queries, each a "
             f"training crop through one augmentation ({', '.join(data['augmentations'])}), served through "
             f"`gmv serve` on {photos['recall']} recall with default settings. *share* is the part of a "
             "generation's credit that reaches the right source crop (or contributor); *T = 1* recomputes it "
             "from the same distances with the paper's temperature.", ""]
    header = ["re-ranker", "T", "recall mirror", "top-1 source", "top-1 contributor", "share to source", "share to contributor",
              "share to source at T = 1"]
    rows = []
    for name, variant in photos["variants"].items():
        served, paper = variant["served"]["all"], variant["paper_t"]["all"]
        rows.append([f"`{name}`", f"{variant['temperature']:.4g} ({variant['temperature_source']})",
                     str(variant.get("recall_mirror", "")),
                     _pct(served["top1_source"]), _pct(served["top1_contributor"]), _pct(served["share_source"]),
                     _pct(served["share_contributor"]), _pct(paper["share_source"])])
    lines += _table(header, rows)
    for name, variant in photos["variants"].items():
        lines += [f"Per augmentation, `{name}` (served T):", ""]
        lines += _table(["augmentation", "n", "top-1 source", "top-1 contributor", "share to source",
                         "share to contributor"],
                        [[aug, str(s["n"]), _pct(s["top1_source"]), _pct(s["top1_contributor"]),
                          _pct(s["share_source"]), _pct(s["share_contributor"])]
                         for aug, s in variant["served"].items() if aug != "all"])
    quality = photos.get("quality", {})
    if quality:
        lines += [f"Quality `{quality['metric']}` on the queries: median q {quality['median']:.3f}; "
                  f"{_pct(quality['zero_share'])} got q = 0 (they pass on no credit unless `min_quality` is set).", ""]
    return lines
