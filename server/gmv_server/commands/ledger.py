"""`gmv ledger value|top|export`: data values and payouts from the royalty ledger.

Reads the ledger directly (SQLite file or PostgreSQL URL); no Milvus and no server needed.
Times are UTC. A window is [since, until); --month 2026-10 is that calendar month.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from gmv_engine.ledger import CREDIT_COLUMNS, Window, open_ledger
from gmv_engine.settings import add_config_flag, add_flags, from_args


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
    for parser in (value, top, export):
        add_config_flag(parser)
        add_flags(parser, groups=("ledger",), names=("data_dir",))
        parser.add_argument("--since", type=parse_time, help="from this UTC time, inclusive (2026-10-01 or ISO 8601)")
        parser.add_argument("--until", type=parse_time, help="up to this UTC time, exclusive")
        parser.add_argument("--month", type=parse_month, help="a calendar month, e.g. 2026-10 (instead of --since/--until)")
        parser.add_argument("--collection", help="only generations attributed against this collection")
        parser.add_argument("--tenant", help="only this tenant's generations")
        if parser is not export:
            parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")


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


def run(args) -> int:
    url = from_args(args).resolved_ledger_url()
    if "://" not in url and not Path(url).exists():
        raise ValueError(f"no ledger at {url}: run `gmv serve` first, or pass --ledger-url / --data-dir")
    window = window_of(args)
    with open_ledger(url) as ledger:
        if args.ledger_command == "value":
            rows = [v.__dict__ for v in ledger.values(window, args.top or None, args.training_id)]
            columns = ["training_id", "contributor_id", "value", "generations"]
        elif args.ledger_command == "top":
            rows = [c.__dict__ for c in ledger.contributors(window, args.limit or None)]
            columns = ["contributor_id", "value", "generations", "training_images"]
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
        items = ledger.contributors(window) if by == "contributor" else ledger.values(window)
        rows = [item.__dict__.copy() for item in items]
        columns = list(rows[0]) if rows else (["contributor_id", "value", "generations", "training_images"]
                                              if by == "contributor" else
                                              ["training_id", "contributor_id", "value", "generations"])
        total = sum(row["value"] for row in rows)
        columns.append("share")
        for row in rows:
            row["share"] = row["value"] / total if total else 0.0
        if pool is not None:
            columns.append("payout")
            for row in rows:
                row["payout"] = pool * row["share"]
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
