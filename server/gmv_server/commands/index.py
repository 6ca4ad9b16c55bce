"""`gmv index build|info|drop`: training indexes in Milvus."""
from __future__ import annotations

import json
import logging
import sys

from gmv_engine.settings import Settings, add_config_flag, add_flags, from_args

from .common import EXIT_OK, EXIT_PARTIAL, device, open_index

log = logging.getLogger("gmv")


def register(commands) -> None:
    index = commands.add_parser("index", help="build and inspect training indexes").add_subparsers(
        dest="index_command", required=True)
    build = index.add_parser("build", help="embed training images into a Milvus IVF_PQ collection (resumable)")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV with columns path,training_id,contributor_id (others kept as metadata); "
                                           "with --executor ray also Parquet (.parquet), and s3://, gs:// URIs")
    source.add_argument("--images", help="folder of images: training_id = path relative to it, contributor_id = "
                                         "the first folder under it (alice/2024/x.png -> alice)")
    build.add_argument("--contributor-depth", type=int, default=1,
                       help="--images: the contributor is the first N folders (default 1; 2: alice/2024)")
    build.add_argument("--collection", required=True)
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flag(build)
    add_flags(build, groups=("ingest", "milvus", "models"), names=("reranker",))

    info = index.add_parser("info", help="what a collection holds and how it was built")
    info.add_argument("--collection", help="default: list the collections")
    drop = index.add_parser("drop", help="delete a collection and its re-rank features")
    drop.add_argument("--collection", required=True)
    for parser in (info, drop):
        add_config_flag(parser)
        add_flags(parser, groups=("milvus",))


def run(args) -> int:
    settings = from_args(args)
    return {"build": build, "info": info, "drop": drop}[args.index_command](args, settings)


def build(args, settings: Settings) -> int:
    from gmv_engine.ingest import read_manifest, scan_folder

    if settings.executor == "ray":
        from gmv_engine.distributed import read_source, require_ray

        require_ray()  # exit 2, naming the extra, before anything slow starts
        rows = read_source(args.manifest) if args.manifest else scan_folder(args.images, args.contributor_depth)
    else:
        rows = read_manifest(args.manifest) if args.manifest else scan_folder(args.images, args.contributor_depth)
    with open_index(settings) as index:
        report = run_ingest(index, args.collection, rows, settings, device(settings), not args.no_progress)
    print_ingest_report(report, args.collection)
    return EXIT_PARTIAL if report.bad else EXIT_OK


def run_ingest(index, collection: str, rows, settings: Settings, device_name: str, progress: bool,
               components=None):
    """Ingest `rows` into `collection` with the settings' profile (or its --encoder/--reranker)."""
    from gmv_engine.ingest import ingest
    from gmv_engine.milvus.index import CollectionInfo, IndexParams
    from gmv_engine.models import ModelPool
    from gmv_engine.profiles import get_profile

    profile = get_profile(settings.profile)
    if components is None:
        models = ModelPool(device_name)
        components = (models.get("encoder", settings.encoder or profile.encoder),
                      models.get("reranker", settings.reranker or profile.reranker))
    encoder, reranker = components
    info = CollectionInfo(profile=profile.name, encoder=encoder.name, encoder_dim=encoder.dim,
                          reranker=reranker.name, feature_dim=reranker.feature_dim)
    log.info("building '%s' from %d rows: encoder %s (%d-d), re-ranker %s", collection, len(rows),
             encoder.name, encoder.dim, reranker.name)
    params = IndexParams(settings.nlist, settings.m, settings.nbits, settings.index_type)
    if settings.executor == "ray":
        from gmv_engine.distributed import RayOptions, ingest_on_ray

        options = RayOptions(address=settings.ray_address, actors=settings.ray_actors, device=settings.device,
                             model_dir=settings.model_dir)
        return ingest_on_ray(index, collection, rows, info, encoder, reranker, params,
                             batch_size=settings.ingest_batch_size, progress=progress, options=options)
    return ingest(index, collection, rows, info, encoder, reranker, params, batch_size=settings.ingest_batch_size,
                  progress=progress)


def print_ingest_report(report, collection: str) -> None:
    state = report.index_state
    print(f"collection {collection}: {report.summary()}")
    print(f"index {state.get('index_type')} {state.get('params')}: {state.get('indexed_rows')}/{state.get('total_rows')} rows indexed")
    if getattr(report, "seconds", None):
        print(f"time: {report.timing()}")
    per_contributor = getattr(report, "per_contributor", None) or {}
    if per_contributor:
        print(f"images inserted per contributor ({len(per_contributor)}): "
              + ", ".join(f"{cid} {count}" for cid, count in sorted(per_contributor.items())))
    for bad in report.bad:
        print(f"  bad row ({bad.where}) {bad.training_id or '-'}: {bad.reason}", file=sys.stderr)


def info(args, settings: Settings) -> int:
    with open_index(settings) as index:
        if not args.collection:
            for name in index.list_collections():
                print(name)
            return EXIT_OK
        collection_info = index.info(args.collection)
        state = index.index_state(args.collection)
        print(json.dumps({"collection": args.collection, "uri": index.uri, **collection_info.__dict__, "index": state},
                         indent=2))
    return EXIT_OK


def drop(args, settings: Settings) -> int:
    with open_index(settings) as index:
        index.info(args.collection)  # NOT_FOUND / not-GMV errors before deleting anything
        index.drop(args.collection)
    print(f"dropped {args.collection}")
    return EXIT_OK
