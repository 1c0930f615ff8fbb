"""The paper's comparison: several methods on the same splits and seeds, each with its WiSE-FT
curve, optionally soups over seeds; then the report.

out_dir/
  <method>-s<seed>/   one run directory per method and seed (metrics.json, wise.json, weights)
  soups/              soup metrics (with --soups and several seeds)
  report.md, results.json, results.csv, figure.png
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from flyp.checkpoint import atomic_write_json, load_weights
from flyp.ensemble import greedy_soup, interpolate, model_stock, uniform_soup
from flyp.evaluate import summarise
from flyp.methods import Classifier, build_classifier, get_method, image_tower_names
from flyp.recipe import Recipe, RecipeError, with_overrides
from flyp.report import write_report
from flyp.reuse import FrozenFeatures
from flyp.train import (
    Experiment,
    evaluate_classifier,
    finetune,
    loss_context,
    prepare,
    validation_score,
)


def _reset(exp: Experiment, pretrained: dict[str, torch.Tensor]) -> None:
    exp.bundle.model.load_state_dict(pretrained)


def zeroshot_classifier(exp: Experiment, method_name: str, pretrained: dict[str, torch.Tensor]) -> Classifier:
    """The zero-shot end of a method's WiSE line: pretrained towers, and for head methods the
    head a finetuning run starts from (zero-shot class embeddings times the temperature)."""
    _reset(exp, pretrained)
    method = get_method(method_name)
    return build_classifier(method, exp.bundle.model, loss_context(exp))


def _point(alpha: float, sets: dict, exp: Experiment) -> dict[str, Any]:
    b = exp.benchmark
    return {"alpha": alpha, **summarise(sets, b.id_name, b.ood_names, b.metric), "sets": sets}


def wise_sweep(
    exp: Experiment,
    run_dir: Path,
    alphas: Sequence[float],
    pretrained: dict[str, torch.Tensor],
    known: dict[float, dict] | None = None,
) -> dict[str, Any]:
    """Evaluate the interpolations of a finished run; pick alpha on ID validation (``wise.json``)."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    known = dict(known or {})
    known.setdefault(1.0, metrics["sets"])
    classifier = zeroshot_classifier(exp, metrics["method"], pretrained)
    zeroshot = copy.deepcopy(classifier.state_dict())
    load_weights(classifier, run_dir / "model.safetensors")
    finetuned = copy.deepcopy(classifier.state_dict())
    points = []
    for alpha in alphas:
        if alpha in known:
            sets = known[alpha]
        else:
            classifier.load_state_dict(interpolate(zeroshot, finetuned, alpha))
            sets = evaluate_classifier(classifier, exp)
        points.append(_point(alpha, sets, exp))
    best = max(points, key=lambda p: (p["val"], -abs(p["alpha"] - 0.5)))
    result = {"method": metrics["method"], "seed": metrics["seed"], "best_alpha": best["alpha"], "points": points}
    atomic_write_json(run_dir / "wise.json", result)
    _reset(exp, pretrained)
    return result


SOUPS = ("uniform", "greedy")


