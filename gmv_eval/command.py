"""`gmv eval c1|c2|c3|c4|all`: the paper's criteria, run through the real server.

For each pipeline variant (re-ranker none / l2 / lpips / dreamsim, whose weights are present;
recall over IVF_PQ or exact FLAT search) it builds the training collection on Milvus, starts
`gmv serve` on it as a subprocess, and attributes the generated images through the client
SDK, as a model-serving stack would. The criteria are computed from the credits the server
streams back (criteria.py); C4's per-stage split comes from the same pipeline run
in-process (StageTimes), since the server reports no per-request stage times. The report
(Markdown, PNG plots, results.json) is written by report.py.

`--demo` makes the real-data run of `make eval`: scikit-learn's digits, a class-conditional
VAE trained on them for the generated images, and a noise-corrupted copy for C3.

The CLI calls `register(commands)` to add the `eval` sub-command and `run(args)` to run it.
Registering imports nothing heavy; `run` needs the `eval` extra (matplotlib, scikit-learn).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from gmv_engine.errors import GMVError
from gmv_engine.settings import DEFAULTS, Settings, add_config_flag, add_flags, from_args

log = logging.getLogger("gmv.eval")

CRITERIA = ("c1", "c2", "c3", "c4")
RERANKERS = ("none", "l2", "aligned_l2", "lpips", "dreamsim")
RECALLS = ("IVF_PQ", "FLAT")
EXIT_OK, EXIT_FAILED = 0, 2
TEMPERATURE = DEFAULTS.temperature  # T in exp(-d/T): the default, each collection's calibrated T
# Its own Milvus folder and a free port, so an eval never collides with `gmv demo` or a serve.
EVAL_DATA_DIR = ".gmv/eval"
EXTRA_HINT = "pip install -e '.[eval]'"


def _csv_list(cast=str):
    def parse(text: str):
        items = [cast(part.strip()) for part in text.split(",") if part.strip()]
        if not items:
            raise argparse.ArgumentTypeError("give at least one value")
        return items
    return parse


def register(subparsers) -> None:
    """Add the `eval` sub-command to `subparsers` (the CLI's add_subparsers()); `run` runs it."""
    parser = subparsers.add_parser(
        "eval", help="the paper's criteria C1-C4 over your data, through the server, with a report",
        description="Evaluate attribution with the GMValuator paper's criteria: C1 identical class, C2 identical "
                    "attributes, C3 data cleansing, C4 efficiency. Compares re-rankers and IVF_PQ vs exact search.")
    parser.add_argument("criterion", choices=[*CRITERIA, "photos", "all"],
                        help="c1..c4, photos (credit to the right source on real photographs, built here), or all "
                             "(photos too with --demo)")
    data = parser.add_argument_group("data")
    data.add_argument("--manifest", help="training CSV: path,training_id,contributor_id and label/attribute columns")
    data.add_argument("--generated", help="generated images CSV: path,generation_id and label/attribute columns")
    data.add_argument("--class-column", default="label", help="the class column for C1 (default label)")
    data.add_argument("--attributes", type=_csv_list(),
                      help="attribute columns for C2 (default: every column both CSVs share, other than the class)")
    data.add_argument("--corrupted", help="C3: file of corrupted training ids, one per line")
    data.add_argument("--c3-manifest", help="C3: training CSV holding the corrupted images (default --manifest)")
    data.add_argument("--c3-generated", help="C3: generated images CSV (default --generated)")
    data.add_argument("--demo", action="store_true",
                      help="make the data: scikit-learn digits, a conditional VAE's samples, a noise-corrupted copy")
    data.add_argument("--per-class", type=int, default=100, help="demo: generated images per class (default 100)")
    data.add_argument("--corrupt-fraction", type=float, default=0.1, help="demo: share of training images corrupted")
    data.add_argument("--noise-sigma", type=float, default=0.3, help="demo: Gaussian noise sigma, pixels in [0, 1]")
    data.add_argument("--epochs", type=int, default=150, help="demo: VAE training epochs (default 150)")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--photos", type=int, default=15, dest="photo_count",
                      help="photos: how many bundled photographs to crop (default 15, at most 22)")
    data.add_argument("--photo-queries", type=int, default=600, help="photos: augmented queries (default 600)")
    data.add_argument("--crops-per-photo", type=int, default=13, help="photos: training crops per photograph (default 13)")
    run = parser.add_argument_group("evaluation")
    run.add_argument("--k", type=_csv_list(int), default=[5, 10, 30, 50], help="C1/C2 top-k list (default 5,10,30,50)")
    run.add_argument("--top-k", type=int, default=DEFAULTS.top_k,
                     help=f"credits kept per generation for C3 values and C4 (default {DEFAULTS.top_k})")
    run.add_argument("--rerankers", type=_csv_list(), default=list(RERANKERS),
                     help="re-rank variants (default none,l2,lpips,dreamsim; those without weights are skipped)")
    run.add_argument("--recall", type=_csv_list(str.upper), default=list(RECALLS), help="IVF_PQ,FLAT (default both)")
    # dest eval_profile: "auto" is not a registered profile, so it stays out of the settings.
    run.add_argument("--profile", dest="eval_profile", default="auto", choices=["auto", "paper", "offline"],
                     help="recall encoder and quality metric: auto = paper when its weights are present")
    run.add_argument("--quality", help="quality metric for q_j (default: the profile's)")
    run.add_argument("--recall-k", type=int, default=DEFAULTS.recall_k,
                     help=f"K' candidates recalled (default {DEFAULTS.recall_k})")
    run.add_argument("--nprobe", type=int, default=DEFAULTS.nprobe,
                     help=f"IVF lists searched (default {DEFAULTS.nprobe})")
    run.add_argument("--c4-samples", type=int, default=100, help="generations timed one at a time (default 100)")
    run.add_argument("--bottom-fraction", type=float, default=0.1, help="C3: the bottom share of the ranking (0.1)")
    run.add_argument("--max-queue-delay-ms", type=float, default=DEFAULTS.max_queue_delay_ms,
                     help=f"the server's batching delay (default {DEFAULTS.max_queue_delay_ms:g})")
    run.add_argument("--out", default="eval-report", help="report folder (default eval-report)")
    run.add_argument("--workdir", help="demo data and server logs (default DATA_DIR/work)")
    add_config_flag(parser)
    add_flags(parser, groups=("milvus", "models"))
    # The flags stay None when not given (so a config file or GMV_* variable still counts);
    # `_settings` supplies the eval's own folder and a free port when no source names one.
    for action in parser._actions:
        if action.dest == "data_dir":
            action.help = (f"where the eval's embedded Milvus keeps its data (default {EVAL_DATA_DIR}, so an eval "
                           "never touches the collections of `gmv demo` or a serve; env GMV_DATA_DIR)")
        elif action.dest == "milvus_port":
            action.help = "port of the embedded Milvus' proxy (default: a free port; env GMV_MILVUS_PORT)"


