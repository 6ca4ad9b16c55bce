"""The `gmv` command as a user runs it: real subprocesses, real Milvus."""
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gmv_engine.milvus.embedded import free_port

pytestmark = pytest.mark.e2e  # starts real servers or subprocesses

GMV = [sys.executable, "-m", "gmv_server.cli"]


def gmv(*args, timeout=300):
    return subprocess.run([*GMV, *args], capture_output=True, text=True, timeout=timeout)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes containing `text` (read from /proc: ps truncates)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


@pytest.fixture(scope="module")
def folder_collection(milvus, digits, tmp_path_factory):
    """`gmv index build --images` over 60 training digits in contributor folders."""
    root = tmp_path_factory.mktemp("folder")
    for png in sorted((digits.root / "train").glob("digit-*/*.png"))[::27][:60]:
        target = root / png.parent.name / png.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(png, target)
    result = gmv("index", "build", "--images", str(root), "--collection", "cli_digits", "--profile", "offline",
                 "--milvus-uri", milvus.uri, "--no-progress")
    assert result.returncode == 0, result.stderr
    return result


def test_index_build_reports_ivf_pq(folder_collection):
    assert "60 inserted" in folder_collection.stdout
    assert "index IVF_PQ" in folder_collection.stdout and "60/60 rows indexed" in folder_collection.stdout