def make_soups(
    exp: Experiment,
    run_dirs: Sequence[Path],
    out_dir: Path,
    pretrained: dict[str, torch.Tensor],
    kinds: Sequence[str] = SOUPS,
) -> list[Path]:
    """Weight-space merges of one method's runs: ``uniform`` and ``greedy`` soups (greedy
    ordered and accepted on ID validation) and ``model stock``, anchored at the method's
    starting point (the classifier at WiSE-FT's zero-shot end)."""
    method = json.loads((run_dirs[0] / "metrics.json").read_text())["method"]
    classifier = zeroshot_classifier(exp, method, pretrained)
    anchor = copy.deepcopy(classifier.state_dict())
    states = []
    for run_dir in run_dirs:
        load_weights(classifier, run_dir / "model.safetensors")
        states.append(copy.deepcopy(classifier.state_dict()))

    def val_score(state) -> float:  # the headline metric on ID validation
        classifier.load_state_dict(state)
        return validation_score(classifier, exp)

    merges = []
    if "uniform" in kinds:
        merges.append(("uniform", uniform_soup(states), {}))
    if "greedy" in kinds:
        greedy, kept = greedy_soup(states, val_score)
        merges.append(("greedy", greedy, {"kept_runs": [str(run_dirs[i]) for i in kept]}))
    if "model stock" in kinds:
        merged, ratios = model_stock(anchor, states)
        mean_t = sum(ratios.values()) / len(ratios)
        merges.append(("model stock", merged, {"mean_t": mean_t, "t": ratios}))
    written = []
    for name, state, extra in merges:
        classifier.load_state_dict(state)
        sets = evaluate_classifier(classifier, exp)
        soup_dir = out_dir / f"{method}-soup-{name.replace(' ', '-')}"
        b = exp.benchmark
        atomic_write_json(
            soup_dir / "metrics.json",
            {
                "method": f"{method} soup ({name})",
                "seed": -1,
                "recipe": exp.recipe.name,
                **summarise(sets, b.id_name, b.ood_names, b.metric),
                "sets": sets,
                "runs": [str(d) for d in run_dirs],
                **extra,
            },
        )
        written.append(soup_dir)
    _reset(exp, pretrained)
    return written


def compare(
    recipe: Recipe,
    methods: Sequence[str],
    seeds: Sequence[int],
    out_dir: str | Path,
    wise: bool = True,
    soups: bool = False,
    stock: bool = False,
    method_overrides: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Run every method for every seed (finished runs are reused, killed ones resumed), sweep
    WiSE-FT, merge the seeds (soups, Model Stock), then report. ``method_overrides`` gives a
    method its own ``key=value`` settings (its choice from a sweep: flyp.sweep.sweep_methods)."""
    out_dir = Path(out_dir)
    for name in methods:
        get_method(name)  # unknown names fail before any training
    if stock and len(seeds) < 2:
        raise RecipeError("Model Stock (--stock) merges runs of several seeds; give --seeds 0 1 or more")
    exp = prepare(recipe)
    pretrained = copy.deepcopy(exp.bundle.model.state_dict())
    image_names = image_tower_names(exp.bundle.model, exp.bundle.image_size)
    exp.frozen = FrozenFeatures.of(pretrained, exp.bundle.model, image_names)
    run_dirs: dict[str, list[Path]] = {}

    def run(name: str, seed: int, run_dir: Path) -> dict[str, Any]:
        run_recipe = copy.deepcopy(recipe)
        run_recipe.train.method, run_recipe.train.seed = name, seed
        run_recipe = with_overrides(run_recipe, (method_overrides or {}).get(name, ()))
        run_dirs.setdefault(name, []).append(run_dir)
        if (run_dir / "metrics.json").exists():
            return json.loads((run_dir / "metrics.json").read_text())
        _reset(exp, pretrained)
        resume = (run_dir / "recipe.yaml").exists()  # killed: continued (or restarted)
        return finetune(run_recipe, run_dir, resume=resume, exp=exp.for_run(run_recipe))

    zeroshot_sets = run("zeroshot", seeds[0], out_dir / "zeroshot")["sets"]  # no training: one run
    for seed in seeds:
        for name in methods:
            if name == "zeroshot":
                continue
            run_dir = out_dir / f"{name}-s{seed}"
            run(name, seed, run_dir)
            if wise and not (run_dir / "wise.json").exists():
                wise_sweep(exp, run_dir, recipe.eval.wise_alphas, pretrained, known={0.0: zeroshot_sets})
    extra: list[Path] = []
    kinds = [*(SOUPS if soups else ()), *(["model stock"] if stock else [])]
    if kinds and len(seeds) > 1:
        for name, dirs in run_dirs.items():
            if get_method(name).objective != "none":
                extra += make_soups(exp, dirs, out_dir / "soups", pretrained, kinds)
    all_dirs = [d for dirs in run_dirs.values() for d in dirs] + extra
    return write_report(all_dirs, out_dir, title=f"{recipe.name}: {exp.bundle.spec}")
