"""The evaluation report: report.md, results.json and PNG plots, all from one results dict.

Every number written here is read from `results` (what the run measured); the only constants
are the paper's own figures, quoted as such for comparison.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

STAGES = ("decode", "embed", "recall", "rerank", "quality", "credit")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _pct(value) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}%"


def _ms(value) -> str:
    return "–" if value is None else f"{1000 * value:.2f}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = [":--" if a == "l" else "--:" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |",
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _load(machine: dict) -> str:
    start, end = machine.get("load_average_at_start"), machine.get("load_average_at_end")
    return "?" if start is None or end is None else f"{start:.2f} at the start, {end:.2f} at the end"


def _ks(shares: dict) -> list:
    return sorted(shares, key=int)


# -- plots --------------------------------------------------------------------------------------
def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_c1(path: Path, c1: dict, title: str = "C1 identical class") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, shares in c1.items():
        ks = _ks(shares)
        ax.plot([int(k) for k in ks], [100 * shares[k] for k in ks], marker="o", label=name)
    _label(ax, "k (top-k credited training images)", "share with the generation's label (%)", title)
    _save(plt, fig, path)


def plot_c2(path: Path, c2: dict) -> None:
    plt = _plt()
    attributes = sorted({a for per in c2.values() for a in per})
    fig, axes = plt.subplots(1, len(attributes), figsize=(5 * len(attributes), 4), squeeze=False)
    for ax, attribute in zip(axes[0], attributes):
        for name, per in c2.items():
            shares = per[attribute]
            ks = _ks(shares)
            ax.plot([int(k) for k in ks], [100 * shares[k] for k in ks], marker="o", label=name)
        _label(ax, "k", "share with the generation's value (%)", f"C2 identical attribute: {attribute}")
    _save(plt, fig, path)


def plot_c3(path: Path, c3: dict) -> None:
    plt = _plt()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, record in c3.items():
        left.plot([100 * x for x in record["curve_x"]], [100 * y for y in record["curve_y"]], label=name)
    left.plot([0, 100], [0, 100], color="grey", linestyle=":", label="random order")
    bottom = 100 * next(iter(c3.values()))["bottom_fraction"]
    left.axvline(bottom, color="grey", linewidth=0.8)
    _label(left, "share of training images inspected, lowest value first (%)", "share of corrupted images found (%)",
           "C3 data cleansing: corrupted images found from the bottom")
    bins = [i / 20 for i in range(21)]
    for name, record in c3.items():
        right.hist([100 * p for p in record["percentiles"]], bins=[100 * b for b in bins], histtype="step",
                   linewidth=1.5, label=name)
    _label(right, "value percentile of each corrupted image (0 = lowest value)", "corrupted images",
           "where the corrupted images fall in the value ranking")
    _save(plt, fig, path)


def plot_c4(path: Path, c4: dict) -> None:
    plt = _plt()
    names = list(c4)
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(names) + 1.8))
    lefts = [0.0] * len(names)
    parts = [*STAGES, "outside the pipeline (RPC, queue)"]
    for part in parts:
        widths = []
        for name in names:
            record = c4[name]
            value = (record["stage_p50_s"].get(part, 0.0) if part in STAGES
                     else max(record["outside_pipeline_p50_s"], 0.0))
            widths.append(1000 * value)
        ax.barh(names, widths, left=lefts, label=part)
        lefts = [l + w for l, w in zip(lefts, widths)]
    ax.scatter([1000 * c4[n]["end_to_end_p50_s"] for n in names], names, color="black", marker="|", s=200,
               zorder=3, label="end to end (median)")
    ax.set_xlabel("milliseconds per generated sample (medians)")
    ax.set_title("C4 efficiency: one generation at a time, through the server")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="x", alpha=0.3)
    _save(plt, fig, path)


def image_grid(path: Path, data, per_class: int = 3, corrupted: int = 20) -> None:
    """Generated samples (per class) and corrupted training images of the demo data."""
    from PIL import Image

    plt = _plt()
    with Path(data.generated).open(newline="") as handle:
        generated = list(csv.DictReader(handle))
    classes = sorted({row["label"] for row in generated}, key=int)
    picks = [[row for row in generated if row["label"] == c][:per_class] for c in classes]
    bad = set(Path(data.corrupted_ids).read_text().split())
    with Path(data.corrupted_manifest).open(newline="") as handle:
        noisy = [row for row in csv.DictReader(handle) if row["training_id"] in bad][:corrupted]
    columns = max(len(classes), 10)
    rows = per_class + math.ceil(len(noisy) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.8, rows * 0.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for column, chosen in enumerate(picks):
        for row, record in enumerate(chosen):
            axes[row][column].imshow(Image.open(Path(data.generated).parent / record["path"]))
            if row == 0:
                axes[row][column].set_title(f"class {record['label']}", fontsize=7)
    for i, record in enumerate(noisy):
        ax = axes[per_class + i // columns][i % columns]
        ax.imshow(Image.open(Path(data.corrupted_manifest).parent / record["path"]))
    fig.suptitle(f"top {per_class} rows: conditional-VAE samples; below: corrupted training images (C3)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the Markdown -------------------------------------------------------------------------------
def write_report(out: str | Path, results: dict) -> Path:
    """Write report.md, results.json and the plots of the criteria that ran into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True, default=str))
    setup, machine = results.get("setup", {}), results.get("machine", {})
    lines = ["# GMV evaluation: the GMValuator criteria C1–C4", ""]
    lines += [f"Command: `{results.get('command', 'gmv eval')}`", "",
              f"Ran in {results.get('wall_seconds', float('nan')):.0f} s on {machine.get('machine', '?')} with "
              f"{machine.get('cpus', '?')} CPUs, device `{machine.get('device', '?')}` (torch {machine.get('torch', '?')}, "
              f"embedded Milvus {machine.get('milvus', '?')}); 1-minute load average {_load(machine)}. Every figure "
              "below was measured by this run; `results.json` holds them all.", ""]
    lines += _setup_section(results, setup)
    if results.get("c1"):
        plot_c1(out / "c1.png", results["c1"])
        lines += ["## C1 identical class", "",
                  "Share of each generation's top-k credited training images that have the class the generation "
                  "was conditioned on, averaged over generations.", ""]
        lines += _shares_table(results["c1"], results.get("chance", {}).get("c1"))
        lines += ["Paper, MNIST with a β-VAE (Table II): k=30 no re-rank 86.41%, ℓ2 87.76%, LPIPS 88.78%, "
                  "DreamSim 88.78%; k=50: 85.13%, 86.95%, 88.19%, 88.05%.", "", "![C1](c1.png)", ""]
    if results.get("c2"):
        plot_c2(out / "c2.png", results["c2"])
        lines += ["## C2 identical attributes", "",
                  "The same share for each labelled attribute column.", ""]
        for attribute in results.get("attributes", []):
            lines += [f"**{attribute}**", ""]
            lines += _shares_table({name: per[attribute] for name, per in results["c2"].items()},
                                   results.get("chance", {}).get("c2", {}).get(attribute))
        lines += ["![C2](c2.png)", ""]
    if results.get("c3"):
        plot_c3(out / "c3.png", results["c3"])
        lines += _c3_section(results["c3"])
    if results.get("c4"):
        plot_c4(out / "c4.png", results["c4"])
        lines += _c4_section(results["c4"], setup)
    if results.get("recall_overlap"):
        lines += ["## Recall: IVF_PQ against exact FLAT search", "",
                  "Mean share of the exact search's top-k credited training images that the IVF_PQ variant also "
                  "credits in its top k (same re-ranker, same generations).", ""]
        ks = _ks(next(iter(results["recall_overlap"].values())))
        lines += _table(["re-ranker", *[f"k={k}" for k in ks]],
                        [[name, *[_pct(shares[k]) for k in ks]] for name, shares in results["recall_overlap"].items()])
    if results.get("photos"):
        from .photos import photos_section

        lines += photos_section(results["photos"])
    if results.get("samples_png"):
        lines += ["## The data", "", f"![samples]({results['samples_png']})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _setup_section(results: dict, setup: dict) -> list[str]:
    lines = ["## Setup", ""]
    data = results.get("data", {})
    if data.get("source") == "demo":
        clean, noisy = data.get("cvae_clean", {}), data.get("cvae_corrupted", {})
        lines += [f"- Data: scikit-learn's digits (UCI), the {data['training_images']}-image training split as "
                  f"32x32 RGB. Generated: {clean.get('samples')} samples ({data['per_class']} per class) of a "
                  f"conditional VAE trained on it for {clean.get('epochs')} epochs in {clean.get('seconds', 0):.1f} s; "
                  f"a logistic-regression classifier fitted on the training split assigns "
                  f"{_pct(clean.get('classifier_agreement'))} of them the class they were conditioned on.",
                  f"- C3: a copy of the split with {data['corrupted']} images ({100 * data['corrupt_fraction']:.0f}%) "
                  f"corrupted by Gaussian noise (σ = {data['noise_sigma']} on pixels in [0, 1]), and "
                  f"{noisy.get('samples')} samples of a second VAE trained on that copy (classifier agreement "
                  f"{_pct(noisy.get('classifier_agreement'))}), as the paper trains its generator on noisy MNIST.",
                  f"- Seed {data.get('seed')}; data made in {data.get('seconds', 0):.0f} s."]
    else:
        lines += [f"- Data: training manifest `{data.get('manifest')}`, generated `{data.get('generated')}`."]
    if setup:
        lines += [f"- Pipeline: profile `{setup['profile']}` (recall encoder `{setup['encoder']}`, "
                  f"{setup['encoder_dim']}-d; quality `{setup['quality']}`), K' = {setup['recall_k']} recalled, "
                  f"nprobe {setup['nprobe']}, temperature {setup['temperature']}; C1/C2 request the top "
                  f"{max(setup['ks'])}; C3 values and C4 use top-k = {setup['top_k']}."]
        if setup.get("profile_note"):
            lines += [f"- {setup['profile_note']}"]
    skipped = results.get("skipped_criteria", {})
    for criterion, reason in skipped.items():
        lines += [f"- {criterion.upper()} not run: {reason}."]
    lines += ["", "Variants (re-ranker / recall index):", ""]
    lines += _table(["variant", "status", "why"],
                    [[v["name"], v["status"], v.get("reason", "") if v["status"] == "skipped" else ""]
                     for v in results.get("variants", [])], "lll")
    if results.get("ingest"):
        lines += ["Collections built for this run (ingest = embed, insert, flush and index build):", ""]
        lines += _table(["collection", "rows", "index", "seconds"],
                        [[name, str(r["rows"]), f"{r['index'].get('index_type')} {r['index'].get('params') or ''}",
                          f"{r['seconds']:.1f}"] for name, r in results["ingest"].items()], "lrll")
    return lines


def _shares_table(per_variant: dict, chance: float | None = None) -> list[str]:
    ks = _ks(next(iter(per_variant.values())))
    rows = [[name, *[_pct(shares[k]) for k in ks]] for name, shares in per_variant.items()]
    if chance is not None:
        rows.append(["*random top k (chance)*", *[_pct(chance)] * len(ks)])
    return _table(["variant", *[f"k={k}" for k in ks]], rows)


def _c3_section(c3: dict) -> list[str]:
    first = next(iter(c3.values()))
    bottom = f"{100 * first['bottom_fraction']:.0f}%"
    lines = ["## C3 data cleansing", "",
             f"Data value φ_i = Σ_j V(x_i, x̂_j), summed from the credits the server streamed back for every "
             f"generation. Training images are ranked by φ from the lowest; {first['corrupted']} of "
             f"{first['training_images']} are corrupted. Images with equal φ (most often 0: in no generation's top k) "
             "have no order among themselves, so each figure is its expectation over a random order within ties. "
             f"A valuation blind to corruption finds {bottom} of them in the bottom {bottom}, and has AUC 0.5 "
             "(AUC: the probability that a corrupted image is valued below a clean one, ties counting one half; "
             "1 = every corrupted image below every clean one). When more than the bottom share of all images "
             "tie at φ = 0, that share is capped by the ties: read it with the φ = 0 columns and the AUC.", ""]
    lines += _table(
        ["variant", f"corrupted in bottom {bottom}", "AUC", "mean percentile (0 = lowest)", "corrupted with φ = 0",
         "all with φ = 0", "mean φ corrupted", "mean φ clean"],
        [[name, _pct(r["bottom_share"]), f"{r['auc']:.3f}", f"{r['mean_percentile']:.3f}", _pct(r["zero_value_share"]),
          _pct(r["zero_value_share_all"]), f"{r['mean_value_corrupted']:.4f}", f"{r['mean_value_clean']:.4f}"]
         for name, r in c3.items()])
    lines += ["Paper (Figure 5, noisy MNIST, 10,000 generations): every noisy image valued lower by GMValuator than by "
              "IF4GAN, and re-ranking better than none; it gives no single number to compare.", "",
              "![C3](c3.png)", ""]
    return lines


def _c4_section(c4: dict, setup: dict) -> list[str]:
    samples = next(iter(c4.values()))["samples"]
    lines = ["## C4 efficiency", "",
             f"How each number was measured: **end to end** is the client's wall time for one `Attribute` call "
             f"through `gmv serve` (gRPC on loopback, PNG bytes in, credits streamed back), {samples} generations one "
             f"after another, the server's batcher waiting up to {setup.get('max_queue_delay_ms')} ms for company; "
             "**streamed** is the wall time of one `AttributeStream` call carrying the same generations, divided by "
             "their number (the server batches them). The **stage** columns come from the engine's StageTimes over "
             "the same generations run one at a time in-process against the same collection (the server's per-stage "
             "figures are not reachable per request), as medians over the generations; **outside** = the end-to-end "
             "median minus the stage medians summed: RPC, serialisation and the batching wait. Milliseconds per "
             "generated sample; caches start cold.", ""]
    header = ["variant", "end to end p50", "mean", "p95", "streamed", *STAGES, "outside"]
    rows = []
    for name, r in c4.items():
        rows.append([name, _ms(r["end_to_end_p50_s"]), _ms(r["end_to_end_mean_s"]), _ms(r["end_to_end_p95_s"]),
                     _ms(r["streamed_s"]), *[_ms(r["stage_p50_s"].get(s, 0.0)) for s in STAGES],
                     _ms(r["outside_pipeline_p50_s"])])
    lines += _table(header, rows)
    lines += ["Stage means (ms per sample), for the record; on a shared machine a few slow calls pull them up:", ""]
    lines += _table(["variant", *STAGES],
                    [[name, *[_ms(r["stage_mean_s"].get(s, 0.0)) for s in STAGES]] for name, r in c4.items()])
    lines += ["Paper, MNIST, one RTX 3080 (Table IV), seconds per sample: no re-rank 0.250, ℓ2 0.339, LPIPS 0.477, "
              "DreamSim 1.709.", "", "![C4](c4.png)", ""]
    return lines
