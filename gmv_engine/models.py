"""Where pretrained weights live, and turning "weights not here" into a clear error.

Weights come from each library's standard cache (torch hub, Hugging Face hub, DreamSim's
cache folder) or, with --model-dir, from one folder holding all three. At serving time the
Hugging Face hub is put in offline mode so a missing file fails at once instead of after
minutes of retries; `gmv models download` is the one place that reaches the network, and
`gmv models pack|unpack` carry the files to a machine without it (a tar checked by sha256).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from .errors import GMVError, MissingWeightsError

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


# -- `gmv models pack|unpack`: weights for a machine without network ----------------------
# A bundle is an uncompressed tar (weights do not compress): first a JSON manifest, then each
# file under its path in the --model-dir layout (torch/hub/..., huggingface/hub/..., dreamsim/...),
# whichever caches it was packed from. Unpack checks every file's sha256 before placing any.

BUNDLE_MANIFEST = "gmv-model-bundle.json"
BUNDLE_FORMAT = "gmv-model-bundle"
BUNDLE_FORMAT_VERSION = 1


class ModelBundleError(GMVError):
    """A bundle cannot be written (weights missing) or placed (not a bundle, corrupted, unsafe)."""


def layout_roots() -> dict[str, Path]:
    """Each top folder of the --model-dir layout -> the folder it is on this machine now: the
    model dir's own subfolders after configure_model_dir(model_dir), else each library's cache."""
    return {"torch/hub": torch_hub_dir(), "huggingface/hub": hf_hub_cache(), "dreamsim": Path(dreamsim_cache_dir())}


def layout_path(path: Path) -> str | None:
    """`path`'s place in the --model-dir layout; None for a file in no cache (one that ships
    inside its package, as LPIPS' calibration layers)."""
    best: tuple[int, str] | None = None
    for prefix, root in layout_roots().items():
        try:
            rest = Path(path).relative_to(root)  # lexical: _required_files builds its paths from these roots
        except ValueError:
            continue
        if rest.parts and (best is None or len(root.parts) > best[0]):
            best = (len(root.parts), f"{prefix}/{rest.as_posix()}")
    return best[1] if best else None


def bundle_files(models: list[tuple[str, str]]) -> dict[str, Path]:
    """Layout path -> file on this machine, for every file `models` load (the first present of
    each `_required_files` alternative). Besides those: a Hugging Face snapshot's refs/main (an
    offline download resolves "main" through it) and the whole folder of a torch hub repo's
    hubconf.py (it imports its neighbours). Raises ModelBundleError naming each missing file."""
    from .registry import spec

    files: dict[str, Path] = {}
    missing: list[str] = []
    for kind, name in models:
        if not spec(kind, name).needs_pretrained_weights:
            continue
        required = _required_files(name)
        if required is None:
            missing.append(f"{name}: GMV does not know which files it loads")
            continue
        for what, paths in required:
            found = next((path for path in paths if path.is_file()), None)
            if found is None:
                missing.append(f"{name}: {what} (looked in {', '.join(str(path) for path in paths)})")
                continue
            where = layout_path(found)
            if where is None:
                continue
            files[where] = found
            if where.startswith("huggingface/hub/") and found.parent.parent.name == "snapshots":
                ref = found.parent.parent.parent / "refs" / "main"
                files[layout_path(ref)] = ref
            if found.name == "hubconf.py":
                for code in sorted(found.parent.rglob("*")):
                    if code.is_file() and "__pycache__" not in code.parts and code.suffix != ".pyc":
                        files[layout_path(code)] = code
    if missing:
        raise ModelBundleError("cannot pack, weights missing: " + "; ".join(missing)
                               + ". Fetch them with `gmv models download` where there is network, or pack "
                                 "from a --model-dir that holds them.")
    return dict(sorted(files.items()))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _HashingReader:
    """A file's bytes as tarfile reads them, hashed on the way."""

    def __init__(self, handle):
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        block = self.handle.read(size)
        self.digest.update(block)
        self.size += len(block)
        return block


def pack_models(models: list[tuple[str, str]], out: str | Path, profile: str | None = None) -> dict:
    """Write the bundle of `models`' weights to `out` (via out.partial, so no half bundle is left)
    and return its manifest."""
    from . import __version__

    sources = bundle_files(models)
    if not sources:
        raise ModelBundleError(f"{', '.join(name for _, name in models)} load no weight files: nothing to pack")
    entries = [{"path": where, "size": source.stat().st_size, "sha256": _sha256(source)}
               for where, source in sources.items()]
    manifest = {"format": BUNDLE_FORMAT, "format_version": BUNDLE_FORMAT_VERSION, "gmv_version": __version__,
                "profile": profile, "models": [name for _, name in models], "files": entries}
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    try:
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            data = json.dumps(manifest, indent=1).encode()
            info = tarfile.TarInfo(BUNDLE_MANIFEST)
            info.size, info.mode, info.mtime = len(data), 0o644, int(time.time())
            tar.addfile(info, io.BytesIO(data))
            for entry, source in zip(entries, sources.values()):
                info = tarfile.TarInfo(entry["path"])
                info.size, info.mode, info.mtime = entry["size"], 0o644, int(source.stat().st_mtime)
                with open(source, "rb") as handle:
                    reader = _HashingReader(handle)
                    tar.addfile(info, reader)
                if reader.size != entry["size"] or reader.digest.hexdigest() != entry["sha256"]:
                    raise ModelBundleError(f"{source} changed while it was being packed; pack again")
        os.replace(partial, out)
    except OSError as exc:
        raise ModelBundleError(f"cannot write {out}: {exc}") from exc
    finally:
        partial.unlink(missing_ok=True)
    return manifest


