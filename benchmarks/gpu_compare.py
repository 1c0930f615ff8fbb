"""The whole ``flyp compare`` path on one device, on generated images: every method, WiSE-FT,
two seeds and their soups, then one bf16 FLYP run through the gradient cache and ``flyp
evaluate``. Run by benchmarks/gpu_check.sh; the device machine has no dataset and no network,
so the images are coloured squares (tests/fakes.py) and the model a random-init open_clip ViT.

Every step runs even when an earlier one failed (one device run should show every failure);
the exit status is 1 if any failed. ``--device cpu`` is the dry run with smaller sizes.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # make_domains: the fake image trees the tests use

from fakes import make_domains  # noqa: E402
from flyp import compare as flyp_compare  # noqa: E402
from flyp.cli import main as flyp  # noqa: E402
from flyp.methods import METHODS  # noqa: E402

RECIPE = ROOT / "benchmarks" / "configs" / "gpu_check.yaml"
CLASSES = ["dog", "horse", "house", "guitar"]
DOMAINS = ["photo", "art", "sketch"]
# Per device: images per class and domain, model config, its image size, training batch.
# CUDA: photo has 96 images -> 48 train, 24 val, 24 test: 3 steps of 16 per epoch, 2 epochs.
SIZES = {
    "cuda": {"per_class": 24, "config": "flyp-bench-vit.json", "image_size": 128, "batch": 16},
    "cpu": {"per_class": 8, "config": "flyp-gpu-tiny.json", "image_size": 32, "batch": 8},
}
SEEDS = [0, 1]


def expected_runs(methods: list[str]) -> dict[str, list[str]]:
    """Files ``flyp compare --soups`` must leave for two seeds, by run folder."""
    runs = {"zeroshot": ["metrics.json"]}
    for name in methods:
        if name == "zeroshot":
            continue
        for seed in SEEDS:
            runs[f"{name}-s{seed}"] = ["metrics.json", "wise.json", "model.safetensors"]
        if METHODS[name].objective != "none":  # only trained methods have soups
            for soup in ("uniform", "greedy"):
                runs[f"soups/{name}-soup-{soup}"] = ["metrics.json"]
    return runs


def check_runs(out: Path, methods: list[str], device: str) -> list[str]:
    """What is missing or wrong in a finished comparison, one line each (empty: all there)."""
    problems = [
        f"{out / run / name} is missing"
        for run, names in expected_runs(methods).items()
        for name in names
        if not (out / run / name).is_file()
    ]
    for recipe in sorted(out.glob("*/recipe.yaml")):
        ran_on = yaml.safe_load(recipe.read_text())["train"]["device"]
        if ran_on != device:
            problems.append(f"{recipe} has train.device={ran_on}, expected {device}")
    for report in ("report.md", "results.json", "figure.png"):
        if not (out / report).is_file():
            problems.append(f"{out / report} is missing")
    return problems


def trace(name: str, describe) -> None:
    """Print when flyp.compare starts and ends each run, sweep and soup: a run that fails or
    hangs on the device is then named in the log (compare itself prints only the report)."""
    inner = getattr(flyp_compare, name)

    def traced(*args, **kwargs):
        what = f"{name} {describe(*args, **kwargs)}"
        print(f"  {what} ...", flush=True)
        tick = time.time()
        result = inner(*args, **kwargs)
        print(f"  {what} done in {time.time() - tick:.1f} s", flush=True)
        return result

    setattr(flyp_compare, name, traced)


trace("finetune", lambda recipe, run_dir, **_: f"{recipe.train.method} seed {recipe.train.seed}")
trace("wise_sweep", lambda exp, run_dir, *_, **__: Path(run_dir).name)
trace("make_soups", lambda exp, run_dirs, *_: Path(run_dirs[0]).name.rsplit("-s", 1)[0])


def step(title: str, failures: list[str], fn: Callable[[], int | str | None]) -> None:
    """Run one step; a non-zero status or any exception is recorded and the next step runs."""
    print(f"\n=== {title}", flush=True)
    tick = time.time()
    try:
        status = fn()
    except Exception as err:
        traceback.print_exc()
        status = f"raised {type(err).__name__}: {err}"
    except SystemExit as err:  # argparse exits through it
        status = f"exited with {err.code}"
    ok = status in (0, None)
    if not ok:
        failures.append(f"{title}: {status}")
    print(f"=== {title}: {'ok' if ok else 'FAILED'} in {time.time() - tick:.1f} s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=sorted(SIZES))
    parser.add_argument("--work", default="/tmp/flyp_gpu_check", help="emptied, then written")
    parser.add_argument("--workers", type=int, default=0, help="data.num_workers")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU; use --device cpu for the dry run")
        return 2
    size = SIZES[args.device]
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = make_domains(work / "data", DOMAINS, CLASSES, per_class=size["per_class"], size=32)
    overrides = [
        f"model.spec=open_clip:{ROOT / 'benchmarks' / 'configs' / size['config']}",
        f"model.image_size={size['image_size']}",
        f"data.root={data}",
        f"data.num_workers={args.workers}",
        f"train.batch_size={size['batch']}",
        f"train.device={args.device}",
    ]
    sets = [arg for s in overrides for arg in ("--set", s)]
    methods = list(METHODS)
    compared = work / "compare"
    runs = ["--seeds", *map(str, SEEDS), "--soups", "--out", str(compared)]
    failures: list[str] = []
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, methods {' '.join(methods)}, seeds {SEEDS}")

    step(
        "flyp compare: every method, WiSE-FT, 2 seeds, soups (fp32)",
        failures,
        lambda: flyp(["compare", str(RECIPE), *sets, "--methods", *methods, *runs]),
    )
    if failures:  # one failure stops compare: run each method alone to name every failing one
        for method in [m for m in methods if m != "zeroshot"]:
            step(
                f"flyp compare --methods zeroshot {method} (alone, finished runs reused)",
                failures,
                lambda m=method: flyp(
                    ["compare", str(RECIPE), *sets, "--methods", "zeroshot", m, *runs]
                ),
            )

    def check() -> int | str:
        problems = check_runs(compared, methods, args.device)
        print("\n".join(problems) or f"all {len(expected_runs(methods))} run folders complete")
        return f"{len(problems)} files missing or wrong" if problems else 0

    step("comparison outputs", failures, check)
    bf16 = work / "flyp-bf16"
    bf16_sets = ["--set", "train.precision=bf16", "--set", "train.micro_batch=4"]
    step(
        "flyp finetune: flyp, bf16 autocast, gradient cache (micro-batch 4)",
        failures,
        lambda: flyp(["finetune", str(RECIPE), *sets, *bf16_sets, "--out", str(bf16)]),
    )
    step(
        "flyp evaluate of the bf16 run",
        failures,
        lambda: flyp(["evaluate", str(bf16), "--out", str(work / "bf16-evaluate.json")]),
    )
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"\npeak GPU memory in this process: {peak:.2f} GiB")
        if peak == 0:
            failures.append("nothing was allocated on the GPU: the runs did not use it")
    print("\n" + ("\n".join(f"FAILED {f}" for f in failures) or "gpu_compare: every step ok"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
