"""Where a comparison's time goes: model load, each run's training and evaluation, the WiSE-FT
sweeps, the merges (soups, Model Stock) and the report, timed by wrapping the functions
`flyp compare` calls. Prints a table; a regression shows as one phase growing.

    .venv/bin/python benchmarks/demo_phases.py recipes/pacs_demo.yaml --out /tmp/phases
    .venv/bin/python benchmarks/demo_phases.py recipes/pacs_demo.yaml --seeds 0 1 2 --soups

Runs already finished under --out are reused (and then cost nothing): use a new --out to time
everything.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import defaultdict
from pathlib import Path

import flyp.compare as compare_mod
from flyp.recipe import load_recipe

TIMES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)


def timed(module, name: str, phase) -> None:
    """Replace ``module.name`` by a wrapper adding its wall time to ``phase(args, kwargs)``."""
    original = getattr(module, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        tick = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            key = phase(args, kwargs)
            TIMES[key] += time.perf_counter() - tick
            COUNTS[key] += 1

    setattr(module, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--methods", nargs="+", default=["zeroshot", "lp", "ft", "lpft", "l2sp", "flyp"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--soups", action="store_true")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default="runs/demo-phases")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe, args.set)
    timed(compare_mod, "prepare", lambda a, k: "model load + data")
    timed(compare_mod, "finetune", lambda a, k: f"run {a[0].train.method}")
    timed(compare_mod, "wise_sweep", lambda a, k: "WiSE-FT sweeps")
    timed(compare_mod, "make_soups", lambda a, k: "soups")
    timed(compare_mod, "write_report", lambda a, k: "report")
    tick = time.perf_counter()
    compare_mod.compare(recipe, args.methods, args.seeds, Path(args.out), soups=args.soups)
    total = time.perf_counter() - tick

    # a run's own split of its time (metrics.json): training vs evaluating the selected weights
    split: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for metrics_path in Path(args.out).glob("*/metrics.json"):
        m = json.loads(metrics_path.read_text())
        split[m["method"]][0] += m.get("train_seconds") or 0.0
        split[m["method"]][1] += m.get("eval_seconds") or 0.0
    print(f"{'phase':<24}{'calls':>6}{'seconds':>10}{'share':>8}   (train / final eval)")
    for key, seconds in sorted(TIMES.items(), key=lambda kv: -kv[1]):
        extra = ""
        method = key.removeprefix("run ")
        if key.startswith("run ") and method in split:
            extra = f"   {split[method][0]:.0f} / {split[method][1]:.0f}"
        print(f"{key:<24}{COUNTS[key]:>6}{seconds:>10.1f}{100 * seconds / total:>7.1f}%{extra}")
    print(f"{'total':<24}{'':>6}{total:>10.1f}")


if __name__ == "__main__":
    main()
