"""Training images/s of the default model, one speed option at a time: what each one pays.

The step is flyp's own (`flyp.train` loop: loader, `forward_backward`, gradient clipping, AdamW,
scheduler) on the demo's setting: PACS photo, 160 px, batch 32, method flyp (or --method ft).
Every option is measured against "before" (flyp as it was before the speed work: fp32,
per-tensor AdamW, every image decoded from disk when drawn, every caption of the batch through
the text tower, no workers) and added alone; "all kept" is the combination the demo uses. Configurations alternate round by round so machine
noise hits all alike; each reports the median step time (data loading included) after warm-up.

    .venv/bin/python benchmarks/step_options.py                  # ~4 minutes on 2 cores
    .venv/bin/python benchmarks/step_options.py --steps 6 --rounds 2 --compile

It also prints what tokenising a step's captions and decoding its images cost (ms a step), the
two candidates that a cache would remove.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from flyp.data.folders import load_rgb
from flyp.data.loader import EpochSampler, ImageDataset, train_loader
from flyp.experiment import loss_context, prepare
from flyp.gradcache import forward_backward
from flyp.methods import (
    build_classifier,
    caption_ids,
    distinct_captions,
    get_method,
    image_tower_names,
    set_trainable,
    text_tower_names,
)
from flyp.models.base import (
    keep_freed_memory,
    prefers_channels_last,
    to_model_layout,
    tune_cpu_bf16,
)
from flyp.recipe import load_recipe
from flyp.reuse import DecodedImages
from flyp.train import freeze_batchnorm_stats, param_groups

BEFORE = {
    "precision": "fp32",
    "fused": False,
    "decoded": False,
    "unique": False,
    "tuned": False,
    "workers": 0,
    "compile": False,
}
ALL = "all kept (+ bf16, depthwise fp32)"
OPTIONS = {
    "before": {},
    "+ fused AdamW": {"fused": True},
    "+ decoded-image cache": {"decoded": True},
    "+ each distinct caption encoded once": {"unique": True},
    "+ 1 loader worker": {"workers": 1},
    "+ bf16 autocast": {"precision": "bf16"},
    "+ bf16, depthwise convs in fp32": {"precision": "bf16", "tuned": True},
    "fp32 kept (fused, cache, distinct)": {"fused": True, "decoded": True, "unique": True},
    ALL: {
        "precision": "bf16", "fused": True, "decoded": True, "unique": True, "tuned": True,
    },
}


def run(exp, pretrained, method_name: str, opts: dict, steps: int, warmup: int) -> list[float]:
    """Step times (s) of ``steps`` steps after ``warmup``, from a fresh pretrained model."""
    model = exp.bundle.model
    model.load_state_dict(pretrained)
    torch.manual_seed(0)
    method = get_method(method_name)
    ctx = loss_context(exp)
    ctx.unique_captions = opts["unique"]
    classifier = build_classifier(method, model, ctx)
    image_names = image_tower_names(model, exp.bundle.image_size)
    set_trainable(method, classifier, image_names, text_tower_names(model, exp.bundle.tokenizer))
    cfg = copy.deepcopy(exp.recipe.train)
    optimizer = torch.optim.AdamW(
        param_groups(classifier, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
        fused=opts["fused"] or None,
    )
    decoded = exp.train_images.get(exp.benchmark.train, 2.0) if opts["decoded"] else None
    dataset = ImageDataset(exp.benchmark.train, exp.bundle.train_transform, decoded=decoded)
    channels_last = prefers_channels_last(model)
    for module in model.modules():  # undo an earlier configuration's tuning
        module.__dict__.pop("forward", None)
    model.__dict__.pop("encode_image", None)
    if opts["tuned"]:
        tune_cpu_bf16(model)
    if opts["compile"]:
        model.encode_image = torch.compile(model.encode_image)
        model.encode_text = torch.compile(model.encode_text, dynamic=True)
    classifier.train()
    freeze_batchnorm_stats(classifier)
    batch = cfg.batch_size
    loader = train_loader(dataset, EpochSampler(len(dataset), batch, 0, 0), batch, opts["workers"])
    times = []
    tick = time.perf_counter()
    for step, (images, labels, seeds) in enumerate(loader):
        images = to_model_layout(images, channels_last)
        optimizer.zero_grad(set_to_none=True)
        forward_backward(method, classifier, images, labels, seeds, step, ctx, precision=opts["precision"])
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
        optimizer.step()
        now = time.perf_counter()
        times.append(now - tick)
        tick = now
        if step + 1 == warmup + steps:
            break
    if opts["compile"]:
        model.__dict__.pop("encode_text", None)  # back to the class's own methods
    return times


def component_costs(exp, samples: int = 64) -> dict[str, float]:
    """ms a step (batch 32) of finding its captions' tokens (rows of the run's token table,
    tokenized once before the first step) and of decoding its images."""
    ctx = loss_context(exp)
    ctx.caption_table()
    labels = torch.tensor([s.label for s in exp.benchmark.train[:32]])
    seeds = torch.arange(32)
    tick = time.perf_counter()
    for _ in range(20):
        distinct, _ = distinct_captions(caption_ids(labels, seeds, ctx), ctx.unique_captions)
        ctx.caption_table()[distinct]
    tokenise = (time.perf_counter() - tick) / 20
    tick = time.perf_counter()
    for s in exp.benchmark.train[:samples]:
        load_rgb(s.path)
    decode = (time.perf_counter() - tick) / samples * 32
    return {"tokenise": tokenise * 1e3, "decode": decode * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/pacs_demo.yaml")
    parser.add_argument("--method", default="flyp")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also all kept + torch.compile")
    args = parser.parse_args()

    exp = prepare(load_recipe(args.recipe))
    exp.train_images = DecodedImages()
    pretrained = copy.deepcopy(exp.bundle.model.state_dict())
    options = dict(OPTIONS)
    if args.compile:
        options["all kept + torch.compile"] = {**OPTIONS[ALL], "compile": True}
    run(exp, pretrained, args.method, BEFORE, 1, args.warmup)  # oneDNN's first-call set-up
    times: dict[str, list[float]] = {name: [] for name in options}
    first: dict[str, float] = {}
    for r in range(args.rounds):
        for name, change in options.items():
            t = run(exp, pretrained, args.method, {**BEFORE, **change}, args.steps, args.warmup)
            first.setdefault(name, sum(t[: args.warmup]))
            times[name] += t[args.warmup :]
            print(f"round {r + 1} {name}: {statistics.median(t[args.warmup:]):.3f} s/step", flush=True)
    # glibc keeping freed memory is process-wide and cannot be undone: measured last
    kept = "all kept + freed memory kept (glibc)"
    keep_freed_memory()
    times[kept] = []
    for r in range(args.rounds):
        t = run(exp, pretrained, args.method, {**BEFORE, **OPTIONS[ALL]}, args.steps, args.warmup)
        first.setdefault(kept, sum(t[: args.warmup]))
        times[kept] += t[args.warmup :]
        print(f"round {r + 1} {kept}: {statistics.median(t[args.warmup:]):.3f} s/step", flush=True)
    batch = exp.recipe.train.batch_size
    base = statistics.median(times["before"])
    print(f"\n{exp.bundle.spec} at {exp.bundle.image_size} px, batch {batch}, method {args.method}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps\n")
    print("| option | s/step (median) | images/s | vs before | warm-up steps (s) |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med:.3f} | {batch / med:.1f} | {base / med:.2f}x | {first[name]:.1f} |")
    costs = component_costs(exp)
    print(f"\nper step: tokenising 32 captions {costs['tokenise']:.1f} ms, decoding 32 images "
          f"{costs['decode']:.1f} ms ({100 * costs['tokenise'] / 1e3 / base:.1f}% and "
          f"{100 * costs['decode'] / 1e3 / base:.1f}% of the 'before' step)")


if __name__ == "__main__":
    main()
