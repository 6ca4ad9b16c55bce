"""Contributors' statements on both ledger backends, the thumbnail store, and the HTML page
rendered in a real headless browser (Debian's chromium)."""
from __future__ import annotations

import calendar
import csv
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from gmv_engine.ledger import Window, open_ledger
from gmv_engine.statements import file_stem, statements, write_statement, write_summary
from gmv_engine.thumbnails import ThumbnailStore

from test_ledger import make_record

GMV = [sys.executable, "-m", "gmv_server.cli"]
OCTOBER = calendar.timegm((2026, 10, 1, 0, 0, 0))
MONTH = Window(OCTOBER, calendar.timegm((2026, 11, 1, 0, 0, 0)))


def october(ledger):
    """Six generations in October 2026 (and one in September, outside the statements)."""
    records = [make_record(f"g{i}", credits, recorded_at=OCTOBER + 3600 * i, tenant=f"tenant-{i % 2}")
               for i, credits in enumerate([
                   [("a", "x", 0.5), ("c", "y", 0.25)], [("a", "x", 0.25), ("b", "x", 0.125)],
                   [("c", "y", 0.5)], [("d", "z", 0.75), ("a", "x", 0.125)], [("b", "x", 0.3), ("d", "z", 0.3)],
                   [("c", "y", 0.9)]])]
    records.append(make_record("early", [("a", "x", 1.0)], recorded_at=OCTOBER - 10))
    for record in records:
        ledger.record(record)
    return records


def test_statements_sum_to_the_pool_and_follow_the_ledger(ledger_url):
    with open_ledger(ledger_url) as ledger:
        october(ledger)
        every = statements(ledger, MONTH, "2026-10", pool=1000.0)
        assert [s.contributor_id for s in every] == ["y", "x", "z"]  # largest credit first
        assert sum(s.payout for s in every) == pytest.approx(1000.0)
        assert sum(s.share for s in every) == pytest.approx(1.0)
        x = next(s for s in every if s.contributor_id == "x")
        assert x.value == pytest.approx(0.5 + 0.25 + 0.125 + 0.125 + 0.3)  # not September's 1.0
        assert {r["training_id"]: r["value"] for r in x.per_image} == pytest.approx(
            {"a": 0.875, "b": 0.425})
        assert len(x.lines) == 5 and {line["generation_id"] for line in x.lines} == {"g0", "g1", "g3", "g4"}
        assert x.generations == 4 and x.training_images == 2 and x.checkpoint is None
        (alone,) = statements(ledger, MONTH, "2026-10", pool=1000.0, contributor="x")
        assert alone.payout == pytest.approx(x.payout)
        (nobody,) = statements(ledger, MONTH, "2026-10", pool=1000.0, contributor="never")
        assert nobody.value == 0 and nobody.payout == 0 and nobody.lines == []


def test_thumbnail_store_is_bounded(tmp_path):
    rng = np.random.default_rng(0)
    store = ThumbnailStore(tmp_path / "thumbs", max_bytes=60_000)
    for i in range(40):  # noise compresses badly: each thumbnail is several KB
        store.put("t", f"g{i}", Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)))
    kept = list((tmp_path / "thumbs").glob("*/*.jpg"))
    assert sum(p.stat().st_size for p in kept) <= 60_000 and 0 < len(kept) < 40
    assert store.path("t", "g39") is not None and store.path("t", "g0") is None  # the oldest went first
    with Image.open(store.path("t", "g39")) as image:
        assert max(image.size) == 160


def test_statement_files_and_the_page_in_a_real_browser(tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make test installs it where apt works)")
    with open_ledger(f"sqlite:///{tmp_path / 'ledger.db'}") as ledger:
        october(ledger)
        every = statements(ledger, MONTH, "2026-10", pool=1000.0)
    store = ThumbnailStore(tmp_path / "thumbs", max_bytes=10_000_000)
    rng = np.random.default_rng(1)
    store.put("tenant-0", "g0", Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    training = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(training)
    out = tmp_path / "statements"
    write_summary(every, out)
    x = next(s for s in every if s.contributor_id == "x")
    page = write_statement(x, out, store, {"a": training})
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert sum(float(r["payout"]) for r in rows) == pytest.approx(1000.0)
    assert len(list(csv.DictReader((out / f"{file_stem('x')}.csv").open()))) == 5
    import pyarrow.parquet as pq

    assert pq.read_table(out / "summary.parquet").num_rows == 3
    text = page.read_text()
    assert "Royalty statement: x" in text and text.count("data:image/jpeg;base64,") >= 2
    shot = tmp_path / "page.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,900", page.as_uri()], capture_output=True, timeout=60)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[:2] == (900, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables and thumbnails, not blank
    red = np.abs(pixels.astype(int) - [200, 30, 30]).max(axis=2) < 12
    assert red.sum() > 1000  # the training image's thumbnail is drawn


def test_gmv_ledger_statement_reconciles_with_export(tmp_path):
    """Statements for all contributors sum to the pool and match `gmv ledger export` row by row."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with open_ledger(url) as ledger:
        october(ledger)
    common = ["--ledger-url", url, "--month", "2026-10", "--pool", "1000"]
    made = subprocess.run([*GMV, "ledger", "statement", "--out", str(tmp_path / "st"), *common],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert "wrote 3 statement(s) for 2026-10" in made.stdout and "month not sealed" in made.stdout
    exported = subprocess.run([*GMV, "ledger", "export", "--out", str(tmp_path / "pay.csv"), *common],
                              capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0, exported.stderr
    summary = {r["contributor_id"]: r for r in csv.DictReader((tmp_path / "st" / "summary.csv").open())}
    export = {r["contributor_id"]: r for r in csv.DictReader((tmp_path / "pay.csv").open())}
    assert summary.keys() == export.keys() == {"x", "y", "z"}
    for c in summary:
        assert float(summary[c]["payout"]) == pytest.approx(float(export[c]["payout"]))
        assert float(summary[c]["value"]) == pytest.approx(float(export[c]["value"]))
    assert sum(float(r["payout"]) for r in summary.values()) == pytest.approx(1000.0)
    assert all((tmp_path / "st" / f"{file_stem(c)}.html").is_file() for c in summary)
    one = subprocess.run([*GMV, "ledger", "statement", "--contributor", "z", "--out", str(tmp_path / "z"), *common],
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and "wrote 1 statement(s)" in one.stdout, one.stderr
