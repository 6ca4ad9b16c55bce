"""GPU stage benchmark: the paper profile's tensor work (VGG-16 recall embedding, LPIPS re-rank)
by batch size and precision, on the device GMV would serve from.

The paper profile's pretrained weights cannot be fetched on the machines this was written on,
so the networks are built with RANDOM weights (`pretrained=False`). That is sound for timing
alone: a network's arithmetic does not depend on its weights' values. The embeddings it makes
mean nothing, and nothing here is an attribution. Milvus is not involved (see bench_server.py
for the whole served path).

    python bench/bench_gpu_stages.py --device cuda --out docs/gpu_stages.md
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def generated_like_images(count: int, side: int) -> list[Image.Image]:
    """Real digits scaled up to the size a generator emits (content does not change the timing)."""
    from sklearn.datasets import load_digits

    digits = load_digits().images
    return [
        Image.fromarray((digits[i % len(digits)] * 255 / 16).astype(np.uint8)).convert("RGB").resize((side, side))
        for i in range(count)
    ]


def median_ms(call, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()  # each call ends by waiting for the GPU (a copy to the host, or a synchronize)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-sizes", default="1,8,32,64,128")
    parser.add_argument("--precisions", default="fp32,fp16,bf16")
    parser.add_argument("--candidates", default="10,50,100", help="re-rank candidates per query (k)")
    parser.add_argument("--image-side", type=int, default=512, help="side of the generated images, in pixels")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args()

    import torch

    from gmv_engine.encoders.vgg16 import VGG16Encoder
    from gmv_engine.rerankers.lpips_distance import LpipsReranker

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    precisions = args.precisions.split(",")
    candidate_counts = [int(k) for k in args.candidates.split(",")]
    images = generated_like_images(max(batch_sizes + candidate_counts), args.image_side)
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "CPU"
    lines = [
        "### GPU stage benchmark",
        "",
        f"`python bench/bench_gpu_stages.py --device {args.device}` on {device_name}; torch {torch.__version__}; "
        f"{args.image_side}x{args.image_side} RGB inputs; median of {args.repeats} timed calls after 3 warm-up calls. "
        "Networks built with random weights: timings only (see the script's docstring).",
        "",
        "#### VGG-16 recall embedding (`VGG16Encoder`)",
        "",
        "Preprocess (resize 256, crop 224, normalise) of one batch: with PIL on one CPU core, as GMV did before, "
        "and as tensors on the device, as `VGG16Encoder` now does on CUDA.",
        "",
        "| batch | PIL on CPU ms | tensors on device ms | speed-up |",
        "| ---: | ---: | ---: | ---: |",
    ]
    def synchronize(result):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return result

    torch.manual_seed(0)
    encoder = VGG16Encoder(args.device, pretrained=False)
    for batch_size in batch_sizes:
        batch_images = images[:batch_size]
        encoder.gpu_preprocess = False
        on_cpu_ms = median_ms(lambda: encoder.preprocess(batch_images), args.repeats)
        on_device_ms = median_ms(lambda: synchronize(encoder.preprocess_tensors(batch_images)), args.repeats)
        lines.append(f"| {batch_size} | {on_cpu_ms:.2f} | {on_device_ms:.2f} | {on_cpu_ms / on_device_ms:.1f}x |")
        print(lines[-1], flush=True)
    del encoder
    lines += [
        "",
        "Forward is the network on a preprocessed batch on the device, and the embeddings' copy back; "
        "`embed()` is the whole call from PIL images, as the server makes it.",
        "",
        "| batch | precision | forward ms | forward images/s | embed() ms | embed() images/s | max abs diff vs fp32 |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    reference = {}
    for precision in precisions:
        torch.manual_seed(0)  # the same random weights for every precision, so their outputs compare
        encoder = VGG16Encoder(args.device, precision=precision, pretrained=False)
        for batch_size in batch_sizes:
            batch_images = images[:batch_size]
            batch = encoder.preprocess(batch_images)
            forward_ms = median_ms(lambda: encoder.embed_batch(batch), args.repeats)
            embed_ms = median_ms(lambda: encoder.embed(batch_images), args.repeats)
            embeddings = encoder.embed_batch(batch)
            reference.setdefault(batch_size, embeddings)
            difference = float(np.abs(embeddings - reference[batch_size]).max())
            lines.append(
                f"| {batch_size} | {precision} | {forward_ms:.2f} | {batch_size / forward_ms * 1000:,.0f} | "
                f"{embed_ms:.2f} | {batch_size / embed_ms * 1000:,.0f} | {difference:.1e} |"
            )
            print(lines[-1], flush=True)
        del encoder
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    reranker = LpipsReranker(args.device, backbone_pretrained=False)
    lines += [
        "",
        f"#### LPIPS re-rank (`LpipsReranker`, AlexNet, {reranker.side}x{reranker.side}, fp32)",
        "",
        "One query against its k recalled candidates (the stored features are the candidates' pixels).",
        "",
        "| k candidates | ms per query | candidate pairs/s |",
        "| ---: | ---: | ---: |",
    ]
    query = images[:1]
    for k in candidate_counts:
        stored = reranker.features(images[:k])
        ms = median_ms(lambda: reranker.distances(query, [stored]), args.repeats)
        lines.append(f"| {k} | {ms:.2f} | {k / ms * 1000:,.0f} |")
        print(lines[-1], flush=True)

    report = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(report, encoding="utf-8")
    print(report)


if __name__ == "__main__":
    main()
