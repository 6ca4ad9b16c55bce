"""`gmv attribute IMAGE...`: credits for generated images, in-process or through a server.

In-process it runs the same attribution service as `gmv serve` (replay, decode, batch,
record-then-answer), so it records each generation in the ledger unless --no-record.
With --server it calls a running `gmv serve`, whose settings apply.
"""
from __future__ import annotations

import asyncio
from pathlib import Path

from gmv_engine.errors import GenerationConflictError, GMVError, InvalidImageError
from gmv_engine.settings import FIELDS, Settings, add_config_flag, add_flags, flag_of, from_args

from .common import EXIT_OK, EXIT_PARTIAL, device, format_json, format_table, open_index, warn

# Settings a --server call can carry; every other setting is the server's.
REMOTE_SETTINGS = {"top_k"}


def register(commands) -> None:
    parser = commands.add_parser("attribute", help="credits for generated images (in-process, or --server)")
    parser.add_argument("images", nargs="+", help="generated image files")
    parser.add_argument("--collection", help="collection to attribute against (with --server: may be omitted when "
                                             "the server serves one)")
    parser.add_argument("--server", help="HOST:PORT of a `gmv serve`; its settings apply")
    parser.add_argument("--tenant", default="", help="tenant recorded with each generation")
    parser.add_argument("--id-prefix", default="", help="generation_id = PREFIX + the file's stem")
    parser.add_argument("--no-record", action="store_true", help="attribute without recording in the ledger")
    parser.add_argument("--json", action="store_true", help="one JSON object per line per image")
    add_config_flag(parser)
    add_flags(parser, groups=("pipeline", "images", "milvus", "models", "ledger"), names=("max_batch_size",))


def run(args) -> int:
    if args.server:
        refuse_local_flags(args)
        return run_remote(args)
    settings = from_args(args)
    if not args.collection:
        raise ValueError("--collection is required (or --server HOST:PORT)")
    return asyncio.run(run_local(args, settings))


def refuse_local_flags(args) -> None:
    given = [name for name in FIELDS if name not in REMOTE_SETTINGS and getattr(args, name, None) is not None]
    if getattr(args, "config", None):
        given.insert(0, "config")
    if given:
        flags = ", ".join("--config" if name == "config" else flag_of(name) for name in given)
        raise ValueError(f"{flags}: no effect with --server, where the server's settings apply; "
                         "drop them (with --server only --collection, --tenant, --id-prefix, --no-record, "
                         "--top-k and --json apply)")


def generation_id(args, path: Path) -> str:
    return f"{args.id_prefix}{path.stem}"


async def run_local(args, settings: Settings) -> int:
    from gmv_engine.ledger import open_ledger

    from ..attribution_service import AttributionRequest, AttributionService

    status = EXIT_OK
    ledger = None if args.no_record else open_ledger(settings.resolved_ledger_url())
    try:
        with open_index(settings) as index:
            service = AttributionService(settings, ledger)
            await service.start(index, [args.collection], device(settings), warm=False)
            try:
                async def one(path: Path):
                    try:
                        image = await asyncio.to_thread(path.read_bytes)
                    except OSError as exc:
                        return path, None, f"cannot read: {exc.strerror or exc}"
                    request = AttributionRequest(generation_id=generation_id(args, path), image=image,
                                                 collection=args.collection, tenant_id=args.tenant,
                                                 record=not args.no_record)
                    try:
                        return path, await service.attribute(request), None
                    except (InvalidImageError, GenerationConflictError) as exc:
                        return path, None, str(exc)

                # All at once into the batcher (bounded by its queue), printed in argument order.
                paths = [Path(name) for name in args.images]
                for start in range(0, len(paths), settings.max_queue_size):
                    chunk = paths[start:start + settings.max_queue_size]
                    for path, outcome, problem in await asyncio.gather(*(one(p) for p in chunk)):
                        if problem is not None:
                            warn(f"{path}: {problem}")
                            status = EXIT_PARTIAL
                            continue
                        print_result(args, path, outcome.attribution, outcome.ledger)
            finally:
                await service.stop()
    finally:
        if ledger is not None:
            ledger.close()
    return status


def print_result(args, path: Path, attribution, ledger: str) -> None:
    gid = generation_id(args, path)
    print(format_json(gid, path, attribution) if args.json else format_table(gid, path, attribution, ledger))


class GMVServerError(GMVError):
    """The server refused or failed a call for a reason other than the image itself."""


def run_remote(args) -> int:
    import grpc
    from gmv_client import GMVClient

    # The image's own problems are reported for it and the rest go on; anything else ends the run.
    per_image = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)
    status = EXIT_OK
    with GMVClient(args.server) as client:
        for name in args.images:
            path = Path(name)
            try:
                result = client.attribute(path.read_bytes(), generation_id=generation_id(args, path),
                                          top_k=args.top_k or 0, tenant_id=args.tenant, record=not args.no_record,
                                          collection=args.collection or "")
            except OSError as exc:
                warn(f"{path}: cannot read: {exc.strerror or exc}")
                status = EXIT_PARTIAL
                continue
            except grpc.RpcError as error:
                if error.code() not in per_image:
                    raise GMVServerError(f"{args.server}: {error.code().name}: {error.details()}") from None
                warn(f"{path}: {error.details()}")
                status = EXIT_PARTIAL
                continue
            print_result(args, path, result, result.ledger)
    return status
