"""`gmv eval`: each criterion's computation on small hand-made cases with known answers, the
demo's data maker, the report, exact FLAT search, and one small run through the real server."""
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gmv_eval import criteria as C

from helpers import write_csv


# -- C1 / C2 ------------------------------------------------------------------------------------
def test_c1_share_of_top_k_with_the_generations_class():
    ranked = [["3", "3", "5", "3"], ["1", "7", "7", "7"]]
    own = ["3", "7"]
    # k=2: 2/2 and 1/2; k=4: 3/4 and 3/4.
    assert C.mean_identical_share(ranked, own, [2, 4]) == {2: 0.75, 4: 0.75}
    assert list(C.identical_shares(ranked, own, 1)) == [1.0, 0.0]


def test_c2_missing_labels_never_match_and_unlabelled_generations_are_left_out():
    ranked = [["hat", None, "hat"], ["none", "hat", "none"], ["hat", "hat", "hat"]]
    own = ["hat", "none", ""]  # the third generation has no label for this attribute
    shares = C.identical_shares(ranked, own, 3)
    assert shares[0] == pytest.approx(2 / 3) and shares[1] == pytest.approx(2 / 3) and math.isnan(shares[2])
    assert C.mean_identical_share(ranked, own, [3])[3] == pytest.approx(2 / 3)


def test_chance_share_is_the_labels_frequency_in_the_training_set():
    training = ["3", "3", "5", "7", None]  # one training image has no label
    # A generation of class 3 would find 2/5 of a random top k with its class, one of 7 1/5.
    assert C.chance_share(training, ["3", "7", ""]) == pytest.approx((2 / 5 + 1 / 5) / 2)


def test_c1_refuses_k_beyond_the_credits_returned():
    with pytest.raises(ValueError, match="fewer than k=3"):
        C.identical_shares([["a", "a"]], ["a"], 3)


def test_topk_overlap_of_approximate_and_exact_search():
    approximate = [["a", "b", "c"], ["x", "y", "z"]]
    exact = [["a", "c", "d"], ["x", "y", "z"]]
    assert C.topk_overlap(approximate, exact, 2) == pytest.approx((1 / 2 + 1) / 2)
    assert C.topk_overlap(approximate, exact, 3) == pytest.approx((2 / 3 + 1) / 2)


# -- C3 -----------------------------------------------------------------------------------------
def test_data_values_sum_credits_over_generations():
    phi = C.data_values([[("a", 0.5), ("b", 0.25)], [("a", 0.125)]], ["a", "b", "c"])
    assert phi == {"a": 0.625, "b": 0.25, "c": 0.0}
    with pytest.raises(ValueError, match="not in the training set"):
        C.data_values([[("zz", 1.0)]], ["a"])


def test_cleansing_when_corrupted_images_have_the_lowest_values():
    phi = {f"x{i}": float(i + 1) for i in range(10)}
    result = C.cleansing(phi, {"x0", "x1"}, bottom_fraction=0.2)
    assert result.bottom_share == 1.0 and result.auc == 1.0
    assert result.mean_percentile == pytest.approx((0.05 + 0.15) / 2)
    assert result.zero_value_share == 0.0 and result.found_at(0.1) == pytest.approx(0.5)


def test_cleansing_splits_ties_in_expectation():
    # Four images at 0 (two of them corrupted), five clean at 1..5, one corrupted at the top.
    phi = {"z1": 0.0, "z2": 0.0, "z3": 0.0, "z4": 0.0, **{f"p{i}": float(i) for i in range(1, 7)}}
    result = C.cleansing(phi, {"z1", "z2", "p6"}, bottom_fraction=0.1)
    # The bottom 10% is one position inside the tied group of 4 holding 2 corrupted: 2/4 expected.
    assert result.bottom_share == pytest.approx(0.5 / 3)
    assert result.found_at(0.4) == pytest.approx(2 / 3) and result.found_at(1.0) == pytest.approx(1.0)
    # Pairs (corrupted, clean): each corrupted zero is below 5 clean and ties 2 -> 6; p6 is below none.
    assert result.auc == pytest.approx(12 / 21)
    assert result.mean_percentile == pytest.approx((0.2 + 0.2 + 0.95) / 3)
    assert result.zero_value_share == pytest.approx(2 / 3) and result.zero_value_share_all == pytest.approx(0.4)
    assert result.mean_value_corrupted == pytest.approx(2.0) and result.mean_value_clean == pytest.approx(15 / 7)


