"""`gmv`: build training indexes, attribute generated images, serve, read the ledger, fetch
model weights, run the demo and the evaluation. Each command is a module listed in
`gmv_server.commands.COMMANDS`; every setting comes from `gmv_engine.settings`.

With no --milvus-uri a command uses the embedded Milvus of --data-dir (default .gmv/): the one
`gmv milvus start` or a `gmv serve` runs there, else one it starts and stops before exiting.
With --milvus-uri it uses that Milvus and starts nothing.

Exit status: 0 success; 1 some rows or images were bad (the rest were processed);
2 the command could not run (bad arguments, missing collection or weights, Milvus down).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from typing import Sequence

from gmv_engine import __version__
from gmv_engine.errors import GMVError

from .commands import COMMANDS
from .commands.common import EXIT_FAILED


def command_module(name: str):
    try:
        return importlib.import_module(COMMANDS[name])
    except ImportError as exc:
        if name == "eval":
            raise GMVError(f"`gmv eval` needs the evaluation extra: pip install -e '.[eval]' ({exc})") from None
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmv", description="GMV: attribute generated images to training data and contributors.")
    parser.add_argument("--version", action="version", version=f"gmv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            command_module(name).register(commands)
        except GMVError as exc:  # an optional extra is missing: the command says so when run
            commands.add_parser(name, help=str(exc)).set_defaults(unavailable=str(exc))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for name in ("gmv", "gmv_engine", "gmv.server"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    # SIGTERM unwinds like Ctrl-C, so an embedded Milvus this command started is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if getattr(args, "unavailable", None):
            raise GMVError(args.unavailable)
        from gmv_engine.models import configure_model_dir
        from gmv_engine.settings import from_args

        configure_model_dir(from_args(args).model_dir or None, allow_download=args.command == "models")
        return command_module(args.command).run(args)
    except (GMVError, ValueError) as exc:
        print(f"gmv: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("gmv: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
