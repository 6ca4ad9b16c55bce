"""`gmv serve`: serve gmv.v1.AttributionService over gRPC for one or more collections."""
from __future__ import annotations

from gmv_engine.settings import Settings, add_config_flag, add_flags, from_args

from .common import EXIT_OK, check_port_free, open_index


def register(commands) -> None:
    parser = commands.add_parser("serve", help="serve gmv.v1.AttributionService over gRPC",
                                 description="Serve one or more collections (repeat --collection, or list "
                                             "`collections` in the config file); models are loaded once and shared.")
    add_config_flag(parser)
    add_flags(parser, groups=("serving", "pipeline", "images", "ledger", "milvus", "models"))


def load_settings(args) -> Settings:
    settings = from_args(args)
    if not settings.collections:
        raise ValueError("a collection is required (--collection, GMV_COLLECTIONS or `collections` in the config file)")
    return settings


def run(args) -> int:
    import asyncio

    from gmv_engine.ledger import open_ledger

    from .. import logs
    from ..app import serve

    settings = load_settings(args)
    logs.configure(settings.log_format)
    # Busy ports fail now, before Milvus and the models take their seconds to start.
    check_port_free(settings.host, settings.port, "port")
    check_port_free(settings.metrics_host, settings.metrics_port, "metrics_port")
    # The ledger opens first: a server that cannot record must not start attributing.
    with open_ledger(settings.resolved_ledger_url()) as ledger, open_index(settings) as index:
        asyncio.run(serve(index, settings, ledger))
    return EXIT_OK
