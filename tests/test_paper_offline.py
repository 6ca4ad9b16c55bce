"""The `paper` profile (VGG-16, DreamSim, MANIQA) run end to end with no network, from a model
directory of STAND-IN weights: random values in exactly the files and formats each library
loads from its cache (tests/standin_weights.py says what is stand-in). Every library loads them
with its own loader, strictly where it loads strictly, so these tests prove GMV's loading code,
its model-dir layout and `gmv models pack|unpack`; they say nothing of attribution quality.

The stand-in folder (2.4 GB) is built once per session, in a subprocess, in about 40 s on two
CPU cores; the end-to-end attribution costs most of the rest (MANIQA scores 20 crops of a
ViT-B/8 per image: about 30 s per image on two cores, once at warm-up and once per call).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from PIL import Image

from helpers import start_server, stop_server

pytestmark = pytest.mark.e2e  # builds 2.4 GB of stand-in weights and runs gmv commands on them

ROOT = Path(__file__).resolve().parents[1]
GMV = [sys.executable, "-m", "gmv_server.cli"]
PAPER = ("vgg16", "dreamsim", "maniqa")


@pytest.fixture(scope="session")
def no_network_env(tmp_path_factory) -> dict[str, str]:
    """The environment of every command here: Hugging Face offline, an empty HOME and cache
    (nothing may come from this machine's own caches), and HTTP(S) through a proxy on a closed
    port, so that any download fails at once instead of waiting on DNS."""
    home = tmp_path_factory.mktemp("empty-home")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "GMV_MODEL_DIR")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), HF_HUB_OFFLINE="1",
               http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               no_proxy="127.0.0.1,localhost", NO_PROXY="127.0.0.1,localhost")
    return env


@pytest.fixture(scope="session")
def standin_dir(tmp_path_factory, no_network_env) -> Iterator[Path]:
    """A --model-dir holding STAND-IN (random) weights for vgg16, dreamsim and maniqa. It and
    the bundle and unpacked copy below (7 GB together) are deleted afterwards: pytest keeps
    the temporary folders of the last three sessions."""
    root = tmp_path_factory.mktemp("standin-models")
    started = time.perf_counter()
    built = subprocess.run([sys.executable, str(ROOT / "tests" / "standin_weights.py"), str(root)], cwd=ROOT,
                           env=no_network_env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    print(f"stand-in model dir built in {time.perf_counter() - started:.1f} s")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def gmv(env, *args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([*GMV, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def status_lines(result) -> dict[str, str]:
    return {line.split(":", 1)[0]: line for line in result.stdout.splitlines() if ":" in line}


@pytest.fixture(scope="module")
def bundle(standin_dir, no_network_env, tmp_path_factory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("bundle") / "paper-weights.tar"
    packed = gmv(no_network_env, "models", "pack", "--profile", "paper", "--out", str(out),
                 "--model-dir", str(standin_dir))
    assert packed.returncode == 0, packed.stderr
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def unpacked_dir(bundle, no_network_env, tmp_path_factory) -> Iterator[Path]:
    target = tmp_path_factory.mktemp("unpacked-models")
    unpacked = gmv(no_network_env, "models", "unpack", str(bundle), "--model-dir", str(target))
    assert unpacked.returncode == 0, unpacked.stderr
    yield target
    shutil.rmtree(target, ignore_errors=True)


def test_status_reports_the_paper_profile_present(standin_dir, no_network_env):
    result = gmv(no_network_env, "models", "status", "--profile", "paper", "--model-dir", str(standin_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = status_lines(result)
    for name in PAPER:
        assert lines[name].startswith(f"{name}: present"), lines


def test_pack_writes_exactly_the_required_files_with_a_manifest(bundle, standin_dir):
    with tarfile.open(bundle) as tar:
        members = tar.getmembers()
        manifest = json.loads(tar.extractfile(members[0]).read())
    assert members[0].name == "gmv-model-bundle.json"
    assert manifest["profile"] == "paper" and manifest["models"] == list(PAPER) and manifest["gmv_version"]
    paths = [entry["path"] for entry in manifest["files"]]
    assert [member.name for member in members[1:]] == paths
    timm_repo = "huggingface/hub/models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k"
    assert set(paths) == {
        "torch/hub/checkpoints/vgg16-397923af.pth",
        "dreamsim/dino_vitb16_pretrain.pth", "dreamsim/open_clip_vitb16_pretrain.pth.tar",
        "dreamsim/clip_vitb16_pretrain.pth.tar", "dreamsim/ensemble_lora/adapter_config.json",
        "dreamsim/ensemble_lora/adapter_model.safetensors", "dreamsim/checkpoints/dino_vitbase16_pretrain.pth",
        "dreamsim/facebookresearch_dino_main/hubconf.py",  # the hub folder whole: hubconf imports its neighbour
        "dreamsim/facebookresearch_dino_main/vision_transformer.py",
        "torch/hub/pyiqa/ckpt_koniq10k.pt",
        f"{timm_repo}/refs/main",  # an offline hf_hub_download resolves "main" through it
        f"{timm_repo}/snapshots/{(standin_dir / timm_repo / 'refs' / 'main').read_text()}/model.safetensors",
    }
    for entry in manifest["files"]:  # the snapshot is a symlink into blobs/: packed as the file it points to
        assert entry["size"] == (standin_dir / entry["path"]).stat().st_size
        assert len(entry["sha256"]) == 64


def test_unpacked_bundle_is_reported_present(unpacked_dir, standin_dir, no_network_env):
    result = gmv(no_network_env, "models", "status", "--profile", "paper", "--model-dir", str(unpacked_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(status_lines(result)[name].startswith(f"{name}: present") for name in PAPER)
    assert not [path for path in unpacked_dir.iterdir() if path.name.startswith(".gmv-unpack-")]
    snapshot = next(unpacked_dir.glob("huggingface/hub/models--timm--*/snapshots/*/model.safetensors"))
    assert snapshot.read_bytes()[:4096] == next(standin_dir.glob("huggingface/hub/models--timm--*/snapshots/*/"
                                                                  "model.safetensors")).read_bytes()[:4096]


def test_a_corrupted_bundle_is_refused_and_changes_nothing(bundle, no_network_env, tmp_path):
    target = tmp_path / "models"
    target.mkdir()
    (target / "already-here.txt").write_text("kept")
    with tarfile.open(bundle) as tar:
        victim = next(m for m in tar.getmembers() if m.name == "dreamsim/dino_vitb16_pretrain.pth")  # third file
    position = victim.offset_data + victim.size // 2
    with bundle.open("r+b") as handle:
        handle.seek(position)
        original = handle.read(1)
        handle.seek(position)
        handle.write(bytes([original[0] ^ 0xFF]))
    try:
        result = gmv(no_network_env, "models", "unpack", str(bundle), "--model-dir", str(target))
    finally:
        with bundle.open("r+b") as handle:
            handle.seek(position)
            handle.write(original)
    assert result.returncode == 2
    assert "dreamsim/dino_vitb16_pretrain.pth" in result.stderr and "sha256" in result.stderr, result.stderr
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*")) == ["already-here.txt"]


def test_paper_profile_indexes_serves_and_attributes_offline(milvus, standin_dir, unpacked_dir, no_network_env,
                                                             tmp_path, monkeypatch):
    """`gmv index build --profile paper` from the stand-in folder, `gmv serve --profile paper` from the bundle
    unpacked elsewhere, one attribution through the Python client: credits that sum to q.
    The query is a training image: identical weights in both folders embed it identically, so
    it comes back first at distance 0 (a check of the files, not of attribution quality)."""
    from gmv_client import GMVClient

    rng = np.random.default_rng(7)
    images = tmp_path / "training"
    for i in range(20):
        path = images / f"contributor-{i % 4}" / f"image-{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    collection = f"paper_standin_{os.getpid()}"

    started = time.perf_counter()
    built = gmv(no_network_env, "index", "build", "--images", str(images), "--collection", collection,
                "--profile", "paper", "--model-dir", str(standin_dir), "--device", "cpu",
                "--milvus-uri", milvus.uri, "--no-progress")
    assert built.returncode == 0, built.stdout + built.stderr
    assert "20 inserted" in built.stdout and "re-ranker dreamsim" in built.stderr, built.stdout + built.stderr
    print(f"gmv index build --profile paper: {time.perf_counter() - started:.1f} s")

    for name, value in no_network_env.items():  # start_server runs `gmv serve` in this environment
        monkeypatch.setenv(name, value)
    for name in set(os.environ) - set(no_network_env):
        monkeypatch.delenv(name)  # TORCH_HOME and the like
    (tmp_path / "serve").mkdir()
    started = time.perf_counter()
    server = start_server(milvus, collection, tmp_path / "serve" / "serve.log", "--profile", "paper",
                          "--model-dir", str(unpacked_dir), "--device", "cpu")
    try:
        print(f"gmv serve SERVING after {time.perf_counter() - started:.1f} s")
        query = images / "contributor-1" / "image-05.png"
        started = time.perf_counter()
        with GMVClient(server["target"]) as client:
            result = client.attribute(query.read_bytes(), "paper-offline-1", timeout_s=300)
        print(f"one attribution: {time.perf_counter() - started:.1f} s")
    finally:
        stop_server(server)
    log = server["log"].read_text()
    assert "SERVING collection" in log and "(3 models loaded)" in log, log
    assert f"from {unpacked_dir}/torch/hub/pyiqa/ckpt_koniq10k.pt" in log, log  # pyiqa's own cache path, not DreamSim's
    assert "Downloading" not in log, log
    assert 0.0 < result.quality <= 1.0
    assert result.credits and sum(c.credit for c in result.credits) == pytest.approx(result.quality, rel=1e-5)
    assert result.credits[0].training_id == "contributor-1/image-05.png"
    assert result.credits[0].distance == pytest.approx(0.0, abs=1e-5)
