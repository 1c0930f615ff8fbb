"""What a user would compare on one GPU: flyp's FLYP step against open_clip_train's own step.

A ViT-B-16-sized step (open_clip config, random weights, bf16 autocast, batch 256, synthetic
images with PACS-like captions: the device machine has no dataset) three ways:

- ``open_clip_train``: ``open_clip_train.train.train_one_epoch``, the training loop of the
  package that ships in the open_clip_torch wheel, at ``--precision amp_bf16`` (no GradScaler, as
  its main does for bf16), ClipLoss, AdamW with its main's parameter groups; 77-token text;
- ``flyp equal``: flyp's step (``flyp.gradcache.forward_backward``) at equal work: the same
  batch, bf16 autocast, 77-token text, every caption encoded (no deduplication);
- ``flyp dedup PACS``: as equal, each distinct caption of the batch encoded once (7 classes x 2
  templates: at most 14 captions a batch);
- ``flyp ImageNet``: as dedup, with ImageNet's caption set (1000 classes x 80 templates drawn
  uniformly: nearly every caption distinct);
- ``flyp default``: flyp's recommended step: deduplication, text trimmed to the longest caption;
- ``flyp compiled``: the default with ``train.compile: true`` (eager vs compiled).

Each row counts its own work (FLOPs of its own step) for its MFU.

For each: images/s, MFU against the card's datasheet bf16 dense peak (``PEAK_BF16_TFLOPS``),
peak memory; then the ratio flyp / open_clip_train, the gradient cache's memory and the
activation check of issue 15 part 1 (``open_clip:ViT-B-16:openai`` builds with QuickGELU).
Every part runs even when another failed; the exit status is 1 if any did.

  python benchmarks/gpu_check.py --json out.json               # on the GPU (< 1 minute)
  python benchmarks/gpu_check.py --device cpu --model benchmarks/configs/flyp-gpu-tiny.json \
      --batch 8 --micro 4 --steps 2 --warmup 1                  # the dry run anywhere
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
TEMPLATES = ["a photo of a {}.", "a sketch of a {}."]
# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets, by a part of
# the name torch reports; the first match counts, so the more specific names come first.
PEAK_BF16_TFLOPS = [
    ("GH200", 989.4),
    ("H200", 989.4),  # H200 SXM; the H200 NVL is 835.5
    ("H100 NVL", 835.5),
    ("H100 PCIe", 756.5),
    ("H100", 989.4),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312.0),  # SXM and PCIe alike
]


def card_peak_tflops(name: str) -> float | None:
    """The datasheet bf16 dense peak of the card torch names ``name``; None if not listed."""
    if "H200 NVL" in name:
        return 835.5
    for part, tflops in PEAK_BF16_TFLOPS:
        if part.lower() in name.lower():
            return tflops
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counted_flops(fn: Callable[[], None]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn: Callable[[], None], device: torch.device) -> tuple[float, float | None]:
    """Seconds of one call of ``fn`` (after the warm-up its caller did), and its peak GiB."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    tick = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - tick
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def figures(name: str, batch: int, steps: int, seconds: float, flops: float, peak_gb, card):
    step = seconds / steps
    return {
        "path": name,
        "images_per_s": round(batch / step, 1),
        "step_s": round(step, 4),
        "train_gflop_per_step": round(flops / 1e9, 1),
        "mfu": round(flops / step / (card * 1e12), 3) if card else None,
        "peak_memory_gb": None if peak_gb is None else round(peak_gb, 2),
    }


def batch_data(args, device: torch.device, image_size: int):
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, image_size, image_size, device=device)
    labels = torch.randint(0, len(CLASSES), (args.batch,))
    return images, labels


# ImageNet's caption set: 1000 classes x 80 templates, each drawn uniformly (nearly every caption
# of a batch is distinct, so deduplication saves nothing).
IMAGENET_CLASSES = [f"class number {i}" for i in range(1000)]
IMAGENET_TEMPLATES = [f"a photo of a {{}}, take {t}." for t in range(80)]

# Each flyp row: (name, text tokens, deduplicate captions, caption set, torch.compile).
FLYP_ROWS = [
    ("flyp equal", 77, False, "pacs", False),  # open_clip_train's work: every caption encoded
    ("flyp dedup PACS", 77, True, "pacs", False),
    ("flyp ImageNet", 77, True, "imagenet", False),
    ("flyp default", None, True, "pacs", False),  # recommended: trimmed text, deduplication
    ("flyp compiled", None, True, "pacs", True),  # the same, train.compile: true
]


