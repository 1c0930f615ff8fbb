"""The ``flyp`` command line. Every subcommand calls the same functions as the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flyp.recipe import load_recipe


def _default_run_dir(recipe_name: str, method: str, seed: int) -> Path:
    return Path("runs") / f"{recipe_name}-{method}-s{seed}"


def cmd_finetune(args: argparse.Namespace) -> int:
    from flyp.train import finetune

    if args.resume:
        run_dir = Path(args.resume)
        recipe = load_recipe(run_dir / "recipe.yaml", ["train.stop_after_steps=", *args.set])
    else:
        recipe = load_recipe(args.recipe, args.set)
        run_dir = (
            Path(args.out)
            if args.out
            else _default_run_dir(recipe.name, recipe.train.method, recipe.train.seed)
        )
    metrics = finetune(recipe, run_dir, resume=bool(args.resume))
    _print_metrics(metrics, run_dir)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flyp.checkpoint import atomic_write_json, load_weights
    from flyp.evaluate import summarise
    from flyp.methods import LossContext, build_classifier, get_method
    from flyp.train import evaluate_classifier, prepare

    target = Path(args.target)
    recipe_path = args.recipe or (target / "recipe.yaml" if target.is_dir() else None)
    if recipe_path is None:
        print(
            "error: evaluating a checkpoint file needs --recipe (the recipe it was trained with)",
            file=sys.stderr,
        )
        return 2
    recipe = load_recipe(recipe_path, args.set)
    exp = prepare(recipe)
    method = get_method(recipe.train.method)
    ctx = LossContext(exp.bundle.tokenizer, exp.benchmark.class_names, exp.benchmark.templates)
    classifier = build_classifier(method, exp.bundle.model, ctx)
    weights = target / "model.safetensors" if target.is_dir() else target
    load_weights(classifier, weights)
    sets = evaluate_classifier(classifier, exp)
    metrics = {
        **summarise(sets, exp.benchmark.id_name, exp.benchmark.ood_names),
        "sets": sets,
        "weights": str(weights),
    }
    if args.out:
        atomic_write_json(Path(args.out), metrics)
    _print_metrics(metrics, None)
    return 0


def _print_metrics(metrics: dict, run_dir: Path | None) -> None:
    if "sets" not in metrics:
        print(json.dumps(metrics))
        return
    print(f"{'set':<16}{'accuracy':>10}{'macro-F1':>10}{'worst cls':>10}{'n':>7}")
    for name, m in metrics["sets"].items():
        print(
            f"{name:<16}{100 * m['accuracy']:>10.1f}{100 * m['macro_f1']:>10.1f}{100 * m['worst_class_accuracy']:>10.1f}{m['n']:>7}"
        )
    if metrics.get("ood_mean") is not None:
        print(
            f"ID ({metrics['id_name']}) {100 * metrics['id']:.1f}   OOD mean {100 * metrics['ood_mean']:.1f}"
        )
    if run_dir is not None:
        print(f"run directory: {run_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flyp", description="Finetune CLIP-like models like they were pretrained."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("finetune", help="train one method of a recipe and evaluate it")
    p.add_argument("recipe", nargs="?", help="recipe YAML (see recipes/)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. train.lr=1e-5",
    )
    p.add_argument("--out", help="run directory (default runs/<recipe>-<method>-s<seed>)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint"
    )
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="evaluate a run directory or a weights file")
    p.add_argument("target", help="run directory, or a .safetensors file (with --recipe)")
    p.add_argument(
        "--recipe", help="recipe the weights were trained with (default: RUN_DIR/recipe.yaml)"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from flyp.data.folders import DataError
    from flyp.models.base import ModelSpecError
    from flyp.recipe import RecipeError
    from flyp.train import RunError

    args = build_parser().parse_args(argv)
    if args.command == "finetune" and not args.recipe and not args.resume:
        print("error: flyp finetune needs a RECIPE (or --resume RUN_DIR)", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (RecipeError, DataError, ModelSpecError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
