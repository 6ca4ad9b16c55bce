"""Contributors' statements: what a rightholder is owed for a period, and why.

One statement per contributor: the generations that credited them, their credit per training
image, their share of all credit in the period, the payout from a pool, and the sealed
checkpoint it reconciles to (when the month is sealed). The share and payout are the same
numbers `gmv ledger export --by contributor --pool P` writes (`payouts` is the one
place that computes them), so the statements of all contributors sum to the pool.
Written as CSV and Parquet for finance, and as a self-contained HTML page for the contributor
that shows the top credited generations' thumbnails (when the server kept them) beside the
training images they were credited for (when a manifest says where those are).
"""
from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .ledger import CREDIT_COLUMNS, Window

TOP_GENERATIONS = 12  # shown with thumbnails in the HTML page
THUMB_SIDE = 160


def payouts(items, pool: float | None) -> list[dict]:
    """Each item's fields (a ContributorValue or TrainingValue), its share of all their value and,
    with a pool, payout = pool * share: what export and statements both write."""
    total = sum(c.value for c in items)
    rows = []
    for c in items:
        row = {**c.__dict__, "share": c.value / total if total else 0.0}
        if pool is not None:
            row["payout"] = pool * row["share"]
        rows.append(row)
    return rows


@dataclass
class Statement:
    contributor_id: str
    period: str
    value: float  # the contributor's credit in the period
    share: float  # of all credit in the period
    payout: float | None
    generations: int
    training_images: int
    total_credit: float  # all contributors'
    per_image: list[dict] = field(default_factory=list)  # training_id, value, generations
    lines: list[dict] = field(default_factory=list)  # one per credit: CREDIT_COLUMNS
    checkpoint: dict | None = None  # the sealed month it reconciles to, None when not sealed


def statements(ledger, window: Window, period: str, pool: float | None,
               contributor: str | None = None) -> list[Statement]:
    """Statements of every credited contributor (or one) over `window`."""
    shares = payouts(ledger.contributors(window), pool)
    total = sum(row["value"] for row in shares)
    wanted = {row["contributor_id"]: row for row in shares if contributor in (None, row["contributor_id"])}
    if contributor is not None and contributor not in wanted:
        wanted[contributor] = {"contributor_id": contributor, "value": 0.0, "share": 0.0, "generations": 0,
                               "training_images": 0, **({"payout": 0.0} if pool is not None else {})}
    sealed = ledger.checkpoint(period) if period and hasattr(ledger, "checkpoint") else None
    checkpoint = None if sealed is None else {
        "period": sealed.period, "records": sealed.tree_size, "root_hash": sealed.root_hash,
        "total_credit": sealed.total_credit, "key_id": sealed.key_id}
    out = {c: Statement(c, period, row["value"], row["share"], row.get("payout"), row["generations"],
                        row["training_images"], total, checkpoint=checkpoint) for c, row in wanted.items()}
    per_image: dict[str, dict[str, dict]] = {c: {} for c in out}
    for values in ledger.iter_credits(window):
        line = dict(zip(CREDIT_COLUMNS, values))
        statement = out.get(line["contributor_id"])
        if statement is None:
            continue
        statement.lines.append(line)
        image = per_image[line["contributor_id"]].setdefault(
            line["training_id"], {"training_id": line["training_id"], "value": 0.0, "generations": 0})
        image["value"] += line["credit"]
        image["generations"] += 1
    for c, statement in out.items():
        statement.per_image = sorted(per_image[c].values(), key=lambda r: (-r["value"], r["training_id"]))
    return [out[c] for c in sorted(out, key=lambda c: (-out[c].value, c))]


def file_stem(contributor_id: str) -> str:
    """A file name for any contributor id: its safe characters, then a short hash (unique)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", contributor_id)[:60].strip("._") or "contributor"
    return f"{safe}-{hashlib.sha256(contributor_id.encode('utf-8')).hexdigest()[:8]}"


def write_summary(rows: list[Statement], out: Path) -> None:
    """summary.csv and summary.parquet: one row per contributor (reconciles with the export)."""
    columns = ["contributor_id", "value", "generations", "training_images", "share", "payout"]
    records = [{"contributor_id": s.contributor_id, "value": s.value, "generations": s.generations,
                "training_images": s.training_images, "share": s.share, "payout": s.payout} for s in rows]
    _write_table(records, columns, out / "summary")


def write_statement(statement: Statement, out: Path, thumbnails=None, training_paths: dict | None = None) -> Path:
    """STEM.csv and STEM.parquet (one row per credit) and STEM.html; returns the HTML's path."""
    stem = out / file_stem(statement.contributor_id)
    columns = list(CREDIT_COLUMNS)
    _write_table([{**line, "recorded_at": _iso(line["recorded_at"])} for line in statement.lines], columns, stem)
    page = stem.with_suffix(".html")
    _atomic_text(page, render_html(statement, thumbnails, training_paths or {}))
    return page


