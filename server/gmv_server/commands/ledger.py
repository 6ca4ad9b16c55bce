"""`gmv ledger value|top|export`: data values and payouts from the royalty ledger;
`gmv ledger erasures`: contributors' opt-outs the ledger recorded (docs/CONTRIBUTORS.md);
`gmv ledger seal|verify|prove|check-proof|keygen|public-key`: the tamper-evident ledger
(signed monthly Merkle checkpoints and inclusion proofs, docs/LEDGER.md).

Reads the ledger directly (SQLite file or PostgreSQL URL); no Milvus and no server needed.
Times are UTC. A window is [since, until); --month 2026-10 is that calendar month.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

from gmv_engine import transparency
from gmv_engine.ledger import CREDIT_COLUMNS, ERASURE_COLUMNS, AlreadySealedError, Window, open_ledger
from gmv_engine.settings import add_config_flag, add_flags, from_args

from .common import EXIT_OK, EXIT_PARTIAL


FLOAT_COLUMNS = {"value", "share", "payout", "quality", "credit", "distance"}
INT_COLUMNS = {"generations", "training_images", "rank"}


def register(commands) -> None:
    ledger = commands.add_parser("ledger", help="data values and payout exports from the royalty ledger")
    sub = ledger.add_subparsers(dest="ledger_command", required=True)
    value = sub.add_parser("value", help="phi_i per training image (sum of its credits), largest first")
    value.add_argument("--top", type=int, default=0, help="only the N most valuable (default all)")
    value.add_argument("--training-id", action="append", help="only this training image (repeatable)")
    top = sub.add_parser("top", help="credit totals per contributor, largest first")
    top.add_argument("-n", "--limit", type=int, default=10, help="contributors to show (default 10; 0 = all)")
    export = sub.add_parser("export", help="write a payout table as CSV or Parquet")
    export.add_argument("--out", required=True, help="FILE.csv or FILE.parquet")
    export.add_argument("--by", choices=["contributor", "training-image", "credit"], default="contributor",
                        help="one row per contributor (default), per training image, or per credit line item")
    export.add_argument("--pool", type=float, help="royalty pool to split: adds payout = pool * value / total value")
    statement = sub.add_parser("statement", help="contributors' statements for a month: CSV, Parquet and an HTML "
                                                  "page each, and summary.csv/.parquet (docs/LEDGER.md)")
    statement.add_argument("--contributor", help="only this contributor (default: every contributor credited)")
    statement.add_argument("--out", required=True, help="folder to write the statements into")
    statement.add_argument("--pool", type=float, help="royalty pool to split, as `export --pool`")
    statement.add_argument("--manifest", help="training manifest (path,training_id,...) so the HTML page shows the "
                                              "credited training images")
    for parser in (value, top, export, statement):
        add_config_flag(parser)
        add_flags(parser, groups=("ledger",), names=("data_dir",))
        parser.add_argument("--since", type=parse_time, help="from this UTC time, inclusive (2026-10-01 or ISO 8601)")
        parser.add_argument("--until", type=parse_time, help="up to this UTC time, exclusive")
        parser.add_argument("--month", type=parse_month, help="a calendar month, e.g. 2026-10 (instead of --since/--until)")
        parser.add_argument("--collection", help="only generations attributed against this collection")
        parser.add_argument("--tenant", help="only this tenant's generations")
        if parser not in (export, statement):
            parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    erasures = sub.add_parser("erasures", help="contributors removed (opted out): when, by whom, what it took out")
    erasures.add_argument("--collection", help="only removals from this collection")
    erasures.add_argument("--contributor", help="only this contributor's removals")
    erasures.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    add_config_flag(erasures)
    add_flags(erasures, groups=("ledger",), names=("data_dir",))
    register_transparency(sub)


DEFAULT_KEY = "ledger-signing-key.pem"  # in the data directory


def register_transparency(sub) -> None:
    seal = sub.add_parser("seal", help="sign a finished month's Merkle root: a checkpoint of its records and totals")
    seal.add_argument("--month", required=True, type=parse_period, help="the month to seal, e.g. 2026-10 (UTC)")
    seal.add_argument("--key", help=f"Ed25519 private key (PEM); default DATA_DIR/{DEFAULT_KEY}, made on first use")
    seal.add_argument("--out", help="also write the signed checkpoint to this JSON file (to publish it)")
    verify = sub.add_parser("verify", help="recompute every record's hash and every sealed month's root; name "
                                           "each record changed, removed or inserted (exit 1 if any)")
    verify.add_argument("--month", type=parse_period, help="only this month (default: all)")
    verify.add_argument("--public-key", action="append", default=[],
                        help=f"public key (PEM) checkpoints must be signed with (repeatable); default the public "
                             f"half of DATA_DIR/{DEFAULT_KEY} when there is one")
    prove = sub.add_parser("prove", help="an inclusion proof of a generation in its sealed month, for a third party")
    prove.add_argument("generation_id")
    prove.add_argument("--tenant", help="the generation's tenant (when several tenants used the id)")
    prove.add_argument("--out", help="write the proof to this JSON file (default: standard output)")
    public = sub.add_parser("public-key", help="print the public key checkpoints are signed with (PEM)")
    public.add_argument("--key", help=f"private key (PEM); default DATA_DIR/{DEFAULT_KEY}")
    for parser in (seal, verify, prove, public):
        add_config_flag(parser)
        add_flags(parser, groups=("ledger",), names=("data_dir",))
    keygen = sub.add_parser("keygen", help="make an Ed25519 signing key: FILE (private, mode 0600) and FILE.pub")
    keygen.add_argument("--out", required=True, help="where to write the private key (never overwritten)")
    check = sub.add_parser("check-proof", help="check an inclusion proof with the public key alone (no ledger needed)")
    check.add_argument("proof", help="the JSON file `gmv ledger prove` wrote")
    check.add_argument("--public-key", action="append", required=True,
                       help="the ledger's public key (PEM), obtained independently of the proof (repeatable)")


def parse_period(text: str) -> str:
    try:
        transparency.month_bounds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_time(text: str) -> float:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 date or time: '{text}'") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def parse_month(text: str) -> tuple[float, float]:
    try:
        start = datetime.strptime(text, "%Y-%m").replace(tzinfo=timezone.utc)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a month like 2026-10: '{text}'") from None
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.timestamp(), end.timestamp()


def iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def window_of(args) -> Window:
    if args.month and (args.since is not None or args.until is not None):
        raise ValueError("give --month or --since/--until, not both")
    since, until = args.month if args.month else (args.since, args.until)
    return Window(since, until, args.collection, args.tenant)


def run_statement(args, ledger, window: Window) -> int:
    from gmv_engine.statements import statements, write_statement, write_summary
    from gmv_engine.thumbnails import ThumbnailStore, thumbnail_dir

    if not args.month:
        raise ValueError("a statement is for a month: give --month, e.g. --month 2026-10")
    period = datetime.fromtimestamp(args.month[0], timezone.utc).strftime("%Y-%m")
    out = Path(args.out)
    rows = statements(ledger, window, period, args.pool, args.contributor)
    paths = {}
    if args.manifest:
        from gmv_engine.ingest import read_manifest

        paths = {row.training_id: row.path for row in read_manifest(args.manifest)}
    settings = from_args(args)
    store = ThumbnailStore(thumbnail_dir(settings.data_dir), max_bytes=0)  # read only here
    write_summary(rows, out)
    for row in rows:
        write_statement(row, out, store, paths)
    sealed = rows[0].checkpoint if rows else None
    print(f"wrote {len(rows)} statement(s) for {period} to {out} "
          f"({'reconciles to the sealed checkpoint, root ' + sealed['root_hash'] if sealed else 'month not sealed'})")
    return EXIT_OK


def run(args) -> int:
    if args.ledger_command in ("keygen", "check-proof", "public-key"):
        return run_keys(args)
    url = from_args(args).resolved_ledger_url()
    if "://" not in url and not Path(url).exists():
        raise ValueError(f"no ledger at {url}: run `gmv serve` first, or pass --ledger-url / --data-dir")
    if args.ledger_command in ("seal", "verify", "prove", "erasures"):
        with open_ledger(url) as ledger:
            return {"seal": run_seal, "verify": run_verify, "prove": run_prove,
                    "erasures": run_erasures}[args.ledger_command](args, ledger)
    window = window_of(args)
    with open_ledger(url) as ledger:
        if args.ledger_command == "value":
            rows = [v.__dict__ for v in ledger.values(window, args.top or None, args.training_id)]
            columns = ["training_id", "contributor_id", "value", "generations"]
        elif args.ledger_command == "top":
            rows = [c.__dict__ for c in ledger.contributors(window, args.limit or None)]
            columns = ["contributor_id", "value", "generations", "training_images"]
        elif args.ledger_command == "statement":
            return run_statement(args, ledger, window)
        else:
            count = export(ledger, window, Path(args.out), args.by, args.pool)
            generations, total = ledger.totals(window)
            print(f"wrote {count} rows to {args.out} ({generations} generations, total credit {total:.6f})")
            return 0
        generations, total = ledger.totals(window)
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"{generations} generations, total credit {total:.6f}")
        print(format_rows(rows, columns))
    return 0


def run_erasures(args, ledger) -> int:
    rows = [dataclasses.asdict(e) for e in ledger.erasures(args.collection, args.contributor)]
    for row in rows:
        row["removed_at"], row["recorded_at"] = iso(row["removed_at"]), iso(row["recorded_at"])
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"{len(rows)} erasure(s)")
        print(format_rows(rows, list(ERASURE_COLUMNS)))
    return EXIT_OK


def format_rows(rows: list[dict], columns: list[str]) -> str:
    cells = [columns] + [[f"{row[c]:.6f}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def export(ledger, window: Window, out: Path, by: str, pool: float | None) -> int:
    if out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"--out must end in .csv or .parquet, not '{out.suffix}'")
    if by == "credit":
        columns = list(CREDIT_COLUMNS)
        rows = [dict(zip(columns, row)) for row in ledger.iter_credits(window)]
        for row in rows:
            row["recorded_at"] = iso(row["recorded_at"])
    else:
        from gmv_engine.statements import payouts

        items = ledger.contributors(window) if by == "contributor" else ledger.values(window)
        rows = payouts(items, pool)  # the same shares and payouts as the statements
        columns = (["contributor_id", "value", "generations", "training_images"] if by == "contributor" else
                   ["training_id", "contributor_id", "value", "generations"]) + ["share"]
        if pool is not None:
            columns.append("payout")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a payout file is never half-written.
    partial = out.with_name(out.name + ".partial")
    if out.suffix == ".csv":
        with partial.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        types = {c: pa.float64() if c in FLOAT_COLUMNS else pa.int64() if c in INT_COLUMNS else pa.string()
                 for c in columns}
        pq.write_table(pa.table({c: pa.array([row[c] for row in rows], type=types[c]) for c in columns}), partial)
    os.replace(partial, out)
    return len(rows)


# -- the tamper-evident ledger ------------------------------------------------------------------

def default_key(args) -> Path:
    return Path(from_args(args).data_dir) / DEFAULT_KEY


def run_keys(args) -> int:
    if args.ledger_command == "keygen":
        key = transparency.generate_key_file(args.out)
        print(f"wrote the private key {args.out} (mode 0600: keep it secret, and a copy of it safe) and its public key "
              f"{transparency.public_path(args.out)} (publish it); key id {transparency.key_id(key.public_key())}")
        return EXIT_OK
    if args.ledger_command == "public-key":
        path = Path(args.key) if args.key else default_key(args)
        if not path.exists():
            raise ValueError(f"no signing key at {path}: `gmv ledger seal` makes one on first use, or "
                             "`gmv ledger keygen --out FILE`")
        print(transparency.public_key_pem(transparency.load_public_key(path)), end="")
        return EXIT_OK
    try:
        proof = json.loads(Path(args.proof).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the proof {args.proof}: {exc}") from None
    keys = [transparency.load_public_key(path) for path in args.public_key]
    try:
        checked = transparency.check_proof(proof, keys)
    except transparency.ProofError as exc:
        print(f"the proof does NOT verify: {exc}")
        return EXIT_PARTIAL
    record, checkpoint = checked.record, checked.checkpoint
    print(f"the proof verifies: generation {record['tenant_id']}/{record['generation_id']} "
          f"(recorded {iso(record['recorded_at'])}, quality {record['quality']!r}, {len(record['credits'])} credits) "
          f"is leaf {checked.leaf_index} of the {checkpoint['tree_size']} records of {checkpoint['period']}, "
          f"root {checkpoint['root_hash']}, signed by key {checkpoint['key_id']} at {checkpoint['sealed_at']}")
    for credit in record["credits"]:
        print(f"  {credit['rank']:>3}  {credit['training_id']}  {credit['contributor_id']}  {credit['credit']!r}")
    return EXIT_OK


def run_seal(args, ledger) -> int:
    path = Path(args.key) if args.key else default_key(args)
    try:
        ledger.check_sealable(args.month)  # before a key is made for it
        if not path.exists() and not args.key:
            # Made before anything is sealed, so a failed seal still leaves the key for the next try.
            transparency.generate_key_file(path)
            print(f"made the signing key {path} (mode 0600; keep a copy safe) and its public key "
                  f"{transparency.public_path(path)}: publish it, third parties check proofs with it", file=sys.stderr)
        checkpoint = ledger.seal(args.month, transparency.load_private_key(path))
    except AlreadySealedError:
        existing = ledger.checkpoint(args.month)
        print(f"{args.month} is already sealed ({existing.tree_size} records, root {existing.root_hash}, key "
              f"{existing.key_id}, at {iso(existing.sealed_at)}); a sealed month is never sealed again")
        return EXIT_PARTIAL
    document = checkpoint.document
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": checkpoint.text, "signature": checkpoint.signature},
                                             indent=2) + "\n")
    print(f"sealed {args.month}: {checkpoint.tree_size} records, total credit {document['total_credit']!r}, "
          f"root {checkpoint.root_hash}, signed by key {checkpoint.key_id}"
          + (f"; checkpoint written to {args.out}" if args.out else ""))
    return EXIT_OK


def run_verify(args, ledger) -> int:
    paths = [Path(p) for p in args.public_key]
    if not paths:
        default = default_key(args)
        public = transparency.public_path(default)
        paths = [public] if public.exists() else [default] if default.exists() else []
    keys = [transparency.load_public_key(path) for path in paths]
    report = ledger.verify(args.month, keys)
    print(f"checked {report.records} records in {len(report.sealed) + len(report.unsealed)} months: "
          f"{len(report.sealed)} sealed" + (f" ({', '.join(report.sealed)})" if report.sealed else "")
          + f", {len(report.unsealed)} not sealed" + (f" ({', '.join(report.unsealed)})" if report.unsealed else ""))
    for note in report.notes:
        print(f"note: {note}" + (f" (from {', '.join(map(str, paths))})" if note.startswith("checkpoint signatures "
                                                                                             "checked") else ""))
    if report.ok:
        print("OK: every record matches its hash and every sealed month its signed checkpoint")
        return EXIT_OK
    print(f"{len(report.findings)} problem(s), the first difference of each month first:")
    for finding in report.findings:
        print(f"  {finding}")
    return EXIT_PARTIAL


def run_prove(args, ledger) -> int:
    proof = ledger.prove(args.generation_id, args.tenant)
    text = json.dumps(proof, indent=2) + "\n"
    if args.out:
        Path(args.out).write_text(text)
        record = proof["record"]
        print(f"wrote the inclusion proof of generation {record['tenant_id']}/{record['generation_id']} "
              f"(leaf {proof['leaf_index']} of {proof['tree_size']}) to {args.out}")
    else:
        print(text, end="")
    return EXIT_OK
