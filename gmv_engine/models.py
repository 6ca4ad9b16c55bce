"""Where pretrained weights live, and turning "weights not here" into a clear error.

Weights come from each library's standard cache (torch hub, Hugging Face hub, DreamSim's
cache folder) or, with --model-dir, from one folder holding all three. At serving time the
Hugging Face hub is put in offline mode so a missing file fails at once instead of after
minutes of retries; `gmv models download` is the one place that reaches the network.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from .errors import MissingWeightsError

T = TypeVar("T")

_model_dir: Path | None = None


def configure_model_dir(model_dir: str | Path | None, allow_download: bool = False) -> None:
    """Point every library's weight cache at `model_dir` (call before the libraries load)."""
    global _model_dir
    if model_dir is not None:
        _model_dir = Path(model_dir).expanduser().resolve()
        _model_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCH_HOME"] = str(_model_dir / "torch")
        os.environ["HF_HOME"] = str(_model_dir / "huggingface")
        import torch.hub

        torch.hub.set_dir(str(_model_dir / "torch" / "hub"))
    if allow_download:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


def dreamsim_cache_dir() -> str:
    if _model_dir is not None:
        return str(_model_dir / "dreamsim")
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gmv" / "dreamsim")


def load_pretrained(model: str, build: Callable[[], T]) -> T:
    """Run `build`, turning a failed weight fetch into MissingWeightsError(model).

    torch.hub's folder is put back afterwards: DreamSim's constructor moves it to its own cache
    (torch.hub.set_dir), and pyiqa, imported after that, would look for MANIQA's checkpoint
    under <dreamsim cache>/pyiqa instead of <torch hub>/pyiqa, then try to download it."""
    hub = sys.modules.get("torch.hub")
    hub_dir = getattr(hub, "_hub_dir", None)
    try:
        return build()
    except MissingWeightsError:
        raise
    except OSError as exc:  # URLError, LocalEntryNotFoundError, FileNotFoundError are all OSErrors
        raise MissingWeightsError(model, f"{type(exc).__name__}: {exc}") from exc
    finally:
        if hub is not None:
            hub._hub_dir = hub_dir  # what torch.hub.set_dir sets; None: torch's default folder


@contextlib.contextmanager
def downloads_allowed() -> Iterator[None]:
    previous = os.environ.pop("HF_HUB_OFFLINE", None)
    try:
        yield
    finally:
        if previous is not None:
            os.environ["HF_HUB_OFFLINE"] = previous


def pick_device(requested: str | None = None) -> str:
    import torch

    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- `gmv models status`: local files only ------------------------------------------------
# It must answer in well under 2 s with no network, so it never builds a model nor imports
# torch, pyiqa, timm or dreamsim; it checks the files each library would load instead.

@dataclass(frozen=True)
class WeightsStatus:
    """One model's weights as `gmv models status` reports them."""

    name: str
    kind: str
    present: bool
    needs_weights: bool
    looked_in: list[str]  # every path checked, in order
    detail: str


def torch_hub_dir() -> Path:
    """torch.hub.get_dir(), computed as torch does, without importing torch."""
    if _model_dir is not None:
        return _model_dir / "torch" / "hub"  # configure_model_dir set torch's hub dir here
    # Not torch.hub.get_dir() even when torch is loaded: building DreamSim moves it to DreamSim's folder.
    home = os.environ.get("TORCH_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch"))
    return Path(home).expanduser() / "hub"


def hf_hub_cache() -> Path:
    """huggingface_hub's cache folder, by its own rules (configure_model_dir sets HF_HOME)."""
    home = os.environ.get("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"))
    default = os.environ.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))
    return Path(os.path.expandvars(os.environ.get("HF_HUB_CACHE", default))).expanduser()


