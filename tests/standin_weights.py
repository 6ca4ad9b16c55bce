"""STAND-IN pretrained weights for the `paper` profile: RANDOM values in the real files' layout.

`build_model_dir(root)` lays out `root` the way `gmv_engine.models.configure_model_dir(root)`
points each library at it, with every file `gmv_engine.models._required_files` names for
vgg16, dreamsim and maniqa, in the format each library's own loader reads:

    torch/hub/checkpoints/vgg16-397923af.pth       torchvision: a VGG-16 state dict (strict load)
    torch/hub/pyiqa/ckpt_koniq10k.pt               pyiqa: MANIQA's whole state dict, its timm ViT
                                                   included (strict load)
    huggingface/hub/models--timm--vit_base_patch8_224.augreg2_in21k_ft_in1k/
        refs/main                                  the snapshot's commit
        blobs/<sha256>                             the bytes, and
        snapshots/<commit>/model.safetensors       a relative symlink to them, as huggingface_hub
                                                   writes it; timm's ViT-B/8 (strict load)
    dreamsim/                                      DreamSim's cache_dir (its unzipped checkpoint):
        dino_vitb16_pretrain.pth                   {'student': {'module.head.*'}}: the DINO head
                                                   DreamSim copies into its DINOHead(768, 2048)
        clip_vitb16_pretrain.pth.tar               {'state_dict': CLIP ViT-B/16 as DINO's
        open_clip_vitb16_pretrain.pth.tar            vit_base, pos_drop a LayerNorm, + 'proj'}
        ensemble_lora/adapter_config.json          peft's LoRA config (r 16, alpha 0.5, dropout
                                                   0.3 on 'qkv', as DreamSim's ensemble training)
        ensemble_lora/adapter_model.safetensors    the LoRA weights, as peft saves them
        facebookresearch_dino_main/                what torch.hub.load('facebookresearch/dino:main')
            hubconf.py, vision_transformer.py        finds cached under the hub dir DreamSim sets
        checkpoints/dino_vitbase16_pretrain.pth    DINO's ViT-B/16 backbone state dict, which that
                                                   hubconf loads with load_state_dict_from_url

What is stand-in, and what is not:
  - Every tensor value is random (seeded): these weights prove the loading code, never
    attribution quality. The shapes and key names are right by construction: each file is the
    state dict of the library's own architecture, built with random init (dreamsim's
    vision_transformer, torchvision's vgg16, timm's vit_base_patch8_224, pyiqa's MANIQA), and
    each library then loads it with its own strict loader.
  - The DINO hub folder is not DINO's repository (nothing can be downloaded here). Its
    hubconf.py is written below with the same entry point as DINO's (`dino_vitb16(pretrained=True,
    **kwargs)`: `vit_base(patch_size=16, num_classes=0)`, then its URL through
    torch.hub.load_state_dict_from_url and a strict load); vision_transformer.py is a copy of the
    one DreamSim ships, which DreamSim's header says was taken from DINO's repository.
  - dino_vitb16_pretrain.pth holds only the head keys DreamSim reads (the real file is a larger
    training checkpoint); its last layer is stored as DreamSim reads it, (2048, 256).
  - The real DreamSim zip may carry the adapter as adapter_model.bin (older peft); peft loads
    either, and GMV accepts either (`_required_files`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

SEED = 20240915
TIMM_BACKBONE = "timm/vit_base_patch8_224.augreg2_in21k_ft_in1k"
STANDIN_COMMIT = "57a4d1e0" * 5  # a made-up 40-hex commit for the Hugging Face snapshot
DINO_HUB_FOLDER = "facebookresearch_dino_main"
LORA_CONFIG = {"r": 16, "lora_alpha": 0.5, "lora_dropout": 0.3, "bias": "none", "target_modules": ["qkv"]}

# The entry point DreamSim calls, with DINO's URL: torch.hub.load_state_dict_from_url finds the
# file by its basename under <hub dir>/checkpoints, so nothing is downloaded when it is there.
HUBCONF = '''"""STAND-IN for facebookresearch/dino's hubconf.py (GMV test weights): the same dino_vitb16
entry point, loading the same checkpoint file name, strictly."""
import torch

import vision_transformer as vits

dependencies = ["torch"]


def dino_vitb16(pretrained=True, **kwargs):
    model = vits.__dict__["vit_base"](patch_size=16, num_classes=0, **kwargs)
    if pretrained:
        state_dict = torch.hub.load_state_dict_from_url(
            url="https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
            map_location="cpu",
        )
        model.load_state_dict(state_dict, strict=True)
    return model
'''


def build_model_dir(root: Path, seed: int = SEED) -> Path:
    """Write every stand-in file of the paper profile under `root` (see the module docstring)."""
    import torch

    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the libraries' own init draws from the global RNG
        torch.manual_seed(seed)
        write_vgg16(root, generator)
        write_maniqa(root, generator)
        write_dreamsim(root, generator)
    return root


def randomise(module, generator) -> None:
    """The library's random init, plus N(0, 0.02) for any weight it left constant (DreamSim's
    vision_transformer skips trunc_normal_, so its pos_embed and cls_token stay zero; peft
    starts LoRA's B at zero)."""
    import torch

    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.dim() >= 2 and parameter.is_floating_point() and bool((parameter == parameter.flatten()[0]).all()):
                parameter.normal_(0.0, 0.02, generator=generator)


def write_vgg16(root: Path, generator) -> Path:
    import torch
    import torchvision

    path = root / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    model = torchvision.models.vgg16(weights=None)
    randomise(model, generator)
    torch.save(model.state_dict(), path)
    return path


