"""Ingest on the real embedded Milvus: resumable, deduplicating, and strict about bad rows."""
import shutil

import pytest
from PIL import Image

from gmv_engine.errors import ManifestError
from gmv_engine.milvus.index import IndexParams
from gmv_engine.ingest import ingest, read_manifest, scan_folder

from helpers import make_info, write_csv


@pytest.fixture()
def small_set(digits, tmp_path):
    """Twelve digits copied into a folder of their own, and a manifest naming them."""
    rows = read_manifest(digits.manifest)[:12]
    folder = tmp_path / "images"
    folder.mkdir()
    for row in rows:
        shutil.copy(row.path, folder / f"{row.training_id}.png")
    return [[f"images/{row.training_id}.png", row.training_id, row.contributor_id, row.metadata["label"]] for row in rows]


def build(index, name, manifest, components):
    encoder, reranker = components
    return ingest(index, name, read_manifest(manifest), make_info(encoder, reranker), encoder, reranker,
                  IndexParams(nlist=2), batch_size=5, progress=False)


@pytest.mark.e2e  # builds and waits for an index
def test_rerun_is_resumable_and_inserts_nothing_twice(index, tmp_path, small_set, offline_components):
    manifest = write_csv(tmp_path / "m.csv", ["path", "training_id", "contributor_id", "label"], small_set[:7])
    first = build(index, "ingest_resume", manifest, offline_components)
    assert (first.inserted, first.already_present, first.bad) == (7, 0, [])
    manifest = write_csv(tmp_path / "m.csv", ["path", "training_id", "contributor_id", "label"], small_set)
    second = build(index, "ingest_resume", manifest, offline_components)
    assert (second.inserted, second.already_present, second.bad) == (5, 7, [])
    assert index.count("ingest_resume") == 12
    assert second.index_state["indexed_rows"] == second.index_state["total_rows"] == 12


@pytest.mark.e2e  # builds and waits for an index
def test_exact_duplicate_images_are_skipped_and_counted(index, tmp_path, small_set, offline_components):
    duplicate = [small_set[0][0], "same-bytes-other-id", "someone-else", small_set[0][3]]
    manifest = write_csv(tmp_path / "m.csv", ["path", "training_id", "contributor_id", "label"], [*small_set[:3], duplicate])
    report = build(index, "ingest_dedup", manifest, offline_components)
    assert (report.inserted, report.duplicates, report.bad) == (3, 1, [])
    assert index.existing("ingest_dedup", ["same-bytes-other-id"]) == {}
    # Against the index too: a later run with the same image under a new id is skipped.
    manifest = write_csv(tmp_path / "m2.csv", ["path", "training_id", "contributor_id"], [[small_set[1][0], "again", "x"]])
    again = build(index, "ingest_dedup", manifest, offline_components)
    assert (again.inserted, again.duplicates) == (0, 1)


@pytest.mark.e2e  # builds and waits for an index
def test_bad_rows_are_reported_by_line_and_never_inserted(index, tmp_path, small_set, offline_components):
    (tmp_path / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [
        small_set[0],  # line 2: good
        ["images/absent.png", "missing-file", "c1", 0],  # line 3
        ["images/corrupt.png", "corrupt-file", "c1", 0],  # line 4
        [small_set[1][0], small_set[0][1], "c1", 0],  # line 5: training_id of line 2, other image
        [small_set[2][0], "no-contributor", "", 0],  # line 6
        small_set[3],  # line 7: good
    ]
    manifest = write_csv(tmp_path / "m.csv", ["path", "training_id", "contributor_id", "label"], rows)
    report = build(index, "ingest_bad", manifest, offline_components)
    bad = {b.where: b.reason for b in report.bad}
    assert set(bad) == {"line 3", "line 4", "line 5", "line 6"}
    assert "cannot read" in bad["line 3"]
    assert "could not be decoded" in bad["line 4"]
    assert "different image content" in bad["line 5"]
    assert "contributor_id" in bad["line 6"]
    assert report.inserted == 2 and index.count("ingest_bad") == 2
    assert index.existing("ingest_bad", ["missing-file", "corrupt-file", "no-contributor"]) == {}
    # The same training_id with other content is refused against the index as well.
    manifest = write_csv(tmp_path / "m2.csv", ["path", "training_id", "contributor_id"], [[small_set[5][0], small_set[3][1], "c"]])
    later = build(index, "ingest_bad", manifest, offline_components)
    assert [b.where for b in later.bad] == ["line 2"] and index.count("ingest_bad") == 2


def test_manifest_without_required_columns(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["file", "training_id"], [["a.png", "a"]])
    with pytest.raises(ManifestError, match="contributor_id"):
        read_manifest(manifest)
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(tmp_path / "absent.csv")


def test_manifest_keeps_metadata_and_resolves_relative_paths(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", ["path", "training_id", "contributor_id", "license", "label"],
                         [["sub/a.png", "a", "alice", "cc-by", "3"]])
    (row,) = read_manifest(manifest)
    assert row.path == tmp_path / "sub" / "a.png" and row.line == 2
    assert row.metadata == {"license": "cc-by", "label": "3"}


def test_folder_mode_ids_and_contributors(tmp_path, index, offline_components):
    for contributor, names in {"alice": ["a1.png", "a2.png"], "bob": ["nested/b1.png"]}.items():
        for i, name in enumerate(names):
            path = tmp_path / "set" / contributor / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (40 * i, 90, 200 if contributor == "bob" else 10)).save(path)
    rows = scan_folder(tmp_path / "set")
    assert [(r.training_id, r.contributor_id) for r in rows] == [
        ("alice/a1.png", "alice"), ("alice/a2.png", "alice"), ("bob/nested/b1.png", "bob")]
    with pytest.raises(ManifestError, match="not a folder"):
        scan_folder(tmp_path / "absent")


@pytest.mark.e2e  # builds and waits for an index
def test_resumed_run_with_bounded_lookups(index, tmp_path, small_set, offline_components, monkeypatch):
    """A run older than BOUNDED_LOOKUPS_AFTER_S looks rows up with Bounded reads (here: at
    once): the rows an earlier, finished run wrote are still found, not inserted again."""
    import gmv_engine.ingest as ingest_module

    manifest = write_csv(tmp_path / "m.csv", ["path", "training_id", "contributor_id", "label"], small_set[:6])
    first = build(index, "ingest_bounded", manifest, offline_components)
    assert (first.inserted, first.bad) == (6, [])
    monkeypatch.setattr(ingest_module, "BOUNDED_LOOKUPS_AFTER_S", -1.0)
    rows = [*small_set[:10], [small_set[0][0], "same-bytes-new-id", "x", 0], [small_set[1][0], small_set[2][1], "x", 0]]
    manifest = write_csv(tmp_path / "m.csv", ["path", "training_id", "contributor_id", "label"], rows)
    second = build(index, "ingest_bounded", manifest, offline_components)
    assert (second.inserted, second.already_present, second.duplicates) == (4, 6, 1)
    assert [b.where for b in second.bad] == ["line 13"] and "different image content" in second.bad[0].reason
    assert index.count("ingest_bounded") == 10
    assert set(second.seconds) == {"rows", "index", "calibration"} and "rows/s" in second.timing()
