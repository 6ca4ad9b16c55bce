"""Where pretrained weights live, and turning "weights not here" into a clear error.

Weights come from each library's standard cache (torch hub, Hugging Face hub, DreamSim's
cache folder) or, with --model-dir, from one folder holding all three. At serving time the
Hugging Face hub is put in offline mode so a missing file fails at once instead of after
minutes of retries; `gmv models download` is the one place that reaches the network.
"""
from __future__ import annotations

import contextlib
import os
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
    """Run `build`, turning a failed weight fetch into MissingWeightsError(model)."""
    try:
        return build()
    except MissingWeightsError:
        raise
    except OSError as exc:  # URLError, LocalEntryNotFoundError, FileNotFoundError are all OSErrors
        raise MissingWeightsError(model, f"{type(exc).__name__}: {exc}") from exc


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
