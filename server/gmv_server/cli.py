"""`gmv`: build training indexes, attribute generated images, fetch model weights, run the demo.

With no --milvus-uri every command starts the embedded Milvus on --data-dir (default .gmv/)
and stops it before exiting; with --milvus-uri it uses that Milvus and starts nothing.

Exit status: 0 success; 1 some rows or images were bad (the rest were processed);
2 the command could not run (bad arguments, missing collection or weights, Milvus down).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from gmv_engine import __version__
from gmv_engine.config import PROFILES, PipelineSettings, get_profile
from gmv_engine.errors import GMVError, InvalidImageError, MissingWeightsError
from gmv_engine.index import IndexParams

log = logging.getLogger("gmv")

EXIT_OK, EXIT_PARTIAL, EXIT_FAILED = 0, 1, 2


def _add_milvus_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Milvus")
    group.add_argument("--milvus-uri", default=os.environ.get("GMV_MILVUS_URI"),
                       help="Milvus to use, e.g. http://host:19530 (env GMV_MILVUS_URI). "
                            "Omitted: start the embedded Milvus on --data-dir for this command")
    group.add_argument("--milvus-token", default=os.environ.get("GMV_MILVUS_TOKEN", ""),
                       help="Milvus token, user:password or API key (env GMV_MILVUS_TOKEN)")
    group.add_argument("--data-dir", default=os.environ.get("GMV_DATA_DIR", ".gmv"),
                       help="where the embedded Milvus keeps its data (default .gmv, env GMV_DATA_DIR)")
    group.add_argument("--milvus-port", type=int, default=int(os.environ.get("GMV_MILVUS_PORT", 19530)),
                       help="port of the embedded Milvus (default 19530)")


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models")
    group.add_argument("--model-dir", default=os.environ.get("GMV_MODEL_DIR"),
                       help="folder holding pretrained weights (default: each library's standard cache)")
    group.add_argument("--device", default=os.environ.get("GMV_DEVICE", "auto"),
                       help="torch device: auto (CUDA when present), cpu, cuda, cuda:1 ...")


def _add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    defaults = PipelineSettings()
    group = parser.add_argument_group("pipeline")
    group.add_argument("--top-k", type=int, default=defaults.top_k, help=f"training images kept (default {defaults.top_k})")
    group.add_argument("--recall-k", type=int, default=defaults.recall_k,
                       help=f"candidates recalled from Milvus, K' (default {defaults.recall_k})")
    group.add_argument("--nprobe", type=int, default=defaults.nprobe, help=f"IVF lists searched (default {defaults.nprobe})")
    group.add_argument("--reranker", choices=["none", "l2", "lpips", "dreamsim"],
                       help="re-ranker (default: the one the collection was built for)")
    group.add_argument("--quality", help="pyiqa no-reference metric for q, or none (default: the profile's)")
    group.add_argument("--temperature", type=float, default=defaults.temperature,
                       help=f"T in exp(-d/T) (default {defaults.temperature})")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help="images per model batch")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmv", description="GMV: attribute generated images to training data and contributors.")
    parser.add_argument("--version", action="version", version=f"gmv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    commands = parser.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="build and inspect training indexes").add_subparsers(dest="index_command", required=True)
    build = index.add_parser("build", help="embed training images into a Milvus IVF_PQ collection (resumable)")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV with columns path,training_id,contributor_id (others kept as metadata)")
    source.add_argument("--images", help="folder of images: training_id = relative path, contributor_id = parent folder")
    build.add_argument("--collection", required=True)
    build.add_argument("--profile", default="paper", choices=sorted(PROFILES), help="default paper")
    build.add_argument("--encoder", help="override the profile's recall encoder (pixels, vgg16)")
    build.add_argument("--reranker", choices=["none", "l2", "lpips", "dreamsim"], help="override the profile's re-ranker")
    build.add_argument("--nlist", type=int, default=0, help="IVF lists (default ~4*sqrt(rows))")
    build.add_argument("--m", type=int, default=0, help="PQ sub-quantizers (default dim/4)")
    build.add_argument("--nbits", type=int, default=8, help="bits per PQ code (default 8)")
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_milvus_options(build)
    _add_model_options(build)

    info = index.add_parser("info", help="what a collection holds and how it was built")
    info.add_argument("--collection", help="default: list the collections")
    _add_milvus_options(info)

    drop = index.add_parser("drop", help="delete a collection and its re-rank features")
    drop.add_argument("--collection", required=True)
    _add_milvus_options(drop)

    attribute = commands.add_parser("attribute", help="credits for generated images (in-process, or --server)")
    attribute.add_argument("images", nargs="+", help="generated image files")
    attribute.add_argument("--collection", help="collection to attribute against (in-process mode)")
    attribute.add_argument("--server", help="HOST:PORT of a `gmv serve`; the server's collection and settings apply")
    attribute.add_argument("--json", action="store_true", help="one JSON object per line per image")
    _add_pipeline_options(attribute)
    _add_milvus_options(attribute)
    _add_model_options(attribute)

    serve = commands.add_parser("serve", help="serve gmv.v1.AttributionService over gRPC")
    serve.add_argument("--config", help="TOML file with server settings (see gmv_server/config.py)")
    serve.add_argument("--collection")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="gRPC port (default 50051)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default: none)")
    serve.add_argument("--max-batch-size", type=int, help="images per model batch (default 32)")
    serve.add_argument("--max-queue-delay-ms", type=float, help="how long a batch waits to fill (default 5)")
    serve.add_argument("--max-queue-size", type=int, help="waiting requests before RESOURCE_EXHAUSTED (default 256)")
    serve.add_argument("--top-k", type=int, help="default k when a request says 0 (default 10)")
    serve.add_argument("--recall-k", type=int)
    serve.add_argument("--nprobe", type=int)
    serve.add_argument("--temperature", type=float)
    serve.add_argument("--reranker")
    serve.add_argument("--quality")
    serve.add_argument("--grace-s", type=float, help="how long SIGTERM waits for in-flight calls (default 10)")
    serve.add_argument("--ledger-url", help="royalty ledger: postgresql://user:pass@host/db for replicas sharing one, "
                                            "or a SQLite file (default DATA_DIR/ledger.sqlite3; env GMV_LEDGER_URL)")
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="json: one JSON object a line, with generation_id on lines about a request (default text)")
    _add_milvus_options(serve)
    _add_model_options(serve)

    from gmv_server.ledger_cli import add_ledger_parser

    add_ledger_parser(commands)

    models = commands.add_parser("models", help="pretrained weights").add_subparsers(dest="models_command", required=True)
    for name, help_text in (("download", "fetch weights into the cache (needs network)"),
                            ("status", "say which weights are present")):
        sub = models.add_parser(name, help=help_text)
        sub.add_argument("--profile", choices=sorted(PROFILES), help="every model of a profile (default paper)")
        sub.add_argument("--model", action="append", help="one model: vgg16, dreamsim, lpips, or a pyiqa metric")
        _add_model_options(sub)

    demo = commands.add_parser("demo", help="index scikit-learn's digits and attribute held-out digits")
    demo.add_argument("--profile", default="auto", choices=["auto", *sorted(PROFILES)],
                      help="auto: paper when its weights are present, otherwise offline")
    demo.add_argument("--workdir", default=".gmv/demo", help="where the demo writes its images")
    demo.add_argument("--show", type=int, default=5, help="held-out images to attribute")
    demo.add_argument("--collection", default="digits_demo")
    _add_milvus_options(demo)
    _add_model_options(demo)

    from gmv_server import evaluation

    evaluation.add_parser(commands, _add_milvus_options, _add_model_options)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gmv").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    logging.getLogger("gmv_engine").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # SIGTERM unwinds like Ctrl-C, so an embedded Milvus this command started is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    from gmv_engine.models import configure_model_dir

    configure_model_dir(getattr(args, "model_dir", None), allow_download=args.command == "models")
    logging.getLogger("gmv.server").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    handlers = {"index": _index, "attribute": _attribute, "models": _models, "demo": _demo, "serve": _serve,
                "ledger": _ledger, "eval": _eval}
    try:
        return handlers[args.command](args)
    except (GMVError, ValueError) as exc:
        print(f"gmv: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("gmv: interrupted", file=sys.stderr)
        return 130


def _ledger(args) -> int:
    from gmv_server.ledger_cli import run_ledger

    return run_ledger(args)


def _open(args):
    from gmv_engine.embedded_milvus import open_index

    return open_index(args.milvus_uri, args.data_dir, args.milvus_port, args.milvus_token)


def _device(args) -> str:
    from gmv_engine.models import pick_device

    return pick_device(args.device)


# -- index ------------------------------------------------------------------------------------
def _index(args) -> int:
    return {"build": _index_build, "info": _index_info, "drop": _index_drop}[args.index_command](args)


def _index_build(args) -> int:
    from gmv_engine.ingest import read_manifest, scan_folder

    profile = get_profile(args.profile)
    rows = read_manifest(args.manifest) if args.manifest else scan_folder(args.images)
    encoder_name = args.encoder or profile.encoder
    reranker_name = args.reranker or profile.reranker
    device = _device(args)
    encoder, reranker = _build_components(encoder_name, reranker_name, device)
    with _open(args) as index:
        report = _run_ingest(index, args.collection, rows, profile.name, encoder, reranker,
                             IndexParams(args.nlist, args.m, args.nbits), args.batch_size, not args.no_progress)
    _print_ingest_report(report, args.collection)
    return EXIT_PARTIAL if report.bad else EXIT_OK


def _build_components(encoder_name: str, reranker_name: str, device: str):
    from gmv_engine.encoders import create_encoder
    from gmv_engine.rerankers import create_reranker

    return create_encoder(encoder_name, device=device), create_reranker(reranker_name, device=device)


def _run_ingest(index, collection, rows, profile_name, encoder, reranker, params, batch_size, progress):
    from gmv_engine.index import CollectionInfo
    from gmv_engine.ingest import ingest

    info = CollectionInfo(profile=profile_name, encoder=encoder.name, encoder_dim=encoder.dim,
                          reranker=reranker.name, feature_dim=reranker.feature_dim)
    log.info("building '%s' from %d rows: encoder %s (%d-d), re-ranker %s", collection, len(rows),
             encoder.name, encoder.dim, reranker.name)
    return ingest(index, collection, rows, info, encoder, reranker, params, batch_size=batch_size, progress=progress)


def _print_ingest_report(report, collection: str) -> None:
    state = report.index_state
    print(f"collection {collection}: {report.summary()}")
    print(f"index {state.get('index_type')} {state.get('params')}: {state.get('indexed_rows')}/{state.get('total_rows')} rows indexed")
    for bad in report.bad:
        print(f"  bad row ({bad.where}) {bad.training_id or '-'}: {bad.reason}", file=sys.stderr)


def _index_info(args) -> int:
    with _open(args) as index:
        if not args.collection:
            for name in index.list_collections():
                print(name)
            return EXIT_OK
        info = index.info(args.collection)
        state = index.index_state(args.collection)
        print(json.dumps({"collection": args.collection, "uri": index.uri, **info.__dict__, "index": state}, indent=2))
    return EXIT_OK


def _index_drop(args) -> int:
    with _open(args) as index:
        index.info(args.collection)  # NOT_FOUND / not-GMV errors before deleting anything
        index.drop(args.collection)
    print(f"dropped {args.collection}")
    return EXIT_OK


# -- attribute --------------------------------------------------------------------------------
def _settings(args) -> PipelineSettings:
    return PipelineSettings(recall_k=args.recall_k, top_k=args.top_k, nprobe=args.nprobe, temperature=args.temperature,
                            reranker=args.reranker, quality=args.quality, batch_size=args.batch_size)


def _attribute(args) -> int:
    if args.server:
        return _attribute_remote(args)
    if not args.collection:
        raise ValueError("--collection is required (or --server HOST:PORT)")
    from gmv_engine.decode import load_image_file
    from gmv_engine.pipeline import Attributor

    settings = _settings(args)
    settings.check()
    status = EXIT_OK
    with _open(args) as index:
        attributor = Attributor(index, args.collection, settings, device=_device(args))
        pending: list[tuple[Path, object]] = []
        for name in args.images:
            path = Path(name)
            try:
                pending.append((path, load_image_file(path, attributor.limits)[0]))
            except InvalidImageError as exc:
                print(f"gmv: {path}: {exc}", file=sys.stderr)
                status = EXIT_PARTIAL
        for start in range(0, len(pending), settings.batch_size):
            chunk = pending[start : start + settings.batch_size]
            for (path, _), result in zip(chunk, attributor.attribute([image for _, image in chunk])):
                print(format_json(path, result) if args.json else format_table(path, result))
    return status


def _attribute_remote(args) -> int:
    import grpc
    from gmv_client import GMVClient

    status = EXIT_OK
    with GMVClient(args.server) as client:
        for name in args.images:
            path = Path(name)
            try:
                result = client.attribute(path.read_bytes(), generation_id=path.stem, top_k=args.top_k)
            except OSError as exc:
                print(f"gmv: {path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
                status = EXIT_PARTIAL
                continue
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                    raise GMVServerError(f"{args.server}: {error.code().name}: {error.details()}") from None
                print(f"gmv: {path}: {error.details()}", file=sys.stderr)
                status = EXIT_PARTIAL
                continue
            print(format_json(path, result) if args.json else format_table(path, result))
    return status


class GMVServerError(GMVError):
    """The server refused or failed a call for a reason other than the image itself."""


def _serve(args) -> int:
    import asyncio

    from gmv_engine.ledger import default_ledger_url, open_ledger

    from gmv_server.app import serve
    from gmv_server.config import ServerConfig

    names = ["collection", "host", "port", "metrics_port", "max_batch_size", "max_queue_delay_ms", "max_queue_size",
             "top_k", "recall_k", "nprobe", "temperature", "reranker", "quality", "grace_s", "ledger_url", "log_format"]
    overrides = {name: getattr(args, name) for name in names}
    overrides["device"] = args.device if args.device != "auto" else None
    config = ServerConfig.load(args.config, overrides=overrides)
    from gmv_server import logs

    logs.configure(config.log_format)
    # The ledger opens first: a server that cannot record must not start attributing.
    with open_ledger(config.ledger_url or default_ledger_url(args.data_dir)) as ledger, _open(args) as index:
        asyncio.run(serve(index, config, ledger))
    return EXIT_OK


def attribution_record(path: Path, result) -> dict:
    return {
        "generation_id": path.stem,
        "image": str(path),
        "quality": result.quality,
        "credits": [c.__dict__ for c in result.credits],
        "contributors": [{"contributor_id": cid, "credit": credit} for cid, credit in result.contributors],
    }


def format_json(path: Path, result) -> str:
    return json.dumps(attribution_record(path, result))


def format_table(path: Path, result) -> str:
    lines = [f"{path}  (generation {path.stem}, quality q = {result.quality:.4f})",
             f"  {'rank':>4}  {'training_id':<28} {'contributor':<20} {'credit':>10} {'distance':>10}"]
    for c in result.credits:
        lines.append(f"  {c.rank:>4}  {c.training_id:<28} {c.contributor_id:<20} {c.credit:>10.6f} {c.distance:>10.4f}")
    lines.append("  contributors: " + ", ".join(f"{cid} {credit:.6f}" for cid, credit in result.contributors))
    return "\n".join(lines)


# -- models -----------------------------------------------------------------------------------
def _model_names(args) -> list[str]:
    if args.model:
        return list(args.model)
    profile = get_profile(args.profile or "paper")
    return [profile.encoder, profile.reranker, profile.quality]


def _load_model(name: str, device: str) -> None:
    from gmv_engine.encoders import ENCODERS, create_encoder
    from gmv_engine.quality import create_quality
    from gmv_engine.rerankers import RERANKERS, create_reranker

    if name in ENCODERS:
        create_encoder(name, device)
    elif name in RERANKERS:
        create_reranker(name, device)
    else:
        create_quality(name, device)


def _models(args) -> int:
    from gmv_engine.models import downloads_allowed

    device = _device(args)
    missing = 0
    for name in _model_names(args):
        try:
            if args.models_command == "download":
                with downloads_allowed():
                    _load_model(name, device)
                print(f"{name}: downloaded (or already cached)")
            else:
                _load_model(name, device)
                print(f"{name}: present")
        except MissingWeightsError as exc:
            missing += 1
            print(f"{name}: MISSING - {exc}")
    return EXIT_FAILED if missing else EXIT_OK


# -- eval -------------------------------------------------------------------------------------
def _eval(args) -> int:
    from gmv_server.evaluation import run

    return run(args)


# -- demo -------------------------------------------------------------------------------------
def _demo(args) -> int:
    """Index the digits on the embedded Milvus, start `gmv serve` on it, and attribute held-out
    digits through the client SDK, as a model-serving stack would."""
    from gmv_engine.datasets import export_digits, read_heldout
    from gmv_engine.embedded_milvus import free_port
    from gmv_engine.ingest import read_manifest

    device = _device(args)
    profile, (encoder, reranker, _) = _demo_profile(args.profile, device)
    print(f"profile: {profile.name} - {profile.description}")
    export = export_digits(args.workdir)
    print(f"dataset: scikit-learn digits as 32x32 RGB PNGs in {export.root}: "
          f"{export.train_count} training images (contributor = class folder), {export.heldout_count} held out")
    collection = f"{args.collection}_{profile.name}"
    with _open(args) as index:
        report = _run_ingest(index, collection, read_manifest(export.manifest), profile.name,
                             encoder, reranker, IndexParams(), 64, True)
        _print_ingest_report(report, collection)
        del encoder, reranker  # the server loads its own
        port = free_port()
        command = [sys.executable, "-m", "gmv_server.cli", "serve", "--collection", collection, "--port", str(port),
                   "--milvus-uri", index.uri, "--device", device, "--host", "127.0.0.1", "--data-dir", args.data_dir]
        print(f"\nstarting the server: gmv serve --collection {collection} --port {port} (on the same Milvus)")
        server = subprocess.Popen(command)
        try:
            return _demo_through_server(f"127.0.0.1:{port}", read_heldout(export.heldout)[: args.show], collection)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)


def _demo_through_server(target: str, heldout, collection: str) -> int:
    from gmv_client import GMVClient

    with GMVClient(target) as client:
        info = client.wait_until_ready()
        print(f"server ready: {info.collection} ({info.index_type} {dict(info.index_params)}, {info.row_count} rows, "
              f"re-rank {info.reranker}, quality {info.quality})")
        # Ids are per collection: a rerun replays the ledger's records instead of paying twice.
        labels = {f"demo-{collection}-{path.stem}": (path, label) for path, _, label in heldout}
        results = list(client.attribute_stream([(f"demo-{collection}-{path.stem}", path.read_bytes())
                                                for path, _, _ in heldout], tenant_id="demo"))
        top = client.top_contributors(limit=5, tenant_id="demo")
    same_class = []
    for result in sorted(results, key=lambda r: r.generation_id):
        path, label = labels[result.generation_id]
        print(f"\nheld-out digit {label} ({result.generation_id}, {result.ledger} in the ledger):")
        print(format_table(path, result))
        same_class.append(sum(c.contributor_id == f"digit-{label}" for c in result.credits) / len(result.credits))
    print(f"\nshare of top-{len(results[0].credits)} training images from the generation's own class: "
          f"{sum(same_class) / len(same_class):.3f} (the paper's criterion C1)")
    print(f"\nroyalty ledger: {top.generations} demo generations recorded, total credit {top.total_credit:.4f}; "
          "top contributors (`gmv ledger top --tenant demo`):")
    for item in top.items:
        print(f"  {item.contributor_id:<10} {item.value:.4f} over {item.generations} generations")
    return EXIT_OK


def _demo_profile(requested: str, device: str):
    """The paper profile when its weights load, else offline, saying which and why."""
    from gmv_engine.quality import create_quality

    if requested in ("auto", "paper"):
        paper = get_profile("paper")
        try:
            encoder, reranker = _build_components(paper.encoder, paper.reranker, device)
            return paper, (encoder, reranker, create_quality(paper.quality, device))
        except MissingWeightsError as exc:
            if requested == "paper":
                raise
            print(f"paper profile unavailable: {exc}")
            print("falling back to the offline profile, which needs no pretrained weights.")
    offline = get_profile("offline")
    encoder, reranker = _build_components(offline.encoder, offline.reranker, device)
    return offline, (encoder, reranker, None)


if __name__ == "__main__":
    sys.exit(main())
