"""`gmv models status|download|pack|unpack`: which pretrained weights are on this machine, fetching
them, and carrying them to a machine without network as one verified bundle."""
from __future__ import annotations

from gmv_engine.errors import MissingWeightsError
from gmv_engine.registry import names
from gmv_engine.settings import add_config_flag, add_flags, from_args

from .common import EXIT_FAILED, EXIT_OK, device

KINDS = ("encoder", "reranker", "quality")


def register(commands) -> None:
    models = commands.add_parser("models", help="pretrained weights").add_subparsers(dest="models_command", required=True)
    for name, help_text in (("download", "fetch weights into the cache (needs network)"),
                            ("status", "say which weights are present (local files only, no network)"),
                            ("pack", "write the weights the models load, from --model-dir or the libraries' "
                                     "caches, into one bundle for a machine without network")):
        sub = models.add_parser(name, help=help_text)
        sub.add_argument("--profile", choices=names("profile"), help="every model of a profile (default paper)")
        sub.add_argument("--model", action="append",
                         help="one model: " + ", ".join(sorted({n for kind in KINDS for n in names(kind)})))
        add_config_flag(sub)
        add_flags(sub, groups=("models",))
        if name == "pack":
            sub.add_argument("--out", required=True, help="the bundle to write (a tar with a sha256 manifest)")
    unpack = models.add_parser("unpack", help="place a bundle's weights in --model-dir (or the libraries' caches), "
                                              "each file's sha256 checked first")
    unpack.add_argument("bundle", help="a tar written by `gmv models pack`")
    add_config_flag(unpack)
    add_flags(unpack, groups=("models",))


def selected(args) -> list[tuple[str, str]]:
    """(kind, name) of each model asked about."""
    from gmv_engine.profiles import get_profile

    if args.model:
        found = []
        for model in args.model:
            kinds = [kind for kind in KINDS if model in names(kind)]
            if not kinds:
                raise ValueError(f"unknown model '{model}'; registered: "
                                 + ", ".join(sorted({n for kind in KINDS for n in names(kind)})))
            found.append((kinds[0], model))
        return found
    profile = get_profile(args.profile or "paper")
    return [(kind, name) for kind, name in profile.components.items()]


def run(args) -> int:
    settings = from_args(args)
    if args.models_command == "pack":
        return pack(args, settings)
    if args.models_command == "unpack":
        return unpack(args, settings)
    missing = 0
    for kind, name in selected(args):
        if args.models_command == "download":
            from gmv_engine.models import downloads_allowed
            from gmv_engine.registry import create, registry

            try:
                with downloads_allowed():
                    create(registry(kind), kind, name, device(settings))
                print(f"{name}: downloaded (or already cached)")
            except MissingWeightsError as exc:
                missing += 1
                print(f"{name}: MISSING - {exc}")
            continue
        from gmv_engine.models import weights_status

        status = weights_status(kind, name)
        where = "; looked in " + ", ".join(status.looked_in) if status.looked_in else ""
        if status.present:
            print(f"{name}: present ({status.detail}{where})")
        else:
            missing += 1
            print(f"{name}: MISSING - {status.detail}{where}. Fetch it with `gmv models download --model {name}` "
                  "where there is network, or point --model-dir at a folder that holds it.")
    return EXIT_FAILED if missing else EXIT_OK


def pack(args, settings) -> int:
    from gmv_engine.models import pack_models

    profile = None if args.model else (args.profile or "paper")
    manifest = pack_models(selected(args), args.out, profile=profile)
    total = sum(entry["size"] for entry in manifest["files"])
    where = settings.model_dir or "the libraries' caches"
    print(f"packed {len(manifest['files'])} files ({total / 2**20:.1f} MiB) of {', '.join(manifest['models'])} "
          f"from {where} into {args.out}")
    return EXIT_OK


def unpack(args, settings) -> int:
    from gmv_engine.models import unpack_models

    entries = unpack_models(args.bundle)
    total = sum(entry["size"] for entry in entries)
    where = settings.model_dir or "the libraries' caches"
    print(f"unpacked {len(entries)} files ({total / 2**20:.1f} MiB) into {where}, every sha256 checked; "
          "`gmv models status` tells which models they complete")
    return EXIT_OK