def _settings(args) -> Settings:
    """The Milvus and model settings: --config, GMV_* variables, then flags, except that with
    none of them naming a data dir or Milvus port the eval uses EVAL_DATA_DIR and a free port."""
    settings = from_args(args)
    if args.data_dir is None and settings.data_dir == DEFAULTS.data_dir:
        settings = settings.with_(data_dir=EVAL_DATA_DIR)
    if args.milvus_port is None and settings.milvus_port == DEFAULTS.milvus_port:
        settings = settings.with_(milvus_port=0)
    return settings


def _require_extra(demo: bool) -> None:
    """The report's plots need matplotlib and the demo's data scikit-learn: say so up front,
    before Milvus starts or anything is built."""
    import importlib.util

    needed = [("matplotlib", "matplotlib")] + ([("sklearn", "scikit-learn"), ("skimage", "scikit-image")] if demo else [])
    missing = [name for module, name in needed if importlib.util.find_spec(module) is None]
    if missing:
        raise GMVError(f"gmv eval needs {' and '.join(missing)} (the eval extra): {EXTRA_HINT}")


# -- inputs -------------------------------------------------------------------------------------
@dataclass
class Generation:
    generation_id: str
    path: Path
    image: bytes
    labels: dict[str, str]


@dataclass
class DataSet:
    """One training manifest and the generated images attributed against it."""

    key: str  # "main" or "c3"
    manifest: Path
    generated_csv: Path
    training: dict[str, dict[str, str]]  # training_id -> metadata columns
    generations: list[Generation]
    rows: list = field(repr=False, default_factory=list)  # ingest.SourceRow