def _write_table(records: list[dict], columns: list[str], stem: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    stem.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(records)
    _atomic_text(stem.with_suffix(".csv"), buffer.getvalue())
    table = pa.table({c: [r.get(c) for r in records] for c in columns}) if records else pa.table(
        {c: pa.array([], type=pa.string()) for c in columns})
    partial = stem.with_suffix(".parquet.partial")
    pq.write_table(table, partial)
    os.replace(partial, stem.with_suffix(".parquet"))


def _atomic_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _iso(seconds: float) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _data_uri(path: Path | None) -> str | None:
    """A small JPEG of an image file as a data: URI (the page is one self-contained file)."""
    if path is None:
        return None
    try:
        from PIL import Image

        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMB_SIDE, THUMB_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def render_html(statement: Statement, thumbnails, training_paths: dict) -> str:
    e = html.escape
    money = (f"{statement.payout:,.2f}" if statement.payout is not None else "– (no pool given)")
    if statement.checkpoint:
        c = statement.checkpoint
        reconcile = (f"Sealed checkpoint of {e(c['period'])}: {c['records']} records, total credit "
                     f"{c['total_credit']:.6f}, root hash <code>{e(c['root_hash'])}</code> (key {e(str(c['key_id']))}). "
                     "Check any generation below against it with <code>gmv ledger prove</code>.")
    else:
        reconcile = f"{e(statement.period or 'This period')} is not sealed yet: figures may still change."
    top = sorted(statement.lines, key=lambda line: -line["credit"])[:TOP_GENERATIONS]
    cards = []
    for line in top:
        generated = _data_uri(thumbnails.path(line["tenant_id"], line["generation_id"]) if thumbnails else None)
        training = _data_uri(training_paths.get(line["training_id"]))
        def picture(uri, alt):
            return f'<img src="{uri}" alt="{e(alt)}">' if uri else f'<div class="missing">{e(alt)}<br>(not kept)</div>'
        cards.append(
            '<div class="pair">'
            f'<figure>{picture(generated, "generated image")}<figcaption>generation {e(line["generation_id"])}'
            f'<br>{_iso(line["recorded_at"])}</figcaption></figure>'
            f'<figure>{picture(training, "your training image")}<figcaption>your image {e(line["training_id"])}'
            f'</figcaption></figure>'
            f'<p>credit {line["credit"]:.6f} (rank {line["rank"]}, distance {line["distance"]:.4f}, '
            f'quality {line["quality"]:.3f})</p></div>')
    images = "".join(f"<tr><td>{e(r['training_id'])}</td><td>{r['value']:.6f}</td><td>{r['generations']}</td></tr>"
                     for r in statement.per_image)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Statement for {e(statement.contributor_id)}, {e(statement.period)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; background: #fff; }}
h1 {{ font-size: 1.5em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }} td:first-child {{ text-align: left; }}
.summary td {{ text-align: left; }} .pairs {{ display: flex; flex-wrap: wrap; gap: 16px; }}
.pair {{ border: 1px solid #ddd; padding: 8px; width: 360px; }} figure {{ display: inline-block; vertical-align: top; margin: 4px; width: 165px; }}
img {{ width: 160px; height: 160px; object-fit: contain; background: #f4f4f4; }}
.missing {{ width: 160px; height: 160px; background: #eee; color: #777; display: flex; align-items: center;
  justify-content: center; text-align: center; }}
</style></head><body>
<h1>Royalty statement: {e(statement.contributor_id)}</h1>
<table class="summary">
<tr><th>period</th><td>{e(statement.period)}</td></tr>
<tr><th>your credit</th><td>{statement.value:.6f} of {statement.total_credit:.6f} in all</td></tr>
<tr><th>your share of the pool</th><td>{100 * statement.share:.4f}%</td></tr>
<tr><th>payout</th><td>{money}</td></tr>
<tr><th>generations that credited you</th><td>{statement.generations}</td></tr>
<tr><th>your images credited</th><td>{statement.training_images}</td></tr>
</table>
<p>{reconcile}</p>
<h2>Why: the generations that credited you most</h2>
<div class="pairs">{''.join(cards) or '<p>No generation credited you in this period.</p>'}</div>
<h2>Credit per image</h2>
<table><tr><th>training image</th><th>credit</th><th>generations</th></tr>{images}</table>
</body></html>
"""
