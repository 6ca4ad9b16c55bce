"""VGG-16 (ImageNet) as the recall embedding, as in the paper.

The embedding is the global-average-pooled last convolutional block (512-d), L2-normalised
so that Milvus' L2 search ranks by cosine similarity. The 4096-d fc7 layer would make the
index 8x larger for no gain in recall on our measurements' scale.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

from ..models import load_pretrained


PRECISIONS = ("fp32", "fp16", "bf16")  # the autocast dtype on CUDA; the CPU always runs fp32


class VGG16Encoder:
    name = "vgg16"
    needs_pretrained_weights = True
    metric = "L2"
    dim = 512

    def __init__(self, device: str = "cpu", precision: str = "fp16", pretrained: bool = True):
        """`pretrained=False` builds the architecture with random weights: for tests and GPU
        timing only, never for attribution."""
        import torch
        import torchvision
        from torchvision.models import VGG16_Weights

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        weights = VGG16_Weights.IMAGENET1K_V1
        if pretrained:
            model = load_pretrained("vgg16", lambda: torchvision.models.vgg16(weights=weights))
        else:
            model = torchvision.models.vgg16(weights=None)
        self.device = device
        self.features = model.features.eval().to(device)
        self.transform = weights.transforms()
        self.gpu_preprocess = device.startswith("cuda")
        self._autocast_dtype = (
            {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision) if device.startswith("cuda") else None
        )
        self._torch = torch

    def preprocess(self, images: Sequence[Image.Image]):
        """Resize, crop and normalise to (n, 3, 224, 224), with the weights' own transform. On
        CUDA it runs on the GPU, batched per image size: on the CPU it costs about 4 ms per
        512x512 image, 20 times the network's forward pass on an H100 (bench_gpu_stages.py)."""
        if not self.gpu_preprocess:
            return self._torch.stack([self.transform(image.convert("RGB")) for image in images])
        return self.preprocess_tensors(images)

    def preprocess_tensors(self, images: Sequence[Image.Image]):
        """The same transform on uint8 tensors on `self.device` (torchvision's antialiased resize
        stands in for PIL's; tests/test_components.py bounds the difference). Pixels go to the
        device from pinned memory, once, as uint8: a quarter of the bytes of the float batch."""
        torch = self._torch
        pixels = [np.asarray(image if image.mode == "RGB" else image.convert("RGB")) for image in images]
        out = None
        by_size: dict[tuple, list[int]] = {}
        for position, array in enumerate(pixels):
            by_size.setdefault(array.shape, []).append(position)
        for shape, positions in by_size.items():
            host = torch.empty((len(positions), *shape), dtype=torch.uint8, pin_memory=self.device.startswith("cuda"))
            host_array = host.numpy()
            for row, position in enumerate(positions):
                host_array[row] = pixels[position]
            batch = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
            transformed = self.transform(batch)
            if out is None:
                out = transformed.new_empty((len(pixels), *transformed.shape[1:]))
            out[positions] = transformed
        return out

    def embed_batch(self, batch) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode(), torch.autocast(
            self.device.split(":")[0], dtype=self._autocast_dtype, enabled=self._autocast_dtype is not None
        ):
            pooled = self.features(batch.to(self.device, non_blocking=True)).float().mean(dim=(2, 3))
        pooled = torch.nn.functional.normalize(pooled, dim=1)
        return pooled.cpu().numpy().astype(np.float32)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed_batch(self.preprocess(images))
