"""`gmv serve`: serve gmv.v1.AttributionService over gRPC for one or more collections."""
from __future__ import annotations

from gmv_engine.errors import GMVError, IncompatibleCollectionError
from gmv_engine.registry import names
from gmv_engine.settings import Settings, add_config_flag, add_flags, from_args

from .common import EXIT_OK, check_port_free, open_index


def register(commands) -> None:
    parser = commands.add_parser("serve", help="serve gmv.v1.AttributionService over gRPC",
                                 description="Serve one or more collections (repeat --collection, or list "
                                             "`collections` in the config file); models are loaded once and shared.")
    add_config_flag(parser)
    add_flags(parser, groups=("serving", "security", "pipeline", "images", "ledger", "milvus", "models"))
    parser.add_argument("--profile", dest="serve_profile", choices=names("profile"),
                        help="serve only collections built with this profile (each collection's own build record "
                             "picks its encoder and re-ranker; this makes a mismatch an error at start)")
    parser.add_argument("--insecure", action="store_true",
                        help="serve a non-loopback address though no API key exists and no client CA is set "
                             "(anyone who reaches the port may call it as any tenant)")


def load_settings(args) -> Settings:
    settings = from_args(args)
    if not settings.collections:
        raise ValueError("a collection is required (--collection, GMV_COLLECTIONS or `collections` in the config file)")
    return settings


def check_profile(index, collections, profile: str | None) -> None:
    """With --profile, every collection served must have been built with it."""
    if not profile:
        return
    for collection in collections:
        built = index.info(collection).profile
        if built != profile:
            raise IncompatibleCollectionError(
                f"collection '{collection}' was built with the '{built}' profile, not '{profile}'; serve it without "
                f"--profile or with --profile {built}, or build it with `gmv index build --profile {profile}`")


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


def run(args) -> int:
    import asyncio

    from gmv_engine.ledger import open_ledger

    from .. import logs
    from ..app import serve, server_credentials

    settings = load_settings(args)
    logs.configure(settings.log_format)
    # Busy ports fail now, before Milvus and the models take their seconds to start.
    check_port_free(settings.host, settings.port, "port")
    check_port_free(settings.metrics_host, settings.metrics_port, "metrics_port")
    check_port_free(settings.host, settings.health_port, "health_port")
    if settings.tls_cert:
        server_credentials(settings)  # unreadable or non-PEM files fail now, naming the setting

    # The ledger opens first: a server that cannot record must not start attributing.
    with open_ledger(settings.resolved_ledger_url()) as ledger:
        if not (is_loopback(settings.host) or settings.tls_client_ca or args.insecure or ledger.keys_exist()):
            raise GMVError(f"refusing to serve {settings.host} with no authentication: create an API key first "
                           "(gmv keys create --tenant T --role attribute), set --tls-client-ca, or pass --insecure "
                           "(docs/SECURITY.md)")
        with open_index(settings) as index:
            check_profile(index, settings.collections, args.serve_profile)
            asyncio.run(serve(index, settings, ledger))
    return EXIT_OK
