"""Folder ingest: contributors from the first folder(s) under the root, hidden entries skipped."""
import pytest
from PIL import Image

from gmv_engine.errors import ManifestError
from gmv_engine.ingest import _row_problem, ingest, scan_folder
from gmv_engine.milvus.index import IndexParams

from helpers import make_info


def write_images(root, relative_paths):
    for i, relative in enumerate(relative_paths):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        # Distinct pixels per image: ingest skips exact duplicates.
        Image.new("RGB", (16, 16), (17 * i % 256, 90, (53 * i + 7) % 256)).save(path)


def ids_and_contributors(rows):
    return [(r.training_id, r.contributor_id) for r in rows]


def test_contributor_is_the_first_folder(tmp_path):
    write_images(tmp_path, ["alice/2024/may/x.png", "alice/y.jpg", "bob/z.png"])
    assert ids_and_contributors(scan_folder(tmp_path)) == [
        ("alice/2024/may/x.png", "alice"), ("alice/y.jpg", "alice"), ("bob/z.png", "bob")]


def test_contributor_depth_two(tmp_path):
    write_images(tmp_path, ["alice/2024/may/x.png", "alice/2024/y.png", "alice/z.png"])
    rows = scan_folder(tmp_path, contributor_depth=2)
    assert ids_and_contributors(rows) == [
        ("alice/2024/may/x.png", "alice/2024"), ("alice/2024/y.png", "alice/2024"), ("alice/z.png", "")]
    # Too shallow for the depth asked: a bad row, as an image at the root is.
    assert _row_problem(rows[2]) == "image is not inside a contributor folder"


def test_hidden_files_and_folders_are_skipped(tmp_path):
    write_images(tmp_path, ["alice/a.png", "alice/.b.png", "alice/.thumbs/c.png", ".trash/bob/d.png",
                            "bob/.git/objects/e.png"])
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    assert ids_and_contributors(scan_folder(tmp_path)) == [("alice/a.png", "alice")]


def test_a_root_inside_a_hidden_folder_still_scans(tmp_path):
    root = tmp_path / ".cache" / "set"
    write_images(root, ["alice/a.png"])
    assert ids_and_contributors(scan_folder(root)) == [("alice/a.png", "alice")]


def test_image_at_the_root_is_a_bad_row(tmp_path):
    write_images(tmp_path, ["top.png"])
    (row,) = scan_folder(tmp_path)
    assert (row.training_id, row.contributor_id) == ("top.png", "")
    assert _row_problem(row) == "image is not inside a contributor folder"


def test_bad_depth_and_missing_folder(tmp_path):
    with pytest.raises(ManifestError, match="at least 1"):
        scan_folder(tmp_path, contributor_depth=0)
    with pytest.raises(ManifestError, match="not a folder"):
        scan_folder(tmp_path / "absent")


@pytest.mark.e2e  # builds and waits for an index
def test_ingest_counts_inserts_per_contributor(index, tmp_path, offline_components):
    root = tmp_path / "set"
    write_images(root, ["alice/2024/a1.png", "alice/2024/a2.png", "alice/2025/a3.png", "bob/2024/b1.png",
                        "carol/c1.png", "root.png"])
    encoder, reranker = offline_components

    def run(rows):
        return ingest(index, "folder_depth_test", rows, make_info(encoder, reranker), encoder, reranker,
                      IndexParams(nlist=2), batch_size=4, progress=False)

    rows = scan_folder(root, contributor_depth=2)
    first = run([r for r in rows if r.training_id != "alice/2025/a3.png"])
    assert first.per_contributor == {"alice/2024": 2, "bob/2024": 1}
    assert sorted(b.where.rsplit("/", 1)[-1] for b in first.bad) == ["c1.png", "root.png"]
    assert first.summary().startswith("5 rows: 3 inserted, 0 already present, 0 duplicate images skipped, 2 bad; "
                                      "credit temperature T = ")
    # A rerun counts only this run's new inserts, not the rows already indexed.
    second = run(rows)
    assert second.per_contributor == {"alice/2025": 1}
    assert (second.inserted, second.already_present) == (1, 3)
    assert index.count("folder_depth_test") == 4