def write_maniqa(root: Path, generator) -> tuple[Path, Path]:
    """timm's ViT-B/8 in the Hugging Face cache, then MANIQA's checkpoint (its ViT inside it)."""
    import safetensors.torch
    import timm
    import torch
    from pyiqa.archs.maniqa_arch import MANIQA
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    vit = timm.create_model("vit_base_patch8_224", pretrained=False)
    randomise(vit, generator)
    repo = root / "huggingface" / "hub" / ("models--" + TIMM_BACKBONE.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(STANDIN_COMMIT)
    staged = repo / "blobs" / "incoming"
    staged.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(vit.state_dict(), str(staged), metadata={"format": "pt"})
    blob = staged.with_name(_sha256(staged))
    staged.rename(blob)
    snapshot = repo / "snapshots" / STANDIN_COMMIT / "model.safetensors"
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))

    # MANIQA builds its ViT with timm.create_model(..., pretrained=True); a stand-in has no
    # weights to load yet, so build it with pretrained=False and keep the random init.
    options = {k: v for k, v in DEFAULT_CONFIGS["maniqa"]["metric_opts"].items() if k != "type"}
    real_create = timm.create_model
    timm.create_model = lambda name, pretrained=False, **kw: real_create(name, pretrained=False, **kw)
    try:
        maniqa = MANIQA(pretrained=False, **options)
    finally:
        timm.create_model = real_create
    randomise(maniqa, generator)
    checkpoint = root / "torch" / "hub" / "pyiqa" / "ckpt_koniq10k.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(maniqa.state_dict(), checkpoint)
    return checkpoint, snapshot


def write_dreamsim(root: Path, generator) -> Path:
    import torch
    import dreamsim.feature_extraction.vision_transformer as dreamsim_vit
    from dreamsim.config import dreamsim_args
    from dreamsim.model import PerceptualModel
    from peft import LoraConfig, get_peft_model, load_peft_weights, set_peft_model_state_dict

    cache = root / "dreamsim"
    (cache / "checkpoints").mkdir(parents=True, exist_ok=True)

    # DINO's hub code and its backbone checkpoint.
    hub = cache / DINO_HUB_FOLDER
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(HUBCONF)
    shutil.copyfile(dreamsim_vit.__file__, hub / "vision_transformer.py")
    dino = dreamsim_vit.vit_base(patch_size=16, num_classes=0)
    randomise(dino, generator)
    torch.save(dino.state_dict(), cache / "checkpoints" / "dino_vitbase16_pretrain.pth")

    # The DINO head DreamSim reads from its own checkpoint.
    head = dreamsim_vit.DINOHead(768, 2048)
    randomise(head, generator)
    student = {f"module.head.mlp.{i}.{kind}": getattr(head.mlp[i], kind).detach().clone()
               for i in (0, 2, 4) for kind in ("weight", "bias")}
    student["module.head.last_layer.weight"] = torch.empty(2048, 256).normal_(0.0, 0.02, generator=generator)
    torch.save({"student": student}, cache / "dino_vitb16_pretrain.pth")

    # CLIP and OpenCLIP ViT-B/16 in DINO's vit_base layout (load_clip_as_dino's format).
    for name in ("clip_vitb16_pretrain.pth.tar", "open_clip_vitb16_pretrain.pth.tar"):
        vit = dreamsim_vit.vit_base(patch_size=16)
        vit.pos_drop = torch.nn.LayerNorm(vit.embed_dim)
        randomise(vit, generator)
        state = dict(vit.state_dict())
        state["proj"] = torch.empty(768, 512).normal_(0.0, 768 ** -0.5, generator=generator)
        torch.save({"state_dict": state}, cache / name)

    # The LoRA adapter: peft's own files for the ensemble PerceptualModel built from the files
    # above (building it is itself a check that DreamSim loads them).
    with _restored_hub_dir():
        model = PerceptualModel(**dreamsim_args["model_config"]["ensemble"], device="cpu", load_dir=str(cache),
                                normalize_embeds=True)
    peft_model = get_peft_model(model, LoraConfig(**LORA_CONFIG))
    randomise(peft_model, generator)
    lora = cache / "ensemble_lora"
    peft_model.save_pretrained(str(lora))
    for extra in set(os.listdir(lora)) - {"adapter_config.json", "adapter_model.safetensors"}:
        os.remove(lora / extra)  # peft's README.md model card: not part of DreamSim's zip
    # peft loads an adapter leniently (a wrong key name is only a warning), so check here that
    # every key in the file lands on a LoRA weight of the model and none is left out.
    result = set_peft_model_state_dict(peft_model, load_peft_weights(str(lora)))
    lora_keys = [key for key, _ in peft_model.named_parameters() if "lora_" in key]
    assert not result.unexpected_keys and lora_keys and not set(lora_keys) & set(result.missing_keys), result
    return cache


@contextlib.contextmanager
def _restored_hub_dir():
    """DreamSim calls torch.hub.set_dir(cache_dir) and torch.hub imports DINO's
    vision_transformer module by that name; undo both for the rest of this process."""
    import torch.hub

    previous, had_module = torch.hub._hub_dir, "vision_transformer" in sys.modules
    try:
        yield
    finally:
        torch.hub._hub_dir = previous
        if not had_module:
            sys.modules.pop("vision_transformer", None)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def standin_files(root: Path) -> dict[str, int]:
    """Relative path -> size of every regular file (symlinks followed) under root."""
    return {str(path.relative_to(root)): path.stat().st_size for path in sorted(Path(root).rglob("*"))
            if path.is_file()}


if __name__ == "__main__":  # python tests/standin_weights.py DIR: build one by hand, timed
    import time

    started = time.perf_counter()
    build_model_dir(Path(sys.argv[1]))
    print(json.dumps({"seconds": round(time.perf_counter() - started, 1), "files": standin_files(Path(sys.argv[1]))},
                     indent=1))
