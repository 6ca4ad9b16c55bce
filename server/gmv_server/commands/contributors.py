"""`gmv contributors list|remove`: who a collection holds images of, and opt-out (erasure).

`remove` takes every training image of a contributor out of the recall index and the re-rank
feature store, blocks their content hashes from being ingested again, and marks them removed
in the collection, which running servers read every milvus_probe_s: from then on no
attribution credits them (docs/CONTRIBUTORS.md). Past ledger records stay as the audit trail.
"""
from __future__ import annotations

import json
import time

from gmv_engine.settings import add_config_flag, add_flags, from_args

from .common import EXIT_OK, open_index


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
        add_flags(parser, groups=("milvus",))


def when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def run(args) -> int:
    from gmv_engine.milvus.erasure import contributor_counts, remove_contributor, removals

    settings = from_args(args)
    with open_index(settings) as index:
        index.info(args.collection)  # a clear error for an unknown collection
        if args.contributors_command == "remove":
            started = time.perf_counter()
            removal = remove_contributor(index, args.collection, args.contributor_id)
            report = {"collection": args.collection, "contributor_id": removal.contributor_id,
                      "removed_at": when(removal.removed_at), "images_removed": removal.rows,
                      "hashes_blocked": removal.hashes_blocked, "seconds": round(time.perf_counter() - started, 3)}
            if args.json:
                print(json.dumps(report))
            else:
                print(f"removed contributor '{removal.contributor_id}' from '{args.collection}' at "
                      f"{report['removed_at']}: {removal.rows} training images out of the recall index and the "
                      f"re-rank store, {removal.hashes_blocked} content hashes blocked from re-ingest; running "
                      f"servers stop crediting them within milvus_probe_s. Past ledger records are kept.")
            return EXIT_OK
        counts = contributor_counts(index, args.collection)
        removed = removals(index, args.collection).contributors
        rows = [{"contributor_id": c, "images": n, "status": "active"} for c, n in sorted(counts.items())
                if c not in removed]
        rows += [{"contributor_id": c, "images": counts.get(c, 0), "status": "removed",
                  "removed_at": when(r.removed_at), "images_removed": r.rows} for c, r in sorted(removed.items())]
        if args.json:
            print(json.dumps({"collection": args.collection, "contributors": rows}))
            return EXIT_OK
        print(f"{'contributor':<32} {'images':>8}  status")
        for row in rows:
            status = row["status"] + (f" at {row['removed_at']} ({row['images_removed']} images removed)"
                                      if row["status"] == "removed" else "")
            print(f"{row['contributor_id']:<32} {row['images']:>8}  {status}")
    return EXIT_OK