def read_generated(path: Path) -> list[Generation]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = {"path", "generation_id"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path} lacks column(s) {', '.join(sorted(missing))}; it needs path,generation_id "
                             "and label or attribute columns")
        out, seen = [], set()
        for record in reader:
            image_path = Path(record["path"])
            image_path = image_path if image_path.is_absolute() else path.parent / image_path
            generation_id = record["generation_id"].strip()
            if not generation_id or generation_id in seen:
                raise ValueError(f"{path} line {reader.line_num}: generation_id empty or repeated")
            seen.add(generation_id)
            try:
                image = image_path.read_bytes()
            except OSError as exc:
                raise ValueError(f"{path} line {reader.line_num}: cannot read {image_path}: {exc.strerror}") from None
            labels = {k: (v or "").strip() for k, v in record.items() if k not in ("path", "generation_id") and k}
            out.append(Generation(generation_id, image_path, image, labels))
    if not out:
        raise ValueError(f"{path} lists no generated images")
    return out


def load_dataset(key: str, manifest: Path, generated: Path) -> DataSet:
    from gmv_engine.ingest import read_manifest

    rows = read_manifest(manifest)
    training = {row.training_id: row.metadata for row in rows}
    return DataSet(key, manifest, generated, training, read_generated(generated), rows)


# -- variants -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    reranker: str
    recall: str

    @property
    def name(self) -> str:
        return f"{self.reranker} / {self.recall}"


def available_rerankers(names, device: str, create: Callable | None = None) -> tuple[dict, dict[str, str]]:
    """Build each re-ranker once; those whose pretrained weights are missing are skipped with
    the reason (the engine's MissingWeightsError: never random weights)."""
    from gmv_engine.errors import MissingWeightsError
    from gmv_engine.rerankers import create_reranker

    create = create or create_reranker
    built, skipped = {}, {}
    for name in names:
        if name not in RERANKERS:
            raise ValueError(f"unknown re-ranker '{name}'; choose from {', '.join(RERANKERS)}")
        try:
            built[name] = create(name, device)
        except MissingWeightsError as exc:
            skipped[name] = str(exc)
    return built, skipped


def _resolve_profile(requested: str, device: str, quality_override: str | None):
    """(profile, encoder, quality scorer, note): `auto` takes the paper profile only when its
    encoder and quality weights load, and says why not otherwise."""
    from gmv_engine.encoders import create_encoder
    from gmv_engine.errors import MissingWeightsError
    from gmv_engine.profiles import get_profile
    from gmv_engine.quality import create_quality

    note = ""
    if requested in ("auto", "paper"):
        paper = get_profile("paper")
        try:
            encoder = create_encoder(paper.encoder, device)
            return paper, encoder, create_quality(quality_override or paper.quality, device), note
        except MissingWeightsError as exc:
            if requested == "paper":
                raise
            note = f"paper profile unavailable, so the offline one ran: {exc}"
    offline = get_profile("offline")
    return (offline, create_encoder(offline.encoder, device),
            create_quality(quality_override or offline.quality, device), note)