def flyp_path(
    args, device: torch.device, card, name: str, context_length: int | None, unique: bool,
    captions: str, compiled: bool,
) -> dict:  # fmt: skip
    """flyp's FLYP step: captions from the labels, forward + contrastive loss + backward through
    flyp.gradcache.forward_backward (one chunk here), then flyp's fused AdamW."""
    from flyp.gradcache import forward_backward
    from flyp.methods import Classifier, LossContext, get_method
    from flyp.models import load_model
    from flyp.recipe import TrainConfig
    from flyp.train import param_groups

    torch.manual_seed(0)
    bundle = load_model(f"open_clip:{args.model}", context_length=context_length)
    classifier = Classifier(bundle.model.to(device))
    classifier.train()
    class_names, templates = (
        (IMAGENET_CLASSES, IMAGENET_TEMPLATES) if captions == "imagenet" else (CLASSES, TEMPLATES)
    )
    ctx = LossContext(bundle.tokenizer, class_names, templates, unique_captions=unique)
    # flyp.train's optimizer: its parameter groups, AdamW fused into one kernel
    # (train.fused_optimizer, on by default: the same update as the per-tensor loop)
    cfg = TrainConfig()
    optimizer = torch.optim.AdamW(
        param_groups(classifier, cfg), lr=1e-5, fused=cfg.fused_optimizer
    )
    images, _ = batch_data(args, device, bundle.image_size)  # labels on the host, as flyp's
    labels = torch.randint(0, len(class_names), (args.batch,))  # loader gives them
    seeds = torch.randint(0, 2**62, (args.batch,))  # each sample's template
    method = get_method("flyp")

    def step(n: int = 1, micro: int | None = None, batch: int = args.batch) -> None:
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            forward_backward(
                method, classifier, images[:batch], labels[:batch], seeds[:batch], 0, ctx,
                micro_batch=micro, precision=args.precision,
            )  # fmt: skip
            optimizer.step()

    flops = counted_flops(step)  # eager: the work of the step, which compiling does not change
    if compiled:  # as flyp.train does for train.compile
        model = classifier.model
        model.encode_image = torch.compile(model.encode_image)
        model.encode_text = torch.compile(model.encode_text, dynamic=True)
    step(args.warmup + (2 if compiled else 0))  # compilation happens in the first steps
    seconds, peak = timed(lambda: step(args.steps), device)
    result = figures(name, args.batch, args.steps, seconds, flops, peak, card)
    result["text_tokens"] = context_length or "trimmed to the longest caption"
    result["distinct_captions"] = "deduplicated" if unique else "every caption encoded"
    result["captions"] = captions
    if device.type == "cuda" and name == "flyp default":
        result.update(gradcache_memory(step, args, device))
    return result


def gradcache_memory(step, args, device: torch.device) -> dict:
    """The gradient cache: the full batch in chunks of ``micro`` against one chunk alone (the
    optimizer state and gradients already allocated in both)."""
    base = torch.cuda.memory_allocated(device)
    result = {}
    chunks = [("micro_alone", args.micro, None), ("cached", args.batch, args.micro)]
    for name, batch, micro in chunks:
        step(1, micro, batch)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(1, micro, batch)
        torch.cuda.synchronize(device)
        used = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        result[f"gradcache_{name}_gb"] = round(used, 3)
    result["gradcache_ratio"] = round(
        result["gradcache_cached_gb"] / max(result["gradcache_micro_alone_gb"], 1e-9), 2
    )
    result["gradcache_note"] = (
        f"batch {args.batch} in chunks of {args.micro} vs one chunk of {args.micro} alone"
    )
    return result


def open_clip_train_path(args, device: torch.device, card) -> dict:
    """open_clip_train's own loop, train_one_epoch, over in-memory batches of the same images and
    captions (tokenized to open_clip's 77 tokens, as its data pipeline does)."""
    import open_clip
    from open_clip_train.train import train_one_epoch

    torch.manual_seed(0)
    arch = open_clip_arch(args.model)
    model = open_clip.create_model(arch, device=device, output_dict=True)  # as its main does
    tokenizer = open_clip.get_tokenizer(arch)
    images, labels = batch_data(args, device, model.visual.image_size[0])
    captions = [TEMPLATES[i % len(TEMPLATES)].format(CLASSES[c]) for i, c in enumerate(labels)]
    texts = tokenizer(captions).to(device)
    # open_clip_train.main's AdamW: no weight decay on gains, biases and the logit scale
    exclude = [p for n, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim < 2 or "logit_scale" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": exclude, "weight_decay": 0.0}, {"params": rest, "weight_decay": 0.1}],
        lr=1e-5, betas=(0.9, 0.98), eps=1e-6,
    )  # fmt: skip
    precision = {"bf16": "amp_bf16", "fp32": "fp32"}[args.precision]
    settings = SimpleNamespace(
        device=str(device), precision=precision, distill=False, accum_freq=1,
        skip_scheduler=True, horovod=False, grad_clip_norm=None, log_every_n_steps=10**9,
        world_size=1, rank=0, local_rank=0, batch_size=args.batch, wandb=False,
    )  # fmt: skip

    def epoch(n: int) -> None:
        batches = _Batches([(images, texts)] * n, n, n * args.batch)
        data = {"train": SimpleNamespace(dataloader=batches, set_epoch=lambda _: None)}
        train_one_epoch(model, data, open_clip.ClipLoss(), 0, optimizer, None, None, None, settings)

    logging.disable(logging.INFO)  # its per-epoch log lines
    flops = counted_flops(lambda: epoch(1))
    epoch(args.warmup)
    seconds, peak = timed(lambda: epoch(args.steps), device)
    result = figures("open_clip_train", args.batch, args.steps, seconds, flops, peak, card)
    result["text_tokens"] = texts.shape[1]
    return result