def test_attribute_json_lines(milvus, digits, folder_collection, tmp_path):
    heldout = sorted((digits.root / "heldout").glob("*.png"))[:3]
    result = gmv("attribute", *map(str, heldout), "--collection", "cli_digits", "--top-k", "5", "--json",
                 "--milvus-uri", milvus.uri, "--data-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["generation_id"] for r in records] == [p.stem for p in heldout]
    for record in records:
        assert set(record) == {"generation_id", "image", "quality", "credits", "contributors"}
        assert [c["rank"] for c in record["credits"]] == [1, 2, 3, 4, 5]
        assert set(record["credits"][0]) == {"rank", "training_id", "contributor_id", "credit", "distance"}
        assert record["credits"][0]["training_id"].startswith("digit-")  # folder mode: relative path
        assert sum(c["credit"] for c in record["credits"]) == pytest.approx(record["quality"])
        assert sum(c["credit"] for c in record["contributors"]) == pytest.approx(record["quality"])


def test_attribute_table_and_bad_image(milvus, digits, folder_collection, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    good = sorted((digits.root / "heldout").glob("*.png"))[0]
    result = gmv("attribute", str(good), str(bad), "--collection", "cli_digits", "--milvus-uri", milvus.uri,
                 "--data-dir", str(tmp_path))
    assert result.returncode == 1
    assert f"{bad}: image could not be decoded" in result.stderr
    assert "quality q =" in result.stdout and "contributors:" in result.stdout


def test_unknown_collection_is_a_clear_error(milvus, digits, tmp_path):
    good = sorted((digits.root / "heldout").glob("*.png"))[0]
    result = gmv("attribute", str(good), "--collection", "nope", "--milvus-uri", milvus.uri, "--data-dir", str(tmp_path))
    assert result.returncode == 2
    assert "collection 'nope' does not exist" in result.stderr and "gmv index build" in result.stderr


def test_serve_refuses_a_collection_of_another_profile(milvus, folder_collection, tmp_path):
    result = gmv("serve", "--collection", "cli_digits", "--profile", "paper", "--milvus-uri", milvus.uri,
                 "--data-dir", str(tmp_path), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert "built with the 'offline' profile, not 'paper'" in result.stderr


def test_unreachable_milvus_is_a_clear_error(digits, tmp_path):
    good = sorted((digits.root / "heldout").glob("*.png"))[0]
    result = gmv("attribute", str(good), "--collection", "x", "--milvus-uri", f"http://127.0.0.1:{free_port()}",
                 "--data-dir", str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert "gmv: error:" in result.stderr and "Milvus" in result.stderr


def test_embedded_milvus_is_started_and_stopped(tmp_path):
    data_dir = tmp_path / "gmvdata"
    result = gmv("index", "info", "--data-dir", str(data_dir), "--milvus-port", str(free_port()))
    assert result.returncode == 0, result.stderr
    assert "embedded Milvus is up" in result.stderr
    assert (data_dir / "milvus").is_dir()
    assert processes_mentioning(str(data_dir)) == []
    # A failing command (missing collection) stops it too, and the same data dir serves again.
    result = gmv("index", "info", "--collection", "nope", "--data-dir", str(data_dir), "--milvus-port", str(free_port()))
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert processes_mentioning(str(data_dir)) == []


def test_sigterm_stops_the_embedded_milvus(tmp_path, digits):
    data_dir = tmp_path / "interrupted"
    process = subprocess.Popen(
        [*GMV, "index", "build", "--manifest", str(digits.manifest), "--collection", "interrupted", "--profile", "offline",
         "--data-dir", str(data_dir), "--milvus-port", str(free_port()), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not processes_mentioning(f"{data_dir}/milvus/bin/milvus"):
        time.sleep(0.5)
    assert processes_mentioning(f"{data_dir}/milvus/bin/milvus"), "the embedded Milvus never started"
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    assert process.returncode != 0
    assert processes_mentioning(str(data_dir)) == []


def test_models_status_says_what_is_missing():
    offline = gmv("models", "status", "--profile", "offline")
    assert offline.returncode == 0, offline.stderr
    assert "pixels: present" in offline.stdout and "piqe: present" in offline.stdout
    paper = gmv("models", "status", "--model", "vgg16")
    if paper.returncode == 0:
        pytest.skip("vgg16 weights are cached on this machine")
    assert paper.returncode == 2 and "vgg16: MISSING" in paper.stdout and "gmv models download" in paper.stdout


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_busy_port_is_refused_before_milvus_starts(tmp_path, flag):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = "--metrics-port" if flag == "--port" else "--port"
        started = time.monotonic()
        result = gmv("serve", "--collection", "x", "--host", "127.0.0.1", flag, str(port), other, str(free_port()),
                     "--data-dir", str(tmp_path / "data"), "--milvus-port", str(free_port()), timeout=60)
    assert result.returncode == 2
    assert f"port {port} ({flag})" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "data" / "milvus").exists()  # refused before the embedded Milvus started
    assert time.monotonic() - started < 30


def test_gmv_milvus_start_serves_every_command_on_its_data_dir_until_stopped(tmp_path, digits):
    """`gmv milvus start` keeps the embedded Milvus of a data dir up in the background; other
    commands on that data dir use it instead of starting their own; stop (or kill -9 of its
    process) leaves nothing behind."""
    import os

    data_dir = tmp_path / "dev"
    flags = ("--data-dir", str(data_dir), "--milvus-port", str(free_port()))
    manifest = digits.manifest.parent / "small-for-gmv-milvus.csv"  # paths in it are relative to it
    manifest.write_text("\n".join(digits.manifest.read_text().splitlines()[:41]) + "\n")
    try:
        started = gmv("milvus", "start", *flags)
        assert started.returncode == 0 and "started the embedded Milvus" in started.stdout, started.stderr
        assert gmv("milvus", "start", *flags).stdout.startswith("already running at http://127.0.0.1:")
        status = gmv("milvus", "status", *flags)
        assert status.returncode == 0 and "gmv milvus run" in status.stdout
        built = gmv("index", "build", "--manifest", str(manifest), "--collection", "dev", "--profile", "offline",
                    "--no-progress", *flags)
        assert built.returncode == 0, built.stderr
        info = gmv("index", "info", "--collection", "dev", *flags)
        assert info.returncode == 0 and json.loads(info.stdout)["collection"] == "dev", info.stderr
        for result in (built, info):
            assert "using the embedded Milvus of pid" in result.stderr and "embedded Milvus is up" not in result.stderr
        stopped = gmv("milvus", "stop", *flags)
        assert stopped.returncode == 0 and "stopped" in stopped.stdout
        assert gmv("milvus", "status", *flags).returncode == 3
        assert processes_mentioning(str(data_dir)) == []
        # kill -9 of the background process: its Milvus goes too (the death pipe), at once.
        assert gmv("milvus", "start", *flags).returncode == 0
        pid = int(gmv("milvus", "status", *flags).stdout.split("(pid ")[1].split(",")[0])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while processes_mentioning(str(data_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert processes_mentioning(str(data_dir)) == []
    finally:
        gmv("milvus", "stop", *flags)


def test_gmv_demo_runs_end_to_end_with_the_default_feature_store(tmp_path):
    """`make demo`'s command on a fresh data dir, configured by nothing but its flags (the
    session's GMV_FEATURE_STORE removed): it builds with its own embedded Milvus and feature
    store in the data dir, serves through a `gmv serve` of its own, and prints credits."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "GMV_FEATURE_STORE"}
    data_dir = tmp_path / "gmv"
    run = subprocess.run([*GMV, "demo", "--profile", "offline", "--data-dir", str(data_dir), "--workdir",
                          str(tmp_path / "demo"), "--show", "2"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "share of top-10 training images from the generation's own class" in run.stdout
    assert list((data_dir / "features").glob("digits_demo_offline.*/*.f16.npy"))
