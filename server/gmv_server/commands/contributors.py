"""`gmv contributors list|remove`: who a collection holds images of, and opt-out (erasure).

`remove` takes every training image of a contributor out of the recall index and the re-rank
feature store, blocks their content hashes from being ingested again, and marks them removed
in the collection, which running servers read every milvus_probe_s: from then on no
attribution credits them (docs/CONTRIBUTORS.md). The erasure is recorded in the ledger (the
same ledger_url / data_dir as `gmv serve` and `gmv ledger`), once however often `remove` runs;
`list` says when. Past ledger records stay as the audit trail.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from gmv_engine.errors import GMVError
from gmv_engine.settings import add_config_flag, add_flags, from_args

from .common import EXIT_OK, open_index, warn


def register(commands) -> None:
    contributors = commands.add_parser("contributors", help="list a collection's contributors; remove one "
                                                            "(opt-out)").add_subparsers(dest="contributors_command",
                                                                                       required=True)
    listing = contributors.add_parser("list", help="each contributor's images in the collection, and those removed")
    remove = contributors.add_parser("remove", help="remove every image of a contributor (opt-out, erasure)")
    remove.add_argument("contributor_id", help="the contributor to remove")
    for parser in (listing, remove):
        parser.add_argument("--collection", required=True)
        parser.add_argument("--json", action="store_true", help="one JSON object on stdout instead of text")
        add_config_flag(parser)
        add_flags(parser, groups=("milvus", "ledger"))


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def run(args) -> int:
    from gmv_engine.ledger import open_ledger

    settings = from_args(args)
    if args.contributors_command == "remove":
        # The ledger first: one it cannot open fails the command before anything is removed.
        with open_ledger(settings.resolved_ledger_url()) as ledger, open_index(settings) as index:
            index.info(args.collection)  # a clear error for an unknown collection
            return run_remove(args, index, ledger)
    with existing_ledger(settings.resolved_ledger_url()) as ledger, open_index(settings) as index:
        index.info(args.collection)
        return run_list(args, index, ledger)


@contextlib.contextmanager
def existing_ledger(url: str):
    """The ledger to read erasures from; None where there is none yet, or where it cannot be
    opened (said on stderr): `list` is about the collection, and shows what it can."""
    from gmv_engine.ledger import open_ledger, sqlite_path

    if ("://" not in url or url.startswith("sqlite:///")) and not Path(sqlite_path(url)).exists():
        yield None
        return
    try:
        ledger = open_ledger(url)
    except GMVError as exc:
        warn(f"not showing when removals were recorded: {exc}")
        yield None
        return
    with ledger:
        yield ledger


def run_remove(args, index, ledger) -> int:
    from gmv_engine.optout import CLI, command_line_user, remove

    started = time.perf_counter()
    outcome = remove(index, ledger, args.collection, args.contributor_id, requested_via=CLI,
                     requested_by=command_line_user())
    removal, erasure = outcome.removal, outcome.erasure
    report = {"collection": args.collection, "contributor_id": removal.contributor_id,
              "removed_at": when(removal.removed_at), "images_removed": removal.rows,
              "hashes_blocked": removal.hashes_blocked, "ledger_recorded_at": when(erasure.recorded_at),
              "ledger_recorded_now": outcome.recorded_now, "seconds": round(time.perf_counter() - started, 3)}
    if args.json:
        print(json.dumps(report))
        return EXIT_OK
    recorded = ("recorded in the ledger now" if outcome.recorded_now else
                f"recorded in the ledger before, at {report['ledger_recorded_at']}")
    print(f"removed contributor '{removal.contributor_id}' from '{args.collection}' at "
          f"{report['removed_at']}: {removal.rows} training images out of the recall index and the "
          f"re-rank store, {removal.hashes_blocked} content hashes blocked from re-ingest; running "
          f"servers stop crediting them within milvus_probe_s. The erasure is {recorded} ({ledger.safe_url}); "
          "past ledger records are kept.")
    return EXIT_OK


def run_list(args, index, ledger) -> int:
    from gmv_engine.milvus.erasure import contributor_counts, removals

    counts = contributor_counts(index, args.collection)
    removed = removals(index, args.collection).contributors
    recorded = {(e.contributor_id, e.removed_at): e for e in ledger.erasures(args.collection)} if ledger else {}
    rows = [{"contributor_id": c, "images": n, "status": "active"} for c, n in sorted(counts.items())
            if c not in removed]
    for c, r in sorted(removed.items()):
        erasure = recorded.get((c, r.removed_at))
        rows.append({"contributor_id": c, "images": counts.get(c, 0), "status": "removed",
                     "removed_at": when(r.removed_at), "images_removed": r.rows,
                     "ledger_recorded_at": when(erasure.recorded_at) if erasure else None})
    if args.json:
        print(json.dumps({"collection": args.collection, "contributors": rows}))
        return EXIT_OK
    print(f"{'contributor':<32} {'images':>8}  status")
    for row in rows:
        status = row["status"]
        if status == "removed":
            status += (f" at {row['removed_at']} ({row['images_removed']} images removed); "
                       + (f"in the ledger since {row['ledger_recorded_at']}" if row["ledger_recorded_at"] else
                          "not in the ledger (run remove again to record it)"))
        print(f"{row['contributor_id']:<32} {row['images']:>8}  {status}")
    return EXIT_OK