def _bundle_entries(manifest: object, bundle: Path) -> dict[str, dict]:
    """The manifest's files by path, each path checked to stay inside the layout."""
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise ModelBundleError(f"{bundle} is not a GMV model bundle (its manifest names no format {BUNDLE_FORMAT!r})")
    if manifest.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise ModelBundleError(f"{bundle} has bundle format version {manifest.get('format_version')!r}; this GMV "
                               f"reads version {BUNDLE_FORMAT_VERSION} (made by gmv {manifest.get('gmv_version')})")
    entries: dict[str, dict] = {}
    for entry in manifest.get("files") or []:
        path = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(path, str) or not _safe_layout_path(path):
            raise ModelBundleError(f"{bundle}: refusing the path {path!r}: not a relative path under "
                                   + ", ".join(f"{prefix}/" for prefix in layout_roots()))
        if path in entries:
            raise ModelBundleError(f"{bundle}: {path} is listed twice")
        size, digest = entry.get("size"), entry.get("sha256")
        if not isinstance(size, int) or size < 0 or not isinstance(digest, str) or len(digest) != 64:
            raise ModelBundleError(f"{bundle}: the manifest's entry for {path} has no valid size and sha256")
        entries[path] = entry
    if not entries:
        raise ModelBundleError(f"{bundle}: the manifest lists no files")
    return entries


def _safe_layout_path(path: str) -> bool:
    parts = path.split("/")
    if "\\" in path or "\0" in path or any(part in ("", ".", "..") for part in parts):
        return False  # also rejects an absolute path (its first part is empty)
    return any(path.startswith(prefix + "/") for prefix in layout_roots())


def _destination(path: str) -> tuple[Path, Path]:
    """(root, file) where a layout path goes on this machine; refuses one that leaves its root
    through a symlink."""
    for prefix, root in layout_roots().items():
        if path.startswith(prefix + "/"):
            target = root.joinpath(*path[len(prefix) + 1:].split("/"))
            inside, real_root = os.path.realpath(target.parent), os.path.realpath(root)
            if inside != real_root and not inside.startswith(real_root + os.sep):
                raise ModelBundleError(f"refusing {path}: {target.parent} leads outside {root}")
            return root, target
    raise ModelBundleError(f"refusing {path}: not under " + ", ".join(layout_roots()))


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def unpack_models(bundle: str | Path) -> list[dict]:
    """Place a bundle's files where this machine's libraries (or --model-dir) look for them.
    Every file is extracted into a temporary folder beside its destination and its sha256
    checked against the manifest; only when all match are they moved into place. Any mismatch,
    unlisted or missing member, or unsafe path fails naming it and leaves the destination as it
    was. Returns the manifest's entries."""
    bundle = Path(bundle)
    staging: dict[Path, Path] = {}  # an existing folder -> the temporary folder made in it
    try:
        with tarfile.open(bundle, "r:*") as tar:
            first = tar.next()
            if first is None or first.name != BUNDLE_MANIFEST or not first.isfile():
                raise ModelBundleError(f"{bundle} is not a GMV model bundle: it does not start with {BUNDLE_MANIFEST}")
            try:
                manifest = json.loads(tar.extractfile(first).read())
            except ValueError as exc:
                raise ModelBundleError(f"{bundle}: its manifest is not JSON ({exc})") from None
            entries = _bundle_entries(manifest, bundle)
            plan = {path: _destination(path) for path in entries}
            staged: dict[str, Path] = {}
            for member in tar:  # from the first member again
                if member is first:
                    continue
                path = member.name
                if path not in entries:
                    raise ModelBundleError(f"{bundle}: refusing the member {path!r}: the manifest does not list it")
                if path in staged:
                    raise ModelBundleError(f"{bundle}: {path} appears twice")
                if not member.isfile():
                    raise ModelBundleError(f"{bundle}: refusing {path}: not a regular file")
                expected = entries[path]
                if member.size != expected["size"]:
                    raise ModelBundleError(f"{bundle}: {path} holds {member.size} bytes, the manifest says "
                                           f"{expected['size']}: the bundle is damaged")
                root, _ = plan[path]
                anchor = _existing_ancestor(root)
                if anchor not in staging:
                    staging[anchor] = Path(tempfile.mkdtemp(prefix=".gmv-unpack-", dir=anchor))
                target = staging[anchor].joinpath(*path.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                digest = hashlib.sha256()
                with tar.extractfile(member) as source, open(target, "wb") as sink:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        digest.update(block)
                        sink.write(block)
                if digest.hexdigest() != expected["sha256"]:
                    raise ModelBundleError(f"{bundle}: {path} does not match its sha256 in the manifest (got "
                                           f"{digest.hexdigest()}, expected {expected['sha256']}): the bundle is "
                                           "corrupted; nothing was placed")
                staged[path] = target
            absent = [path for path in entries if path not in staged]
            if absent:
                raise ModelBundleError(f"{bundle}: the manifest lists files the bundle lacks: {', '.join(absent)}")
        for path, source in staged.items():
            _, target = plan[path]
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, target)
        return list(entries.values())
    except (tarfile.TarError, EOFError) as exc:
        raise ModelBundleError(f"{bundle} is not a readable tar bundle ({exc})") from exc
    except OSError as exc:
        raise ModelBundleError(f"cannot unpack {bundle}: {exc}") from exc
    finally:
        for folder in staging.values():
            shutil.rmtree(folder, ignore_errors=True)


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