# -- the server ---------------------------------------------------------------------------------
@contextlib.contextmanager
def served(milvus_uri: str, collection: str, reranker: str, settings: dict, device: str, data_dir: Path,
           log_path: Path, milvus_token: str = "", model_dir: str = "", feature_store: str | None = None
           ) -> Iterator[object]:
    """`gmv serve` on `collection` as a subprocess; yields a ready GMVClient, then SIGTERMs it.
    feature_store: the one the collection was built with (TrainingIndex.feature_store)."""
    from gmv_client import GMVClient
    from gmv_engine.milvus.embedded import free_port

    port = free_port()
    command = [sys.executable, "-m", "gmv_server.cli", "serve", "--collection", collection, "--host", "127.0.0.1",
               "--port", str(port), "--milvus-uri", milvus_uri, "--device", device, "--reranker", reranker,
               "--data-dir", str(data_dir)]
    if model_dir:
        command += ["--model-dir", model_dir]
    if feature_store:
        command += ["--feature-store", feature_store]
    for flag, value in settings.items():
        command += [f"--{flag.replace('_', '-')}", str(value)]
    env = dict(os.environ)
    if milvus_token:  # a secret: by the environment, not on a command line `ps` shows
        env["GMV_MILVUS_TOKEN"] = milvus_token
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log_file:
        server = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        client = GMVClient(f"127.0.0.1:{port}", timeout_s=900.0)
        try:
            client.wait_until_ready(timeout_s=300.0)
            yield client
        finally:
            client.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if server.returncode not in (0, -signal.SIGTERM):
        raise RuntimeError(f"gmv serve exited with {server.returncode}; see {log_path}")


STREAM_WINDOW = 128  # generations per AttributeStream call: under the server's queue limit (256)


def stream(client, generations: list[Generation], top_k: int) -> tuple[dict, float]:
    """All generations over AttributeStream calls of STREAM_WINDOW each, as a caller that
    respects the server's queue would: {generation_id: Attribution}, wall seconds."""
    start = time.perf_counter()
    results = {}
    for first in range(0, len(generations), STREAM_WINDOW):
        window = generations[first : first + STREAM_WINDOW]
        # record=False: an evaluation is not a royalty event, and every variant reuses the same
        # generation ids, which a recording server would answer from its ledger, uncomputed.
        results.update((r.generation_id, r) for r in client.attribute_stream([(g.generation_id, g.image, top_k)
                                                                               for g in window], record=False))
    seconds = time.perf_counter() - start
    failed = [r for r in results.values() if r.error_code]
    if failed:  # a stream reports a failed generation as a result; an evaluation needs them all
        raise RuntimeError(f"{len(failed)} generation(s) failed, e.g. {failed[0].generation_id}: "
                           f"{failed[0].error_code}: {failed[0].error_message}")
    replayed = [gid for gid, r in results.items() if r.ledger == "replayed"]
    if replayed:  # a replay is the ledger's record, not this variant's computation
        raise RuntimeError(f"the server replayed {len(replayed)} generation(s) from its ledger, e.g. {replayed[0]}")
    missing = [g.generation_id for g in generations if g.generation_id not in results]
    if missing:
        raise RuntimeError(f"the server returned no result for {len(missing)} generation(s), e.g. {missing[0]}")
    return results, seconds


def one_at_a_time(client, generations: list[Generation], top_k: int) -> list[float]:
    """End-to-end seconds of each generation attributed alone (unary call, then the next)."""
    latencies = []
    for g in generations:
        start = time.perf_counter()
        client.attribute(g.image, generation_id=g.generation_id, top_k=top_k, record=False)
        latencies.append(time.perf_counter() - start)
    return latencies


def stage_times(index, collection: str, settings: Settings, generations: list[Generation], encoder, reranker,
                quality, device: str = "cpu") -> list[dict[str, float]]:
    """The same pipeline in-process, one generation per call: seconds per stage of each call."""
    from gmv_engine.pipeline import Attributor

    attributor = Attributor(index, collection, settings, device=device, encoder=encoder, reranker=reranker,
                            quality=quality)
    attributor.attribute_bytes([generations[0].image])  # warm-up, as the server's
    per_call = []
    for g in generations:
        before = dict(attributor.times.seconds)
        attributor.attribute_bytes([g.image])
        per_call.append({stage: attributor.times.seconds[stage] - before[stage] for stage in before})
    return per_call