def _hf_snapshot_files(repo_id: str, filenames: list[str]) -> list[Path]:
    """Where an offline hf_hub_download(repo_id, f) finds f: the snapshot refs/main names."""
    repo = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    try:
        commit = ref.read_text().strip()
    except OSError:
        return [ref]  # without refs/main an offline download cannot resolve "main"
    return [repo / "snapshots" / commit / name for name in filenames]


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds a top-level package without importing it
    if spec is None or not spec.submodule_search_locations:
        return Path(f"<{package} is not installed>", *parts)
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _required_files(name: str) -> list[tuple[str, list[Path]]] | None:
    """(what, paths) for each file `name`'s library loads: any one of `paths` will do.
    None for a model this table does not know."""
    checkpoints = torch_hub_dir() / "checkpoints"  # torchvision's load_state_dict_from_url
    pyiqa = torch_hub_dir() / "pyiqa"  # pyiqa's load_file_from_url
    if name == "vgg16":
        return [("vgg16-397923af.pth", [checkpoints / "vgg16-397923af.pth"])]
    if name == "lpips":
        # LPIPS(net="alex") loads torchvision's AlexNet; its linear layers ship with the package.
        return [("alexnet-owt-7be5be79.pth", [checkpoints / "alexnet-owt-7be5be79.pth"]),
                ("lpips' alex.pth", [_package_file("lpips", "weights", "v0.1", "alex.pth")])]
    if name == "dreamsim":
        cache = Path(dreamsim_cache_dir())
        # dreamsim(pretrained=True, dreamsim_type="ensemble") needs its zip's four entries, then
        # torch.hub.load("facebookresearch/dino:main") with the hub dir set to the same folder.
        needed = [(f, [cache / f]) for f in ("dino_vitb16_pretrain.pth", "open_clip_vitb16_pretrain.pth.tar",
                                             "clip_vitb16_pretrain.pth.tar")]
        needed.append(("ensemble_lora/adapter_config.json", [cache / "ensemble_lora" / "adapter_config.json"]))
        needed.append(("the ensemble_lora adapter", [cache / "ensemble_lora" / "adapter_model.safetensors",
                                                     cache / "ensemble_lora" / "adapter_model.bin"]))
        needed.append(("DINO's hub code", [cache / "facebookresearch_dino_main" / "hubconf.py"]))
        needed.append(("dino_vitbase16_pretrain.pth", [cache / "checkpoints" / "dino_vitbase16_pretrain.pth"]))
        return needed
    if name == "maniqa":
        # MANIQA's KonIQ checkpoint, and its timm ViT-B/8 backbone (timm's default tag) from the HF hub.
        backbone = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"
        return [("ckpt_koniq10k.pt", [pyiqa / "ckpt_koniq10k.pt"]),
                (backbone, _hf_snapshot_files(backbone, ["model.safetensors", "pytorch_model.bin"]))]
    if name == "musiq":
        return [("musiq_koniq_ckpt-e95806b9.pth", [pyiqa / "musiq_koniq_ckpt-e95806b9.pth"])]
    if name == "clipiqa":
        # Plain CLIP-IQA loads no checkpoint of its own, only OpenAI's CLIP RN50 (pyiqa's clip loader).
        return [("RN50.pt", [torch_hub_dir() / "clip" / "RN50.pt"])]
    # pyiqa fetches these fitted parameters too, though the registry counts them as needing no weights.
    if name == "niqe":
        return [("niqe_modelparameters.mat", [pyiqa / "niqe_modelparameters.mat"])]
    if name == "brisque":
        return [("brisque_svm_weights.pth", [pyiqa / "brisque_svm_weights.pth"])]
    return None


def weights_status(kind: str, name: str) -> WeightsStatus:
    """Whether `name`'s pretrained weights are on this machine, from local files alone."""
    from .registry import spec

    component = spec(kind, name)  # ValueError for an unknown kind or name
    if not component.needs_pretrained_weights:
        return WeightsStatus(name, kind, True, False, [], "needs no pretrained weights")
    required = _required_files(name)
    if required is None:
        return WeightsStatus(name, kind, False, True, [],
                             f"GMV does not know which files '{name}' loads, so cannot check them")
    looked_in = [str(path) for _, paths in required for path in paths]
    missing = [what for what, paths in required if not any(path.is_file() for path in paths)]
    if missing:
        return WeightsStatus(name, kind, False, True, looked_in, "not found: " + ", ".join(missing))
    return WeightsStatus(name, kind, True, True, looked_in, "pretrained weights found")


class ModelPool:
    """Each model built once per (kind, name) on one device, and shared by every collection
    that uses it: a server of several collections loads its GPU models once."""

    def __init__(self, device: str = "cpu"):
        import threading

        self.device = device
        self._models: dict[tuple[str, str], object] = {}
        self._lock = threading.Lock()  # two collections warming up at once build a model once

    def get(self, kind: str, name: str):
        from .registry import create, registry

        with self._lock:
            key = (kind, name)
            if key not in self._models:
                self._models[key] = create(registry(kind), kind, name, self.device)
            return self._models[key]

    def __len__(self) -> int:
        return len(self._models)
