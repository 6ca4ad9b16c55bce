"""`gmv models status` from local files only: no network, no model built, fast."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gmv_engine import models, registry
from gmv_engine.errors import MissingWeightsError
from gmv_engine.models import configure_model_dir, weights_status

KINDS = ("encoder", "reranker", "quality")


@pytest.fixture()
def model_dir(tmp_path, monkeypatch):
    """configure_model_dir(tmp_path), undone afterwards: the module global, env vars and torch's hub dir."""
    import torch.hub

    # configure_model_dir writes these to os.environ itself; monkeypatch restores only what it
    # touched, so touch each first (setenv then delenv also restores a variable that was unset).
    for var in ("TORCH_HOME", "HF_HOME", "HF_HUB_OFFLINE"):
        was_set = var in os.environ
        monkeypatch.setenv(var, os.environ.get(var, ""))
        if not was_set:
            monkeypatch.delenv(var)
    # Either would override HF_HOME for the Hugging Face hub.
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setattr(models, "_model_dir", models._model_dir)
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)
    configure_model_dir(tmp_path)
    return tmp_path.resolve()


def touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_vgg16_missing_then_present(model_dir):
    expected = model_dir / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    status = weights_status("encoder", "vgg16")
    assert (status.present, status.needs_weights) == (False, True)
    assert status.looked_in == [str(expected)] and "vgg16-397923af.pth" in status.detail
    touch(expected)
    status = weights_status("encoder", "vgg16")
    assert status.present and status.looked_in == [str(expected)]