# -- the run ------------------------------------------------------------------------------------
def _ranked(result) -> list[str]:
    return [c.training_id for c in sorted(result.credits, key=lambda c: c.rank)]


def _machine(device: str) -> dict:
    import importlib.metadata as md

    def version(package: str) -> str:
        try:
            return md.version(package)
        except md.PackageNotFoundError:
            return "-"

    return {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(), "device": device,
            "python": platform.python_version(), "torch": version("torch"), "milvus": version("milvus"),
            "pymilvus": version("pymilvus")}


@dataclass
class Inputs:
    criteria: list[str]  # those that will run
    groups: list[tuple[DataSet, list[str]]]  # each distinct training set and the criteria keys it serves
    corrupted: set[str]
    attributes: list[str]
    demo: object | None  # digits_data.EvalData


def _inputs(args, results: dict, workdir: Path) -> Inputs:
    """Read (or, with --demo, make) the data, and settle which criteria can run on it."""
    wanted = list(CRITERIA) if args.criterion == "all" else [args.criterion]
    skipped = results["skipped_criteria"]
    demo = None
    if args.demo:
        from .digits_data import make_digits_eval_data

        start = time.perf_counter()
        demo = make_digits_eval_data(workdir / "data", per_class=args.per_class, corrupt_fraction=args.corrupt_fraction,
                                     noise_sigma=args.noise_sigma, epochs=args.epochs, seed=args.seed)
        results["data"] = {**demo.facts, "seconds": time.perf_counter() - start, "source": "demo"}
        manifest, generated = demo.manifest, demo.generated
        c3_manifest, c3_generated, corrupted_file = demo.corrupted_manifest, demo.corrupted_generated, demo.corrupted_ids
        log.info("demo data in %s (%.0f s)", demo.root, results["data"]["seconds"])
    else:
        if not args.manifest or not args.generated:
            raise ValueError("--manifest and --generated are required (or --demo)")
        manifest, generated = Path(args.manifest), Path(args.generated)
        c3_manifest = Path(args.c3_manifest) if args.c3_manifest else manifest
        c3_generated = Path(args.c3_generated) if args.c3_generated else generated
        corrupted_file = Path(args.corrupted) if args.corrupted else None
        results["data"] = {"source": "user", "manifest": str(manifest), "generated": str(generated)}

    def skip(criterion: str, reason: str) -> None:
        if args.criterion == criterion:  # asked for by name: an error, not a skip
            raise ValueError(f"{criterion.upper()} cannot run: {reason}")
        skipped[criterion] = reason
        wanted.remove(criterion)

    main = load_dataset("main", manifest, generated) if {"c1", "c2", "c4"} & set(wanted) else None
    attributes: list[str] = []
    if main:
        own_columns = set().union(*(g.labels for g in main.generations))
        train_columns = set().union(*main.training.values())
        if "c1" in wanted and args.class_column not in own_columns:
            skip("c1", f"no '{args.class_column}' column in {generated}")
        if "c1" in wanted and args.class_column not in train_columns:
            raise ValueError(f"C1 needs a '{args.class_column}' column in the training manifest {manifest}")
        attributes = args.attributes or sorted((own_columns & train_columns) - {args.class_column})
        lacking = [a for a in attributes if a not in own_columns or a not in train_columns]
        if "c2" in wanted and lacking:
            raise ValueError(f"attribute column(s) {', '.join(lacking)} must be in both CSVs")
        if "c2" in wanted and not attributes:
            skip("c2", "the generated CSV and the manifest share no attribute column")
        if ({"c1", "c2"} & set(wanted)) and max(args.k) > len(main.training):
            raise ValueError(f"k={max(args.k)} is more than the {len(main.training)} training images")
    corrupted: set[str] = set()
    c3 = None
    if "c3" in wanted:
        if corrupted_file is None:
            skip("c3", "no --corrupted list of corrupted training ids")
        else:
            corrupted = {line.strip() for line in corrupted_file.read_text().splitlines() if line.strip()}
            same = main is not None and (c3_manifest, c3_generated) == (manifest, generated)
            c3 = main if same else load_dataset("c3", c3_manifest, c3_generated)
    if not wanted:
        raise ValueError("nothing to evaluate: " + "; ".join(skipped.values()))
    # One server per (variant, distinct training set): C3's may be the main one.
    groups: list[tuple[DataSet, list[str]]] = []
    if main and {"c1", "c2", "c4"} & set(wanted):
        groups.append((main, ["main"]))
    if c3 is not None:
        if groups and c3 is main:
            groups[0][1].append("c3")
        else:
            groups.append((c3, ["c3"]))
    return Inputs(wanted, groups, corrupted, attributes, demo)