def test_cleansing_matches_random_tie_breaking_and_roc_auc():
    """The closed forms against brute force: the mean over many random orders within ties, and
    scikit-learn's ROC AUC (which also counts ties one half)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    values = rng.integers(0, 6, size=200).astype(float)  # many ties
    corrupted = rng.random(200) < 0.15 + 0.25 * (values < 2)  # more of them among low values
    phi = {f"t{i}": v for i, v in enumerate(values)}
    ids = {f"t{i}" for i in np.flatnonzero(corrupted)}
    result = C.cleansing(phi, ids, bottom_fraction=0.1)
    found = []
    for _ in range(4000):
        order = np.lexsort((rng.random(200), values))  # by value, ties at random
        found.append(corrupted[order[:20]].sum() / corrupted.sum())
    assert result.bottom_share == pytest.approx(np.mean(found), abs=0.01)
    assert result.auc == pytest.approx(roc_auc_score(corrupted, -values))


def test_cleansing_rejects_unknown_or_missing_corrupted_ids():
    with pytest.raises(ValueError, match="not training images"):
        C.cleansing({"a": 1.0}, {"b"})
    with pytest.raises(ValueError, match="no corrupted"):
        C.cleansing({"a": 1.0}, set())


# -- C4 -----------------------------------------------------------------------------------------
def test_c4_aggregates_end_to_end_and_per_stage_seconds():
    result = C.efficiency([0.010, 0.020, 0.030, 0.040],
                          [{"embed": 1.0, "recall": 2.0}, {"embed": 3.0, "recall": 2.0}, {"embed": 2.0, "recall": 8.0}],
                          stream_seconds=1.0, stream_samples=4)
    assert result.samples == 4
    assert result.end_to_end_mean_s == pytest.approx(0.025) and result.end_to_end_p50_s == pytest.approx(0.025)
    assert result.stage_mean_s == pytest.approx({"embed": 2.0, "recall": 4.0})
    assert result.stage_p50_s == pytest.approx({"embed": 2.0, "recall": 2.0})
    assert result.pipeline_p50_s == pytest.approx(4.0)
    assert result.outside_pipeline_p50_s == pytest.approx(0.025 - 4.0)
    assert result.streamed_s == pytest.approx(0.25)
    with pytest.raises(ValueError, match="same stages"):
        C.efficiency([0.1, 0.1], [{"embed": 1.0}, {"recall": 1.0}])


# -- variants, data, report ---------------------------------------------------------------------
def test_variants_without_weights_are_skipped_with_the_reason():
    from gmv_engine.errors import MissingWeightsError
    from gmv_eval.command import available_rerankers

    def create(name, device):  # stand-in: dreamsim's weights are "missing", the others build
        if name == "dreamsim":
            raise MissingWeightsError("dreamsim", "no checkpoint")
        return name

    built, skipped = available_rerankers(["none", "l2", "dreamsim"], "cpu", create)
    assert built == {"none": "none", "l2": "l2"}
    assert list(skipped) == ["dreamsim"] and "no checkpoint" in skipped["dreamsim"]
    with pytest.raises(ValueError, match="unknown re-ranker"):
        available_rerankers(["sift"], "cpu", create)


def test_measured_attributes():
    from gmv_eval.digits_data import AttributeThresholds, ink, slant

    rising = np.eye(8)[::-1]  # bottom-left to top-right: leans right
    assert slant(rising) == pytest.approx(1.0) and slant(rising[:, ::-1]) == pytest.approx(-1.0)
    vertical = np.zeros((8, 8))
    vertical[:, 3] = 1.0
    assert slant(vertical) == 0.0 and ink(vertical) == 8.0
    thresholds = AttributeThresholds.fit(np.stack([rising, vertical, vertical * 0.5]), np.array([1, 1, 1]))
    assert thresholds.ink[1] == 8.0 and thresholds.slant[1] == 0.0
    assert thresholds.attributes(rising * 2, 1) == {"thickness": "thick", "slant": "right"}
    assert thresholds.attributes(vertical, 1) == {"thickness": "thin", "slant": "left"}


def test_cvae_is_seeded_and_samples_in_range():
    from gmv_eval.cvae import ConditionalVAE

    rng = np.random.default_rng(0)
    images, labels = rng.random((40, 64)), np.repeat(np.arange(4), 10)
    samples = []
    for _ in range(2):
        model = ConditionalVAE(classes=4, hidden=32, seed=2)
        log = model.fit(images, labels, epochs=2, seed=5)
        samples.append(model.sample(np.array([0, 3]), seed=1))
    assert log.epochs == 2 and np.isfinite(log.final_loss)
    assert samples[0].shape == (2, 64) and np.array_equal(samples[0], samples[1])
    assert samples[0].min() >= 0.0 and samples[0].max() <= 1.0


def test_demo_data_maker(tmp_path):
    import csv

    from gmv_eval.digits_data import make_digits_eval_data, read_8x8
    from gmv_engine.ingest import read_manifest

    data = make_digits_eval_data(tmp_path, per_class=2, epochs=1, corrupt_fraction=0.1, noise_sigma=0.3, seed=0)
    clean, noisy = read_manifest(data.manifest), read_manifest(data.corrupted_manifest)
    corrupted = set(data.corrupted_ids.read_text().split())
    assert [r.training_id for r in clean] == [r.training_id for r in noisy]
    assert len(corrupted) == round(0.1 * len(clean)) == data.facts["corrupted"]
    for a, b in zip(clean, noisy):
        changed = not np.array_equal(read_8x8(a.path), read_8x8(b.path))
        assert changed == (a.training_id in corrupted)
        assert a.metadata["thickness"] in ("thick", "thin") and a.metadata["slant"] in ("left", "right")
    with data.generated.open() as handle:
        generated = list(csv.DictReader(handle))
    assert len(generated) == 20 and sorted({g["label"] for g in generated}) == [str(c) for c in range(10)]
    assert all((data.generated.parent / g["path"]).is_file() for g in generated)


def test_report_writes_the_results_it_is_given(tmp_path):
    from gmv_eval.report import write_report

    cleansing = C.cleansing({"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0}, {"a"}, 0.25)
    record = {k: (list(map(float, v)) if isinstance(v, np.ndarray) else v) for k, v in cleansing.__dict__.items()}
    efficiency = C.efficiency([0.0123, 0.0125], [{"embed": 0.001, "recall": 0.004}] * 2, 0.02, 2).__dict__
    results = {"command": "gmv eval all", "wall_seconds": 12.0, "machine": {"machine": "x86_64", "cpus": 2},
               "variants": [{"name": "l2 / FLAT", "status": "ran"},
                            {"name": "dreamsim / FLAT", "status": "skipped", "reason": "weights missing"}],
               "c1": {"l2 / FLAT": {"5": 0.98765, "30": 0.5}}, "attributes": ["hat"],
               "c2": {"l2 / FLAT": {"hat": {"5": 0.25, "30": 0.125}}}, "c3": {"l2 / FLAT": record},
               "c4": {"l2 / FLAT": efficiency}, "recall_overlap": {"l2": {"5": 1.0, "30": 0.9}},
               "chance": {"c1": 0.1, "c2": {"hat": 0.4567}}}
    text = write_report(tmp_path, results).read_text()
    for expected in ("98.77%", "50.00%", "12.50%", "weights missing", "| l2 / FLAT | 100.00% | 1.000 |",
                     "12.40", "90.00%", "| *random top k (chance)* | 10.00% | 10.00% |", "45.67%"):
        assert expected in text
    for png in ("c1.png", "c2.png", "c3.png", "c4.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert json.loads((tmp_path / "results.json").read_text())["c1"]["l2 / FLAT"]["5"] == 0.98765


# -- Milvus and the server ----------------------------------------------------------------------
@pytest.mark.e2e
def test_flat_collection_searches_exactly(index):
    from gmv_engine.milvus.index import CollectionInfo, IndexParams, TrainingRow

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(300, 16)).astype(np.float32)
    rows = [TrainingRow(f"flat-{i}", "c", f"{i:064x}") for i in range(300)]
    info = CollectionInfo("offline", "test", 16, "none", 0)
    index.create("eval_flat", info, IndexParams(index_type="FLAT"), expected_rows=300)
    index.insert("eval_flat", rows, vectors, np.zeros((300, 0), np.float32))
    state = index.finish("eval_flat", timeout_s=120)
    assert state["index_type"] == "FLAT" and state["indexed_rows"] == 300
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    exact = np.argsort(((queries[:, None] - vectors[None]) ** 2).sum(-1), axis=1)[:, :20]
    found = index.search("eval_flat", queries, limit=20, nprobe=1)
    assert [[h.training_id for h in hits] for hits in found] == [[f"flat-{i}" for i in row] for row in exact]
    index.drop("eval_flat")


@pytest.mark.e2e
def test_gmv_eval_through_the_server(milvus, digits, tmp_path):
    """`gmv eval all` on a 100-image manifest and 20 held-out digits as the generated set, with
    two variants on exact search: C1, C3 and C4 run through real `gmv serve` processes; C2 is
    skipped because the CSVs share no attribute column."""
    from gmv_engine.datasets import read_heldout
    from gmv_engine.ingest import read_manifest

    training = [row for row in read_manifest(digits.manifest)][::16][:100]
    manifest = write_csv(tmp_path / "train.csv", ["path", "training_id", "contributor_id", "label"],
                         [[r.path, r.training_id, r.contributor_id, r.metadata["label"]] for r in training])
    heldout = read_heldout(digits.heldout)[:20]
    generated = write_csv(tmp_path / "gen.csv", ["path", "generation_id", "label"],
                          [[p, f"g{gid}", label] for p, gid, label in heldout])
    (tmp_path / "corrupted.txt").write_text("\n".join(r.training_id for r in training[:5]))
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "gmv_server.cli", "eval", "all", "--manifest", str(manifest), "--generated",
         str(generated), "--corrupted", str(tmp_path / "corrupted.txt"), "--rerankers", "none,l2",
         "--recall", "FLAT", "--k", "1,5", "--top-k", "5", "--c4-samples", "5", "--out", str(out),
         "--milvus-uri", milvus.uri, "--data-dir", str(tmp_path / "gmv"), "--profile", "offline"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["criteria"] == ["c1", "c3", "c4"] and "c2" in results["skipped_criteria"]
    assert set(results["c1"]) == {"none / FLAT", "l2 / FLAT"}
    # Real digits against real digits: far above chance (0.1) though only 10 per class are indexed.
    assert all(shares["1"] >= 0.6 and shares["5"] > 0.4 for shares in results["c1"].values())
    for record in results["c3"].values():
        assert record["corrupted"] == 5 and record["training_images"] == 100
    for record in results["c4"].values():
        assert record["samples"] == 5 and record["end_to_end_p50_s"] > 0 and record["stage_p50_s"]["recall"] > 0
    assert (out / "report.md").is_file() and (out / "c1.png").is_file()


def test_photo_set_is_seeded_and_labelled(tmp_path):
    from gmv_eval.photos_data import AUGMENTATIONS, build_photo_set

    one = build_photo_set(tmp_path / "a", photos=("astronaut", "coffee", "china"), contributors=2,
                          crops_per_photo=3, queries=16, side=48, seed=3)
    two = build_photo_set(tmp_path / "b", photos=("astronaut", "coffee", "china"), contributors=2,
                          crops_per_photo=3, queries=16, side=48, seed=3)
    assert (one.training, one.queries) == (9, 16)
    rows = list(csv.DictReader(one.manifest.open()))
    assert {r["contributor_id"] for r in rows} == {"contributor-0", "contributor-1"}
    queries = list(csv.DictReader(one.generated.open()))
    assert {q["augmentation"] for q in queries} == set(AUGMENTATIONS)
    assert all(q["source_id"] in {r["training_id"] for r in rows} for q in queries)
    # Relative to the CSV's folder (how manifests resolve paths), so a relative --workdir works.
    assert all(not Path(r["path"]).is_absolute() and (one.manifest.parent / r["path"]).is_file() for r in rows)
    assert all((one.generated.parent / q["path"]).is_file() for q in queries)
    for a, b in zip(sorted((tmp_path / "a" / "generated").iterdir()), sorted((tmp_path / "b" / "generated").iterdir())):
        assert a.read_bytes() == b.read_bytes()  # the same seed makes the same set


def test_photo_scores_follow_the_distances():
    from types import SimpleNamespace as NS

    from gmv_eval.photos import score, shares

    credit = lambda t, c, d: NS(training_id=t, contributor_id=c, distance=d)  # noqa: E731
    results = {"g1": NS(credits=(credit("a", "x", 0.0), credit("b", "x", 0.1), credit("c", "y", 0.1))),
               "g2": NS(credits=(credit("c", "y", 0.0), credit("a", "x", 0.0)))}
    generations = [NS(generation_id="g1", labels={"source_id": "a", "contributor_id": "x", "augmentation": "flip"}),
                   NS(generation_id="g2", labels={"source_id": "a", "contributor_id": "x", "augmentation": "crop"})]
    sharp = score(results, generations, {}, temperature=0.01)
    assert sharp["flip"]["top1_source"] == 1.0 and sharp["flip"]["share_source"] > 0.9999
    assert sharp["crop"]["top1_source"] == 0.0 and sharp["crop"]["share_source"] == pytest.approx(0.5)
    assert sharp["all"]["n"] == 2 and sharp["all"]["top1_contributor"] == 0.5
    flat = score(results, generations, {}, temperature=1.0)
    assert flat["flip"]["share_source"] == pytest.approx(1 / (1 + 2 * np.exp(-0.1)))
    assert shares((), 1.0).size == 0


@pytest.mark.e2e
def test_gmv_eval_photos_through_the_server(milvus, tmp_path):
    """`gmv eval photos` on 4 photographs and 48 queries: plain and aligned ℓ2 served with the
    calibrated temperature; alignment finds mirrored sources that plain ℓ2 misses."""
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "gmv_server.cli", "eval", "photos", "--photos", "4", "--photo-queries", "48",
         "--rerankers", "l2,aligned_l2", "--recall", "FLAT", "--out", str(out), "--milvus-uri", milvus.uri,
         "--data-dir", str(tmp_path / "gmv"), "--profile", "offline"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    photos = json.loads((out / "results.json").read_text())["photos"]
    assert photos["data"]["training_images"] == 4 * 13 and photos["data"]["queries"] == 48
    plain, aligned = photos["variants"]["l2"], photos["variants"]["aligned_l2"]
    assert aligned["temperature_source"] == "calibrated" and 0 < aligned["temperature"] < 0.1
    assert aligned["served"]["flip"]["top1_source"] > plain["served"]["flip"]["top1_source"]
    assert aligned["served"]["all"]["top1_source"] >= 0.8
    # The calibrated T sends more of the credit to the right source than the paper's T = 1.
    assert aligned["served"]["all"]["share_source"] > 2 * aligned["paper_t"]["all"]["share_source"]
    assert "Real photographs: credit to the right source" in (out / "report.md").read_text()
