"""flyp evaluate: evaluate a finished run directory, or a weights file with the recipe it was
trained with, on the run's own splits (only what is evaluated may change)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flyp.cli._common import (
    add_set_option,
    add_unfinished_option,
    data_folders,
    on_device,
    print_metrics,
)
from flyp.recipe import load_recipe


def register(sub: argparse._SubParsersAction) -> None:
    """Add `flyp evaluate` and its options to the subcommands ``sub``."""
    p = sub.add_parser("evaluate", help="evaluate a run directory or a weights file")
    p.add_argument("target", help="run directory, or a .safetensors file (with --recipe)")
    p.add_argument(
        "--recipe", help="recipe the weights were trained with (default: RUN_DIR/recipe.yaml)"
    )
    add_set_option(p, "eval.batch_size=64")
    p.add_argument("--out", help="also write the metrics to this JSON file (default: print only)")
    add_unfinished_option(p, "evaluate")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flyp.checkpoint import atomic_write_json, load_weights
    from flyp.evaluate import evaluate_classifier, summarise
    from flyp.experiment import prepare
    from flyp.methods import LossContext, build_classifier, get_method
    from flyp.outputs import check_output, not_a_run
    from flyp.paths import broken_link
    from flyp.recipe import RecipeError, check_device
    from flyp.rundir import check_as_trained, check_finished, run_recipe_path

    target = Path(args.target)
    if not target.exists():
        raise FileNotFoundError(
            f"{target} does not exist; pass a run directory or a .safetensors file"
        )
    if target.is_dir():
        many = not_a_run(target)
        if many and not (target / "recipe.yaml").is_file():
            raise FileNotFoundError(many)
        recipe_path = (
            Path(args.recipe)
            if args.recipe
            else run_recipe_path(target, "a run directory or a .safetensors file")
        )
        weights = target / "model.safetensors"
        refusal = broken_link(weights)
        if refusal:
            raise FileNotFoundError(refusal)
        if not weights.is_file():
            raise FileNotFoundError(
                f"{target} has no model.safetensors: is the run finished? "
                f"(resume it with flyp finetune --resume {target})"
            )
    else:
        if not args.recipe:
            raise RecipeError(
                f"evaluating the weights file {target} needs --recipe "
                "(the recipe.yaml of the run that wrote it)"
            )
        recipe_path, weights = Path(args.recipe), target
    check_finished(weights.parent, args.unfinished)
    if args.out:
        check_output(args.out, [target, weights, recipe_path])
    recipe = load_recipe(recipe_path, args.set)
    if target.is_dir():
        check_as_trained(target, recipe, "evaluating")
    if args.out:
        check_output(args.out, data=data_folders(recipe))
    check_device(recipe.train.device)
    exp = on_device(prepare(recipe))
    method = get_method(recipe.train.method)
    ctx = LossContext(exp.bundle.tokenizer, exp.benchmark.class_names, exp.benchmark.templates)
    classifier = build_classifier(method, exp.bundle.model, ctx)
    load_weights(classifier, weights, recipe.train.method)
    sets = evaluate_classifier(classifier, exp)
    bench = exp.benchmark
    metrics = {
        **summarise(sets, bench.id_name, bench.ood_names, bench.metric),
        "sets": sets,
        "weights": str(weights),
    }
    if args.out:
        atomic_write_json(Path(args.out), metrics)
    print_metrics(metrics, None)
    return 0
