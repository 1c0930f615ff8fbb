"""A short GPU check of flyp's FLYP step: images/s, MFU, peak memory, gradient-cache memory.

ViT-B-16 (random init), bf16 autocast, batch 256, synthetic images with PACS-like captions
(the device machine has no dataset), trimmed text as flyp does by default. Runs in < 3 minutes
on one H200; `--device cpu --model <small config> --batch 8` is a dry run anywhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from flyp.gradcache import forward_backward
from flyp.methods import Classifier, LossContext, get_method
from flyp.models import load_model

CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    best = 0.0
    for _ in range(5):
        sync(device)
        tick = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - tick))
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro", type=int, default=32, help="gradient-cache chunk")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    bundle = load_model(f"open_clip:{args.model}")
    model = bundle.model.to(device)
    classifier = Classifier(model)
    classifier.train()
    ctx = LossContext(bundle.tokenizer, CLASSES, ["a photo of a {}.", "a sketch of a {}."])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = bundle.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, len(CLASSES), (args.batch,), device=device)
    seeds = torch.arange(args.batch)
    method = get_method("flyp")

    def step(micro: int | None = None) -> None:
        optimizer.zero_grad(set_to_none=True)
        forward_backward(
            method, classifier, images, labels, seeds, 0, ctx,
            micro_batch=micro, precision=args.precision,
        )  # fmt: skip
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.steps):
        sync(device)
        tick = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - tick)
    seconds = statistics.median(times)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
    result = {
        "model": args.model,
        "batch": args.batch,
        "precision": args.precision,
        "images_per_s": round(args.batch / seconds, 1),
        "step_s": round(seconds, 4),
        "train_tflops_per_step": round(flops / 1e12, 3),
        "matmul_peak_tflops": round(peak / 1e12, 1),
        "mfu": round(flops / seconds / peak, 3),
    }
    if device.type == "cuda":
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        # gradient cache: batch B in chunks of `micro` vs the chunk alone (optimizer state and
        # gradients already allocated in both)
        base = torch.cuda.memory_allocated(device)
        everything = images, labels, seeds
        for name, batch, micro in [
            ("micro_alone", args.micro, None),
            ("cached", args.batch, args.micro),
        ]:
            images, labels, seeds = (t[:batch] for t in everything)  # what step() reads
            step(micro)
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(micro)
            torch.cuda.synchronize(device)
            result[f"gradcache_{name}_gb"] = round(
                (torch.cuda.max_memory_allocated(device) - base) / 2**30, 3
            )
        result["gradcache_ratio"] = round(
            result["gradcache_cached_gb"] / result["gradcache_micro_alone_gb"], 2
        )
        result["note"] = "gradcache figures: micro-batch alone first, then full batch via the cache"
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
