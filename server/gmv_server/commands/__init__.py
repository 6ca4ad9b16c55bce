"""The `gmv` commands: one small module each, with `register(subparsers)` and `run(args)`.
COMMANDS is the table `gmv_server.cli` builds its parser and dispatch from."""
COMMANDS = {
    "index": "gmv_server.commands.index",
    "attribute": "gmv_server.commands.attribute",
    "serve": "gmv_server.commands.serve",
    "milvus": "gmv_server.commands.milvus",
    "ledger": "gmv_server.commands.ledger",
    "keys": "gmv_server.commands.keys",
    "contributors": "gmv_server.commands.contributors",
    "models": "gmv_server.commands.models",
    "demo": "gmv_server.commands.demo",
    "eval": "gmv_eval.command",
}