def run(args) -> int:
    """`gmv eval`, parsed by the parser `register` added: 0 when the report is written."""
    unknown = [r for r in args.recall if r not in RECALLS]
    if unknown:
        raise ValueError(f"unknown recall '{unknown[0]}'; choose from {', '.join(RECALLS)}")
    ks = sorted(set(args.k))
    if min(ks) < 1 or max(ks) > args.recall_k or not 1 <= args.top_k <= args.recall_k:
        raise ValueError(f"every k and --top-k must lie between 1 and --recall-k={args.recall_k}")
    settings = _settings(args)
    _require_extra(args.demo or args.criterion == "photos")

    from gmv_engine.milvus.embedded import free_port, open_index
    from gmv_engine.models import pick_device

    from . import criteria as C
    from .report import image_grid, write_report

    started = time.perf_counter()
    out = Path(args.out)
    data_dir = Path(settings.data_dir)
    workdir = Path(args.workdir) if args.workdir else data_dir / "work"
    device = pick_device(settings.device)
    results: dict = {"command": "gmv " + " ".join(sys.argv[1:]), "skipped_criteria": {}, "data": {},
                     "c1": {}, "c2": {}, "c3": {}, "c4": {}, "chance": {}, "ingest": {}, "recall_overlap": {}}
    photos = args.criterion == "photos" or (args.criterion == "all" and args.demo)
    inputs = (_inputs(args, results, workdir) if args.criterion != "photos"
              else Inputs([], [], set(), [], None))
    results["criteria"], results["attributes"] = inputs.criteria + (["photos"] if photos else []), inputs.attributes

    profile, encoder, quality, profile_note = _resolve_profile(args.eval_profile, device, args.quality)
    rerankers, skipped = available_rerankers(args.rerankers, device)
    for name, reason in skipped.items():
        log.warning("re-ranker %s skipped: %s", name, reason)
    variants = [Variant(r, recall) for r in args.rerankers if r in rerankers for recall in args.recall]
    if not variants:
        raise ValueError("no variant can run: " + "; ".join(skipped.values()))
    results["variants"] = [{"name": v.name, "reranker": v.reranker, "recall": v.recall, "status": "ran"}
                           for v in variants]
    results["variants"] += [{"name": f"{r} / {', '.join(args.recall)}", "reranker": r, "recall": ", ".join(args.recall),
                             "status": "skipped", "reason": skipped[r]} for r in args.rerankers if r in skipped]
    # The 'none' variant queries a collection built for a real re-ranker (it ignores the
    # stored features); only when it is alone does it get a collection of its own.
    feature_reranker = next((name for name in rerankers if name != "none"), "none")
    main = next((d for d, keys in inputs.groups if "main" in keys), None)
    c4_samples = min(args.c4_samples, len(main.generations)) if main else 0
    results["setup"] = {
        "profile": profile.name, "profile_note": profile_note, "encoder": encoder.name, "encoder_dim": encoder.dim,
        "quality": quality.name, "recall_k": args.recall_k, "nprobe": args.nprobe, "top_k": args.top_k, "ks": ks,
        "c4_samples": c4_samples, "temperature": TEMPERATURE, "max_queue_delay_ms": args.max_queue_delay_ms,
        "bottom_fraction": args.bottom_fraction, "corrupted": len(inputs.corrupted),
        "training_images": {"+".join(keys): len(d.training) for d, keys in inputs.groups},
        "generated_images": {"+".join(keys): len(d.generations) for d, keys in inputs.groups},
    }
    results["machine"] = _machine(device)
    results["machine"]["load_average_at_start"] = os.getloadavg()[0]  # a shared machine skews C4: say how busy
    server_settings = {"recall_k": args.recall_k, "nprobe": args.nprobe, "quality": quality.name,
                       "temperature": TEMPERATURE, "max_queue_delay_ms": args.max_queue_delay_ms}
    wanted = inputs.criteria

    with open_index(settings.milvus_uri, data_dir, settings.milvus_port or free_port(), settings.milvus_token,
                    timeout_s=settings.milvus_timeout_s, feature_store=settings.feature_store or None,
                    feature_cache_dir=settings.resolved_feature_cache_dir()) as index:
        collections = {
            (dataset.key, name, recall): _build(index, results, dataset, recall, rerankers[name], profile.name, encoder)
            for dataset, _ in inputs.groups for recall in args.recall
            for name in sorted({feature_reranker} | (set(rerankers) - {"none"}))
        }
        ranked_by_variant: dict[Variant, list[list[str]]] = {}
        for variant in variants:
            stored = variant.reranker if variant.reranker != "none" else feature_reranker
            for dataset, keys in inputs.groups:
                collection = collections[(dataset.key, stored, variant.recall)]
                log.info("variant %s on %s: starting gmv serve", variant.name, collection)
                with served(index.uri, collection, variant.reranker, server_settings, device, data_dir,
                            workdir / "logs" / f"serve-{collection}-{variant.reranker}.log",
                            milvus_token=settings.milvus_token, model_dir=settings.model_dir,
                            feature_store=index.feature_store and index.feature_store.uri) as client:
                    if "main" in keys and "c4" in wanted:
                        timed = dataset.generations[:c4_samples]
                        latencies = one_at_a_time(client, timed, args.top_k)
                        _, stream_s = stream(client, timed, args.top_k)
                    if "main" in keys and {"c1", "c2"} & set(wanted):
                        by_id, _ = stream(client, dataset.generations, max(ks))
                        ranked = [_ranked(by_id[g.generation_id]) for g in dataset.generations]
                        ranked_by_variant[variant] = ranked
                        _score_labels(results, variant, dataset, ranked, ks, wanted, args.class_column,
                                      inputs.attributes)
                    if "c3" in keys:
                        by_id, _ = stream(client, dataset.generations, args.top_k)
                        phi = C.data_values(([(c.training_id, c.credit) for c in by_id[g.generation_id].credits]
                                             for g in dataset.generations), dataset.training)
                        results["c3"][variant.name] = _cleansing_record(
                            C.cleansing(phi, inputs.corrupted, args.bottom_fraction))
                if "main" in keys and "c4" in wanted:
                    # The server's stage split is not reachable per request: the same pipeline
                    # in-process, on the same collection and generations, gives it.
                    stages = stage_times(index, collection, _pipeline_settings(args, variant, quality.name), timed,
                                         encoder, rerankers[variant.reranker], quality, device=device)
                    results["c4"][variant.name] = asdict(C.efficiency(latencies, stages, stream_s, len(timed)))
        if photos:
            from .photos import run_photos

            run_photos(args, index, data_dir, workdir, device, settings, results, rerankers, profile, encoder,
                       quality, server_settings)
        for name in sorted({v.reranker for v in variants}):
            pq, flat = Variant(name, "IVF_PQ"), Variant(name, "FLAT")
            if pq in ranked_by_variant and flat in ranked_by_variant:
                results["recall_overlap"][name] = {
                    k: C.topk_overlap(ranked_by_variant[pq], ranked_by_variant[flat], k) for k in ks}

    results["wall_seconds"] = time.perf_counter() - started
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    if inputs.demo is not None:
        image_grid(out / "samples.png", inputs.demo)
        results["samples_png"] = "samples.png"
    report_path = write_report(out, results)
    print(f"report: {report_path} ({results['wall_seconds']:.0f} s)")
    for line in _headlines(results):
        print("  " + line)
    return EXIT_OK


