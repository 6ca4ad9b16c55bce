"""`gmv keys create|list|revoke`: API keys in the ledger's database (docs/SECURITY.md).

A key is shown once, by `create`, alone on stdout (so `KEY=$(gmv keys create ...)` works);
only its SHA-256 is stored. Running servers see a new, revoked or expired key within seconds.
"""
from __future__ import annotations

import re
import sys
import time

from gmv_engine.errors import GMVError
from gmv_engine.ledger import ROLES, ApiKey, open_ledger
from gmv_engine.settings import add_config_flag, add_flags, from_args

from .common import EXIT_OK

UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(commands) -> None:
    keys = commands.add_parser("keys", help="create, list and revoke API keys").add_subparsers(
        dest="keys_command", required=True)
    create = keys.add_parser("create", help="a new key for one tenant, printed once on stdout")
    create.add_argument("--tenant", required=True, help="the tenant whose generations and credits the key covers")
    create.add_argument("--role", action="append", required=True, choices=ROLES,
                        help="attribute: Attribute calls; read: valuations and top contributors; admin: every "
                             "tenant's data (repeat for several)")
    create.add_argument("--expires-in", help="e.g. 90d, 12h, 30m; default: never")
    keys.add_parser("list", help="every key: id, tenant, roles, created, expires, revoked (never a secret)")
    revoke = keys.add_parser("revoke", help="revoke a key by its id or the key itself")
    revoke.add_argument("key", help="KEY_ID or the key")
    for parser in keys.choices.values():
        add_config_flag(parser)
        add_flags(parser, groups=("ledger",), names=("data_dir",))


def run(args) -> int:
    settings = from_args(args)
    with open_ledger(settings.resolved_ledger_url()) as ledger:
        if args.keys_command == "create":
            expires_at = time.time() + duration_s(args.expires_in) if args.expires_in else None
            record, key = ledger.create_key(args.tenant, args.role, expires_at)
            print(f"created key {record.key_id} for tenant '{record.tenant_id}' with roles {', '.join(record.roles)}"
                  f"{', expiring ' + when(expires_at) if expires_at else ''}; it is shown only now", file=sys.stderr)
            print(key)
        elif args.keys_command == "list":
            print(f"{'key_id':<14} {'tenant':<20} {'roles':<24} {'created':<20} {'expires':<20} revoked")
            for record in ledger.list_keys():
                print(describe(record))
        else:
            record = ledger.revoke_key(args.key)
            if record is None:
                raise GMVError(f"no key '{args.key}'")
            print(f"revoked key {record.key_id} of tenant '{record.tenant_id}' (running servers refuse it within "
                  "seconds)", file=sys.stderr)
    return EXIT_OK


def duration_s(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if not match:
        raise GMVError(f"--expires-in must look like 90d, 12h, 30m or 45s, not '{text}'")
    return float(match.group(1)) * UNITS_S[match.group(2)]


def when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) if seconds else "-"


def describe(record: ApiKey) -> str:
    return (f"{record.key_id:<14} {record.tenant_id:<20} {','.join(record.roles):<24} {when(record.created_at):<20} "
            f"{when(record.expires_at):<20} {when(record.revoked_at)}")