def test_hub_dir_follows_the_env_without_a_model_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_model_dir", None)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert weights_status("encoder", "vgg16").looked_in == [str(tmp_path / "th" / "hub" / "checkpoints" / "vgg16-397923af.pth")]
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert weights_status("reranker", "lpips").looked_in[0] == str(
        tmp_path / "xdg" / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")


def test_lpips_needs_alexnet(model_dir):
    status = weights_status("reranker", "lpips")
    assert not status.present and "alexnet-owt-7be5be79.pth" in status.detail
    touch(model_dir / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
    assert weights_status("reranker", "lpips").present  # its calibration layers ship with the package


def test_dreamsim_needs_every_ensemble_file(model_dir):
    cache = model_dir / "dreamsim"
    files = ["dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar", "clip_vitb16_pretrain.pth.tar",
             "ensemble_lora/adapter_config.json", "ensemble_lora/adapter_model.safetensors",
             "facebookresearch_dino_main/hubconf.py", "checkpoints/dino_vitbase16_pretrain.pth"]
    for name in files[:-1]:
        touch(cache / name)
    status = weights_status("reranker", "dreamsim")
    assert not status.present and status.detail == "not found: dino_vitbase16_pretrain.pth"
    assert all(path.startswith(str(cache)) for path in status.looked_in)
    touch(cache / files[-1])
    assert weights_status("reranker", "dreamsim").present


def test_maniqa_needs_its_checkpoint_and_timm_backbone(model_dir):
    touch(model_dir / "torch" / "hub" / "pyiqa" / "ckpt_koniq10k.pt")
    status = weights_status("quality", "maniqa")
    assert not status.present and "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k" in status.detail
    repo = model_dir / "huggingface" / "hub" / "models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k"
    touch(repo / "refs" / "main")
    (repo / "refs" / "main").write_text("abc123")
    touch(repo / "snapshots" / "abc123" / "model.safetensors")
    status = weights_status("quality", "maniqa")
    assert status.present and str(repo / "snapshots" / "abc123" / "model.safetensors") in status.looked_in


@pytest.mark.parametrize("kind, name", [("encoder", "pixels"), ("reranker", "l2"), ("reranker", "none"),
                                        ("quality", "piqe"), ("quality", "none")])
def test_components_without_weights_are_present(model_dir, kind, name):
    status = weights_status(kind, name)
    assert (status.present, status.needs_weights, status.looked_in) == (True, False, [])
    assert status.detail == "needs no pretrained weights"


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown"):
        weights_status("encoder", "no-such-encoder")


def test_every_component_gets_a_status_fast(model_dir):
    started = time.perf_counter()
    statuses = [weights_status(kind, name) for kind in KINDS for name in registry.names(kind)]
    assert time.perf_counter() - started < 0.5
    assert len(statuses) == sum(len(registry.names(kind)) for kind in KINDS)
    for status in statuses:
        assert status.present or status.looked_in, status  # a missing model says where it looked


SCRIPT = """
import json, sys, time
started = time.perf_counter()
from gmv_engine import registry
from gmv_engine.models import weights_status
found = {f"{k}/{n}": weights_status(k, n).present for k in ("encoder", "reranker", "quality") for n in registry.names(k)}
seconds = time.perf_counter() - started
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("dreamsim", "pyiqa", "timm", "torch", "torchvision",
                                                               "lpips", "huggingface_hub", "requests", "urllib3"))
print(json.dumps({"seconds": seconds, "loaded": loaded, "found": found}))
"""


def test_status_imports_no_model_library(tmp_path):
    # A fresh interpreter: this test process has long imported torch and friends.
    run = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["seconds"] < 2.0
    assert result["found"]["encoder/pixels"] and not result["found"]["encoder/vgg16"]  # HOME is empty


def test_load_pretrained_puts_torch_hub_dir_back(model_dir, tmp_path):
    # DreamSim's constructor calls torch.hub.set_dir(its cache); pyiqa, imported after it, would
    # then look for MANIQA's checkpoint under <dreamsim cache>/pyiqa.
    import torch.hub

    def build():
        torch.hub.set_dir(str(tmp_path / "dreamsim"))
        return "built"

    assert models.load_pretrained("dreamsim", build) == "built"
    assert torch.hub.get_dir() == str(model_dir / "torch" / "hub")

    def fail():
        torch.hub.set_dir(str(tmp_path / "dreamsim"))
        raise FileNotFoundError("no checkpoint")

    with pytest.raises(MissingWeightsError):
        models.load_pretrained("dreamsim", fail)
    assert torch.hub.get_dir() == str(model_dir / "torch" / "hub")


# -- `gmv models pack|unpack` on small files of the right names (tests/test_paper_offline.py
# packs and loads stand-ins of the real formats) ---------------------------------------------

PAPER = [("encoder", "vgg16"), ("reranker", "dreamsim"), ("quality", "maniqa")]
TIMM = "huggingface/hub/models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k"
PAPER_FILES = [
    "torch/hub/checkpoints/vgg16-397923af.pth",
    "dreamsim/dino_vitb16_pretrain.pth", "dreamsim/open_clip_vitb16_pretrain.pth.tar",
    "dreamsim/clip_vitb16_pretrain.pth.tar", "dreamsim/ensemble_lora/adapter_config.json",
    "dreamsim/ensemble_lora/adapter_model.bin",  # the older peft's name: either will do
    "dreamsim/facebookresearch_dino_main/hubconf.py", "dreamsim/facebookresearch_dino_main/vision_transformer.py",
    "dreamsim/facebookresearch_dino_main/utils.py",  # all of the hub repo's code travels
    "dreamsim/checkpoints/dino_vitbase16_pretrain.pth",
    "torch/hub/pyiqa/ckpt_koniq10k.pt",
    f"{TIMM}/refs/main", f"{TIMM}/snapshots/c0ffee/model.safetensors",
]
NOT_PACKED = ["dreamsim/trusted_list", "dreamsim/facebookresearch_dino_main/__pycache__/hubconf.cpython-311.pyc",
              "torch/hub/checkpoints/alexnet-owt-7be5be79.pth", f"{TIMM}/snapshots/c0ffee/config.json"]


def lay_out(place, paths) -> dict[str, bytes]:
    """Write each layout path where `place` maps it, with its own bytes; the Hugging Face
    snapshot as huggingface_hub leaves it: a relative symlink into blobs/."""
    contents = {}
    for path in paths:
        data = b"c0ffee" if path.endswith("refs/main") else f"stand-in bytes of {path}\n".encode() * 50
        target = place(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if "/snapshots/" in path:
            blob = target.parents[2] / "blobs" / f"blob-{len(contents)}"
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            target.write_bytes(data)
        contents[path] = data
    return contents


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_pack_then_unpack_places_exactly_the_files_models_load(model_dir, tmp_path):
    import hashlib
    import tarfile

    contents = lay_out(lambda path: model_dir / path, PAPER_FILES)
    lay_out(lambda path: model_dir / path, NOT_PACKED)
    bundle = tmp_path / "bundle.tar"
    manifest = models.pack_models(PAPER, bundle, profile="paper")
    assert (manifest["format"], manifest["profile"], manifest["models"]) == ("gmv-model-bundle", "paper",
                                                                               ["vgg16", "dreamsim", "maniqa"])
    assert [entry["path"] for entry in manifest["files"]] == sorted(PAPER_FILES)
    for entry in manifest["files"]:
        data = contents[entry["path"]]
        assert (entry["size"], entry["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    with tarfile.open(bundle) as tar:
        assert tar.getnames() == ["gmv-model-bundle.json", *sorted(PAPER_FILES)]
        assert all(member.isfile() for member in tar.getmembers())  # the snapshot symlink packed as its file
    assert not (tmp_path / "bundle.tar.partial").exists()

    other = tmp_path / "other"
    configure_model_dir(other)
    assert not any(weights_status(kind, name).present for kind, name in PAPER)
    placed = models.unpack_models(bundle)
    assert [entry["path"] for entry in placed] == sorted(PAPER_FILES)
    assert [path for path in listing(other) if (other / path).is_file()] == sorted(PAPER_FILES)  # no staging left
    assert all((other / path).read_bytes() == data for path, data in contents.items())
    assert all(weights_status(kind, name).present for kind, name in PAPER)


def test_pack_names_every_missing_file(model_dir, tmp_path):
    lay_out(lambda path: model_dir / path, [p for p in PAPER_FILES if not p.endswith(("vgg16-397923af.pth",
                                                                                      "refs/main"))])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(models.ModelBundleError) as failure:
        models.pack_models(PAPER, out / "bundle.tar", profile="paper")
    message = str(failure.value)
    assert "vgg16: vgg16-397923af.pth" in message and "refs/main" in message and "dreamsim" not in message
    assert listing(out) == []  # nothing written, not even a partial bundle


def test_pack_of_models_without_weights_is_refused(model_dir, tmp_path):
    with pytest.raises(models.ModelBundleError, match="nothing to pack"):
        models.pack_models([("encoder", "pixels"), ("quality", "piqe")], tmp_path / "bundle.tar")


def test_default_caches_pack_and_unpack_in_the_model_dir_layout(tmp_path, monkeypatch):
    """Without --model-dir: torch's hub, the Hugging Face cache and DreamSim's folder map onto
    torch/hub/, huggingface/hub/ and dreamsim/, both ways."""
    monkeypatch.setattr(models, "_model_dir", None)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)

    def caches(base: Path):
        monkeypatch.setenv("TORCH_HOME", str(base / "torch-home"))
        monkeypatch.setenv("HF_HOME", str(base / "hf-home"))
        monkeypatch.setenv("XDG_CACHE_HOME", str(base / "xdg"))
        roots = {"torch/hub": base / "torch-home" / "hub", "huggingface/hub": base / "hf-home" / "hub",
                 "dreamsim": base / "xdg" / "gmv" / "dreamsim"}
        return lambda path: next(root / path[len(prefix) + 1:] for prefix, root in roots.items()
                                 if path.startswith(prefix + "/"))

    place = caches(tmp_path / "here")
    contents = lay_out(place, PAPER_FILES)
    assert list(models.bundle_files(PAPER)) == sorted(PAPER_FILES)
    manifest = models.pack_models(PAPER, tmp_path / "bundle.tar")
    assert [entry["path"] for entry in manifest["files"]] == sorted(PAPER_FILES)

    place = caches(tmp_path / "there")
    models.unpack_models(tmp_path / "bundle.tar")
    assert all(place(path).read_bytes() == data for path, data in contents.items())
    assert all(weights_status(kind, name).present for kind, name in PAPER)


def test_unpack_refuses_a_corrupted_member_and_changes_nothing(model_dir, tmp_path):
    import tarfile

    lay_out(lambda path: model_dir / path, PAPER_FILES)
    bundle = tmp_path / "bundle.tar"
    models.pack_models(PAPER, bundle)
    with tarfile.open(bundle) as tar:
        victim = tar.getmember("dreamsim/ensemble_lora/adapter_model.bin")  # members before it get staged
    raw = bytearray(bundle.read_bytes())
    raw[victim.offset_data + 3] ^= 0x01
    bundle.write_bytes(bytes(raw))

    target = tmp_path / "target"
    configure_model_dir(target)
    touch(target / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth")  # something already there stays as it was
    before = listing(target)
    with pytest.raises(models.ModelBundleError, match=r"dreamsim/ensemble_lora/adapter_model\.bin does not match its "
                                                      r"sha256.*nothing was placed"):
        models.unpack_models(bundle)
    assert listing(target) == before
    assert (target / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth").read_bytes() == b""


def write_bundle(path: Path, files: dict[str, bytes], manifest_paths=None, extra=()) -> Path:
    """A hand-made bundle: the manifest lists `manifest_paths` (default: `files`' paths)."""
    import hashlib
    import io
    import tarfile

    listed = list(files) if manifest_paths is None else manifest_paths
    manifest = {"format": "gmv-model-bundle", "format_version": 1, "gmv_version": "test", "profile": None,
                "models": [], "files": [{"path": p, "size": len(files.get(p, b"")),
                                         "sha256": hashlib.sha256(files.get(p, b"")).hexdigest()} for p in listed]}
    with tarfile.open(path, "w") as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("gmv-model-bundle.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info)
    return path


def symlink_member(name: str, to: str):
    import tarfile

    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, to
    return info


@pytest.mark.parametrize("files, manifest_paths, extra, message", [
    ({"../escape.txt": b"x"}, None, (), "refusing the path '../escape.txt'"),
    ({"torch/hub/../../../escape.txt": b"x"}, None, (), "refusing the path"),
    ({"/tmp/escape.txt": b"x"}, None, (), "refusing the path '/tmp/escape.txt'"),
    ({"elsewhere/escape.txt": b"x"}, None, (), "refusing the path 'elsewhere/escape.txt'"),
    ({"torch/hub/checkpoints/a.pth": b"x", "torch/hub/checkpoints/b.pth": b"y"}, ["torch/hub/checkpoints/a.pth"], (),
     "refusing the member 'torch/hub/checkpoints/b.pth': the manifest does not list it"),
    ({"torch/hub/checkpoints/a.pth": b"x"}, ["torch/hub/checkpoints/a.pth", "torch/hub/checkpoints/b.pth"], (),
     "lacks: torch/hub/checkpoints/b.pth"),
    ({}, ["torch/hub/checkpoints/link.pth"], (symlink_member("torch/hub/checkpoints/link.pth", "/etc/passwd"),),
     "refusing torch/hub/checkpoints/link.pth: not a regular file"),
])
def test_unpack_refuses_unsafe_or_incomplete_bundles(model_dir, tmp_path, files, manifest_paths, extra, message):
    bundle = write_bundle(tmp_path / "bundle.tar", files, manifest_paths, extra)
    before = listing(model_dir)
    with pytest.raises(models.ModelBundleError, match=re.escape(message)):
        models.unpack_models(bundle)
    assert listing(model_dir) == before
    assert not (tmp_path / "escape.txt").exists()


def test_unpack_refuses_a_path_that_a_symlink_leads_outside(model_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (model_dir / "torch" / "hub").mkdir(parents=True)
    (model_dir / "torch" / "hub" / "checkpoints").symlink_to(outside)
    bundle = write_bundle(tmp_path / "bundle.tar", {"torch/hub/checkpoints/vgg16-397923af.pth": b"x"})
    with pytest.raises(models.ModelBundleError, match="leads outside"):
        models.unpack_models(bundle)
    assert listing(outside) == []


def test_unpack_refuses_what_is_not_a_bundle(model_dir, tmp_path):
    import tarfile

    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(__file__, arcname="test.py")
    with pytest.raises(models.ModelBundleError, match="not a GMV model bundle"):
        models.unpack_models(plain)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(models.ModelBundleError, match="not a readable tar"):
        models.unpack_models(tmp_path / "junk.tar")


def test_cli_pack_fails_naming_the_missing_weights(tmp_path):
    out = tmp_path / "bundle.tar"
    run = subprocess.run([sys.executable, "-m", "gmv_server.cli", "models", "pack", "--model", "vgg16", "--out", str(out),
                          "--model-dir", str(tmp_path / "empty")], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 2 and "vgg16-397923af.pth" in run.stderr and "gmv models download" in run.stderr
    assert not out.exists()


def test_model_dir_fixture_restores_everything(tmp_path_factory):
    # Runs after the tests above (file order): nothing they configured is left behind.
    import torch.hub

    base = str(tmp_path_factory.getbasetemp())
    assert base not in str(models._model_dir) and base not in torch.hub.get_dir()
    assert base not in os.environ.get("TORCH_HOME", "") and base not in os.environ.get("HF_HOME", "")