def _pipeline_settings(args, variant: Variant, quality: str) -> Settings:
    return Settings(recall_k=args.recall_k, top_k=args.top_k, nprobe=args.nprobe, temperature=TEMPERATURE,
                    reranker=variant.reranker, quality=quality)


def _build(index, results: dict, dataset: DataSet, recall: str, reranker, profile: str, encoder) -> str:
    """A fresh collection of `dataset` for `recall` and `reranker`'s stored features."""
    from gmv_engine.milvus.index import CollectionInfo, IndexParams
    from gmv_engine.ingest import ingest

    name = f"gmv_eval_{dataset.key}_{reranker.name}_{recall.lower()}"
    index.drop(name)  # rebuilt each run, so the ingest time and the index are this run's
    info = CollectionInfo(profile, encoder.name, encoder.dim, reranker.name, reranker.feature_dim)
    start = time.perf_counter()
    report = ingest(index, name, dataset.rows, info, encoder, reranker, IndexParams(index_type=recall), progress=False)
    if report.bad:
        raise ValueError(f"{len(report.bad)} bad training row(s) in {dataset.manifest}, e.g. "
                         f"{report.bad[0].where}: {report.bad[0].reason}")
    results["ingest"][name] = {"seconds": time.perf_counter() - start, "rows": report.inserted,
                               "duplicates": report.duplicates, "index": report.index_state}
    log.info("built %s: %s (%.0f s)", name, report.summary(), results["ingest"][name]["seconds"])
    return name