class _Batches(list):
    """The loader train_one_epoch reads: the batches, and their count and samples."""

    def __init__(self, batches, num_batches: int, num_samples: int):
        super().__init__(batches)
        self.num_batches, self.num_samples = num_batches, num_samples


def open_clip_arch(model: str) -> str:
    """An open_clip architecture name; a config JSON path is registered under its stem."""
    if model.endswith(".json"):
        import open_clip

        open_clip.add_model_config(Path(model))
        return Path(model).stem
    return model


def activation_check() -> dict:
    """Issue 15 part 1: ``open_clip:ViT-B-16:openai`` (what the paper recipes use) builds, through
    flyp's own resolution but without the weights (no hub here), with QuickGELU in every MLP."""
    from open_clip.transformer import QuickGELU

    import flyp.models.openclip as oc
    from flyp.models import load_model

    resolve = oc._resolve_pretrained
    oc._resolve_pretrained = lambda arch, weights: (None, False)
    try:
        model = load_model("open_clip:ViT-B-16:openai").model
    finally:
        oc._resolve_pretrained = resolve
    kinds = {type(m.gelu).__name__ for m in model.modules() if hasattr(m, "c_fc")}
    count = sum(1 for m in model.modules() if hasattr(m, "c_fc"))
    ok = kinds == {QuickGELU.__name__}
    spec = "open_clip:ViT-B-16:openai"
    return {"spec": spec, "mlps": count, "activations": sorted(kinds), "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip name or config JSON")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each path")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro", type=int, default=32, help="gradient-cache chunk")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    card = card_peak_tflops(name) if args.precision == "bf16" and device.type == "cuda" else None
    result: dict = {
        "device": name,
        "torch": torch.__version__,
        "model": args.model,
        "batch": args.batch,
        "precision": args.precision,
        "peak_bf16_tflops": card,
        "mfu_note": (
            f"against {name}'s datasheet bf16 dense peak, {card} TFLOP/s"
            if card
            else f"not given: no datasheet bf16 peak listed for {name} (PEAK_BF16_TFLOPS)"
        ),
        "paths": [],
    }
    failures = []
    parts = [
        ("open_clip_train", lambda: open_clip_train_path(args, device, card)),
        *[(row[0], partial(flyp_path, args, device, card, *row)) for row in FLYP_ROWS],
    ]
    for title, part in parts:
        try:
            result["paths"].append(part())
        except Exception as err:
            traceback.print_exc()
            failures.append(f"{title}: {type(err).__name__}: {err}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    try:
        result["activation_check"] = activation_check()
        if not result["activation_check"]["ok"]:
            failures.append(f"activation check: {result['activation_check']}")
    except Exception as err:
        traceback.print_exc()
        failures.append(f"activation check: {type(err).__name__}: {err}")
    by_path = {p["path"]: p for p in result["paths"]}
    if "open_clip_train" in by_path:
        base = by_path["open_clip_train"]["images_per_s"]
        result["ratios"] = {
            f"{p} / open_clip_train": round(by_path[p]["images_per_s"] / base, 2)
            for p, *_ in FLYP_ROWS
            if p in by_path
        }
    result["failures"] = failures
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if failures else 0


def print_table(result: dict) -> None:
    print(
        f"device {result['device']}, torch {result['torch']}, {result['model']} random init, "
        f"batch {result['batch']}, {result['precision']}; MFU {result['mfu_note']}"
    )
    heads = ("images/s", "step s", "GFLOP/step", "MFU", "peak GiB")
    print(f"{'path':<16} {heads[0]:>9} {heads[1]:>8} {heads[2]:>10} {heads[3]:>6} {heads[4]:>8}")
    for p in result["paths"]:
        mfu = "-" if p["mfu"] is None else f"{p['mfu']:.1%}"
        mem = "-" if p["peak_memory_gb"] is None else f"{p['peak_memory_gb']:.2f}"
        print(
            f"{p['path']:<16} {p['images_per_s']:>9.1f} {p['step_s']:>8.4f} "
            f"{p['train_gflop_per_step']:>10.1f} {mfu:>6} {mem:>8}"
        )
    for ratio, value in result.get("ratios", {}).items():
        print(f"{ratio}: {value:.2f}x")
    for p in result["paths"]:
        if "gradcache_ratio" in p:
            print(
                f"gradient cache: {p['gradcache_cached_gb']} GiB for {p['gradcache_note']} "
                f"({p['gradcache_micro_alone_gb']} GiB): {p['gradcache_ratio']}x"
            )
    if "activation_check" in result:
        a = result["activation_check"]
        verdict = "ok" if a["ok"] else "WRONG, expected QuickGELU only"
        kinds = ", ".join(a["activations"])
        print(f"activation: {a['spec']} builds with {kinds} in its {a['mlps']} MLPs: {verdict}")
    for failure in result["failures"]:
        print(f"FAILED {failure}")


if __name__ == "__main__":
    raise SystemExit(main())
