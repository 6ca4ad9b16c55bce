"""`gmv models status` from local files only: no network, no model built, fast."""
import json
import os
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


def test_model_dir_fixture_restores_everything(tmp_path_factory):
    # Runs after the tests above (file order): nothing they configured is left behind.
    import torch.hub

    base = str(tmp_path_factory.getbasetemp())
    assert base not in str(models._model_dir) and base not in torch.hub.get_dir()
    assert base not in os.environ.get("TORCH_HOME", "") and base not in os.environ.get("HF_HOME", "")
