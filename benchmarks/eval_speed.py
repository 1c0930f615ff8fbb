"""Evaluation images/s against the image tower's pure forward throughput, at the evaluation
batch size.

"pure forward" is `model.encode_image` on a ready batch (eval mode, no_grad, the tower's
layout, the recipe's eval.precision): the most an evaluation could do. "flyp, cached set" is
`flyp.evaluate.evaluate_classifier` over a set already decoded (the comparison's case: every pass
after the first), with the zero-shot head, logits, metrics and calibration included; "flyp,
from disk" decodes the images (a set's first pass). Runs alternate round by round.

  .venv/bin/python benchmarks/eval_speed.py                       # ~2 minutes on 2 cores
  .venv/bin/python benchmarks/eval_speed.py --images 512 --set eval.precision=fp32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flyp.evaluate import evaluate_classifier
from flyp.experiment import prepare
from flyp.methods import Classifier
from flyp.models.base import prefers_channels_last, tune_cpu_bf16
from flyp.precision import autocast, resolve
from flyp.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/pacs_demo.yaml")
    parser.add_argument("--images", type=int, default=384, help="images in the evaluated set")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE")
    args = parser.parse_args()

    overrides = [f"data.max_eval={args.images}", "data.ood_domains=[sketch]", *args.set]
    recipe = load_recipe(args.recipe, overrides)
    exp = prepare(recipe)
    model, batch = exp.bundle.model, recipe.eval.batch_size
    model.eval()
    classifier = Classifier(model)
    names = ["sketch"]
    n = len(exp.benchmark.eval_sets()["sketch"])
    layout = torch.channels_last if prefers_channels_last(model) else torch.contiguous_format
    ready = torch.randn(batch, 3, exp.bundle.image_size, exp.bundle.image_size)
    ready = ready.contiguous(memory_format=layout)

    precision = resolve(recipe.eval.precision, "cpu").name  # auto: as flyp's evaluation chooses
    if precision == "bf16":
        tune_cpu_bf16(model)  # as flyp's evaluation does on the CPU

    def pure() -> float:
        tick = time.perf_counter()
        with torch.no_grad(), autocast(torch.device("cpu"), precision):
            for start in range(0, n, batch):
                model.encode_image(ready[: min(batch, n - start)])
        return n / (time.perf_counter() - tick)

    def cached() -> float:
        tick = time.perf_counter()
        evaluate_classifier(classifier, exp, names)
        return n / (time.perf_counter() - tick)

    def from_disk() -> float:
        exp.eval_cache.clear()
        return cached()

    from_disk()  # warm-up, and the set is cached from here on
    figures: dict[str, list[float]] = {"pure forward": [], "flyp, cached set": [], "flyp, from disk": []}
    for _ in range(args.rounds):
        figures["pure forward"].append(pure())
        figures["flyp, cached set"].append(cached())
        figures["flyp, from disk"].append(from_disk())
    print(f"{exp.bundle.spec} at {exp.bundle.image_size} px, {n} PACS sketch images, eval batch "
          f"{batch}, eval.precision {precision}, {torch.get_num_threads()} threads, median of "
          f"{args.rounds} rounds\n")
    print("| pass | images/s | vs pure forward |")
    print("|---|---|---|")
    base = statistics.median(figures["pure forward"])
    for name, values in figures.items():
        med = statistics.median(values)
        print(f"| {name} | {med:.1f} | {100 * med / base:.0f}% |")


if __name__ == "__main__":
    main()
