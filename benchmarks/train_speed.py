"""Training images/s, peak memory and MFU: flyp's FLYP step loop vs open_clip's `open_clip_train`.

Same model (an open_clip config, random init), same PACS photo images and captions
("a photo of a {class}."), same batch and precision, one process on the CPU. Runs alternate
(flyp, open_clip_train, flyp recommended, ...) so machine noise hits all alike; each run is a
fresh child process and reports the median step time after warm-up, and its peak RSS.

  .venv/bin/python benchmarks/train_speed.py                 # ~3 minutes on 2 cores
  .venv/bin/python benchmarks/train_speed.py --steps 12 --rounds 3 --batch 64

open_clip_train needs braceexpand, webdataset and pandas; if the venv lacks them, install them
apart and pass the folder: --extra-path /tmp/octrain_deps (pip install --target ... --no-deps).

The rows, each an alternating run per round:
- "flyp equal work": open_clip's work and settings: every caption encoded (no deduplication),
  fp32, the full 77-token text context, no workers, no gradient clipping (open_clip_train's
  default); the headline ratio. flyp's step is as flyp.train runs it on a CPU in fp32: AdamW
  fused into one kernel (`train.fused_optimizer`, on by default: the same update) and glibc
  keeping freed memory, as in every flyp row. Every flyp row uses the layout flyp.train does (channels_last for
  convolutional towers only); the other rows clip gradients at 1.0, flyp's default.
- "flyp dedup PACS": as equal work, but each distinct caption of a batch encoded once
  (train.unique_captions, flyp's default): on PACS (7 classes, one template) a batch of 32 holds
  at most 7 captions, a gain that vanishes when nearly every caption differs, as in:
- "flyp ImageNet captions": deduplication on, but captions of ImageNet's shape: 1000 classes x
  the 80 OpenAI templates, each sample's class and template drawn uniformly.
- "flyp recommended": flyp's CPU settings for speed on PACS: bf16 autocast tuned per operator
  (`tune_cpu_bf16`), text trimmed to the longest caption (the default for open_clip models),
  fused AdamW, glibc keeping freed memory, deduplication on.
- "open_clip_train": open_clip's own training script on the same images and captions.
MFU counts each row's own work (FLOPs counted in its first step; open_clip_train does the
equal-work row's). The last lines read "<row> / open_clip_train: 1.02x", one per flyp row.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    emit,
    matmul_peak,
    pacs_photo,
    peak_rss_mb,
    read_emitted,
    write_csv,
)

CONFIG = HERE / "configs" / "flyp-bench-vit.json"


def flyp_child(args: argparse.Namespace) -> None:
    import random

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from flyp.data.folders import Sample
    from flyp.data.loader import EpochSampler, ImageDataset, train_loader
    from flyp.gradcache import forward_backward
    from flyp.methods import Classifier, LossContext, get_method
    from flyp.models import load_model
    from flyp.models.base import keep_freed_memory, prefers_channels_last, tune_cpu_bf16
    from flyp.recipe import TrainConfig
    from flyp.train import freeze_batchnorm_stats, param_groups

    torch.manual_seed(0)
    rows = pacs_photo(args.batch * (args.warmup + args.steps))
    classes = sorted({c for _, c, _ in rows})
    bundle = load_model(f"open_clip:{args.model}", context_length=77 if args.full_text else None)
    # the layout flyp.train uses: channels_last for convolutional towers only (a ViT ran ~1.3x
    # slower in it on this CPU)
    channels_last = prefers_channels_last(bundle.model)
    model = bundle.model.to(memory_format=torch.channels_last) if channels_last else bundle.model
    method = get_method("flyp")
    class_names = [c.removeprefix("a photo of a ").removesuffix(".") for c in classes]
    by_caption = {c: i for i, c in enumerate(classes)}
    samples = [Sample(p, by_caption[c]) for p, c, _ in rows]
    templates = ["a photo of a {}."]
    if args.captions == "imagenet":  # 1000 classes x 80 templates, labels drawn uniformly
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        class_names = list(IMAGENET_CLASSNAMES)
        templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
        draw = random.Random(0)
        samples = [Sample(p, draw.randrange(len(class_names))) for p, _, _ in rows]
    ctx = LossContext(bundle.tokenizer, class_names, templates, unique_captions=bool(args.unique))
    ctx.caption_table()  # every caption tokenized once, before the first step (as flyp.train)
    classifier = Classifier(model)
    cfg = TrainConfig(precision=args.precision)
    # What flyp.train does on every CPU run, whatever the precision: AdamW fused into one kernel
    # (train.fused_optimizer, the same update as torch's loop) and glibc keeping freed memory.
    # Neither changes the work; bf16's per-operator tuning comes with bf16 only.
    keep_freed_memory()
    if args.precision == "bf16":
        tune_cpu_bf16(model)
    optimizer = torch.optim.AdamW(param_groups(classifier, cfg), lr=1e-5, fused=cfg.fused_optimizer)
    classifier.train()
    freeze_batchnorm_stats(classifier)
    dataset = ImageDataset(samples, bundle.train_transform)
    loader = train_loader(
        dataset, EpochSampler(len(dataset), args.batch, 0, 0), args.batch, args.workers
    )
    times, flops = [], None
    tick = time.perf_counter()
    for i, (images, labels, seeds) in enumerate(loader):  # the step of flyp.train.finetune
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        counter = FlopCounterMode(display=False) if i == 0 else None
        with counter or contextlib.nullcontext():
            forward_backward(
                method, classifier, images, labels, seeds, i, ctx, precision=args.precision
            )
        if counter:
            flops = counter.get_total_flops()
        if args.clip:  # flyp's default; open_clip_train clips nothing unless asked
            torch.nn.utils.clip_grad_norm_(classifier.parameters(), cfg.grad_clip)
        optimizer.step()
        now = time.perf_counter()
        times.append(now - tick)
        tick = now
    step = statistics.median(times[args.warmup :])
    emit(
        {
            "images_per_s": args.batch / step,
            "peak_rss_mb": peak_rss_mb(),
            "flops_per_image": flops / args.batch,
            "steps": len(times),
        }
    )


def open_clip_child(args: argparse.Namespace) -> None:
    import open_clip
    from open_clip_train.main import main

    open_clip.add_model_config(Path(args.model))
    with tempfile.TemporaryDirectory() as tmp:
        csv = write_csv(pacs_photo(args.batch * (args.warmup + args.steps)), Path(tmp) / "t.csv")
        precision = {"fp32": "fp32", "bf16": "amp_bf16"}[args.precision]
        main(
            [
                "--train-data", str(csv), "--dataset-type", "csv",
                "--csv-img-key", "filepath", "--csv-caption-key", "title",
                "--model", Path(args.model).stem, "--batch-size", str(args.batch),
                "--precision", precision, "--workers", str(args.workers), "--epochs", "1",
                "--device", "cpu", "--log-every-n-steps", "1", "--save-frequency", "0",
                "--zeroshot-frequency", "0", "--val-frequency", "0", "--report-to", "",
                "--logs", tmp, "--name", "bench", "--warmup", "1", "--lr", "1e-5",
            ]
        )  # fmt: skip
        log = (Path(tmp) / "bench" / "out.log").read_text()
    # "Batch (t): X" with a log every step: the time of that step, data included
    times = [
        float(x.split("Batch (t): ")[1].split(",")[0]) for x in log.splitlines() if "Batch (t)" in x
    ]
    emit(
        {
            "images_per_s": args.batch / statistics.median(times[args.warmup :]),
            "peak_rss_mb": peak_rss_mb(),
            "steps": len(times),
        }
    )


def run_child(kind: str, args: argparse.Namespace, **overrides) -> dict:
    argv = [sys.executable, __file__, "--child", kind, "--model", args.model]
    if overrides.pop("full_text", True):
        argv.append("--full-text")
    settings = {
        "batch": args.batch, "steps": args.steps, "warmup": args.warmup,
        "precision": args.precision, "workers": 0, "unique": 1, "captions": "pacs", "clip": 1,
        **overrides,
    }  # fmt: skip
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [args.extra_path, str(HERE.parent / "src")])),
    }
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode:
        raise RuntimeError(f"{kind} run failed:\n{done.stderr[-3000:]}")
    return read_emitted(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=["flyp", "open_clip"])
    parser.add_argument("--model", default=str(CONFIG), help="open_clip model config JSON")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per run")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--full-text", action="store_true")
    parser.add_argument("--unique", type=int, default=1, help="child: deduplicate captions")
    parser.add_argument(
        "--clip", type=int, default=1, help="child: clip gradients (flyp's default)"
    )
    parser.add_argument("--captions", default="pacs", choices=["pacs", "imagenet"])
    parser.add_argument("--extra-path", default=os.environ.get("OPEN_CLIP_TRAIN_DEPS", ""))
    args = parser.parse_args()
    if args.child == "flyp":
        return flyp_child(args)
    if args.child == "open_clip":
        return open_clip_child(args)

    import torch

    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak on {torch.get_num_threads()} threads: "
          f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")  # fmt: skip
    rows = {  # name: (kind, overrides); the order each round runs them
        "flyp equal work": ("flyp", {"unique": 0, "clip": 0}),
        "flyp dedup PACS": ("flyp", {}),
        "flyp ImageNet captions": ("flyp", {"captions": "imagenet"}),
        "flyp recommended": ("flyp", {"precision": "bf16", "full_text": False}),
        "open_clip_train": ("open_clip", {}),
    }
    runs: dict[str, list[dict]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, (kind, overrides) in rows.items():
            runs[name].append(run_child(kind, args, **dict(overrides)))
    equal_flops = runs["flyp equal work"][0]["flops_per_image"]
    print(f"\nmodel {Path(args.model).stem}, batch {args.batch}, {args.steps} timed steps x "
          f"{args.rounds} rounds, PACS photo images; train FLOPs/image at equal work "
          f"{equal_flops / 1e9:.2f} G")  # fmt: skip
    print(f"{'run':<24}{'images/s (each round)':>26}{'median':>9}{'peak RSS MB':>13}{'MFU':>7}")
    medians = {}
    for name, results in runs.items():
        speeds = [r["images_per_s"] for r in results]
        medians[name] = statistics.median(speeds)
        precision = "bf16" if name == "flyp recommended" else args.precision
        run_flops = results[0].get("flops_per_image", equal_flops)  # open_clip: equal work's
        mfu = medians[name] * run_flops / (peak[precision] * 1e9)
        print(f"{name:<24}{' '.join(f'{s:.2f}' for s in speeds):>26}{medians[name]:>9.2f}"
              f"{max(r['peak_rss_mb'] for r in results):>13.0f}{100 * mfu:>6.1f}%")  # fmt: skip
    base = medians["open_clip_train"]
    print()
    for name in rows:
        if name != "open_clip_train":
            print(f"{name} / open_clip_train: {medians[name] / base:.2f}x")


if __name__ == "__main__":
    main()