def _score_labels(results, variant, dataset, ranked, ks, wanted, class_column, attributes) -> None:
    from . import criteria as C

    def labels_of(column: str):
        ranked_labels = [[dataset.training[t].get(column) or None for t in ids] for ids in ranked]
        return ranked_labels, [g.labels.get(column, "") for g in dataset.generations]

    def chance(column: str) -> float:
        return C.chance_share((meta.get(column) for meta in dataset.training.values()),
                              [g.labels.get(column, "") for g in dataset.generations])

    if "c1" in wanted:
        results["c1"][variant.name] = C.mean_identical_share(*labels_of(class_column), ks)
        results["chance"]["c1"] = chance(class_column)
    if "c2" in wanted:
        results["c2"][variant.name] = {a: C.mean_identical_share(*labels_of(a), ks) for a in attributes}
        results["chance"]["c2"] = {a: chance(a) for a in attributes}


def _cleansing_record(result) -> dict:
    record = asdict(result)
    for key in ("curve_x", "curve_y", "percentiles"):
        record[key] = [float(v) for v in record[key]]
    return record


def _headlines(results: dict) -> list[str]:
    lines = []
    for name, shares in results["c1"].items():
        lines.append(f"C1 {name}: " + ", ".join(f"k={k} {100 * v:.2f}%" for k, v in shares.items()))
    for name, record in results["c3"].items():
        lines.append(f"C3 {name}: {100 * record['bottom_share']:.1f}% of corrupted images in the bottom "
                     f"{100 * record['bottom_fraction']:.0f}%, mean percentile {record['mean_percentile']:.3f}")
    for name, record in results["c4"].items():
        lines.append(f"C4 {name}: {record['end_to_end_p50_s'] * 1000:.1f} ms per sample end to end (median), "
                     f"{record['streamed_s'] * 1000:.1f} ms streamed")
    return lines
