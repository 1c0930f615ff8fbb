"""The ``flyp`` command line. Every subcommand calls the same functions as the Python API."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flyp.recipe import load_recipe

DEFAULT_METHODS = ["zeroshot", "lp", "ft", "lpft", "l2sp", "flyp"]
# The quick comparison (the README's main command) that fits in 15 minutes on 2 CPU cores;
# --full drops these and uses the recipe as written.
QUICK_OVERRIDES = [
    "data.max_train=640",
    "data.max_eval=300",
    "train.epochs=3",
    "eval.wise_alphas=[0, 0.25, 0.5, 0.75, 1.0]",
]


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


def cmd_compare(args: argparse.Namespace) -> int:
    from flyp.compare import compare

    overrides = list(args.set)
    if not args.full:
        overrides = [*QUICK_OVERRIDES, *overrides]
    recipe = load_recipe(args.recipe, overrides)
    out = Path(args.out) if args.out else Path("runs") / f"{recipe.name}-compare"
    results = compare(
        recipe, args.methods, args.seeds, out, wise=not args.no_wise, soups=args.soups
    )
    print((out / "report.md").read_text())
    print(
        f"report: {out / 'report.md'}  figure: {out / 'figure.png'}  ({len(results['methods'])} methods)"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flyp.report import write_report

    dirs = [Path(d) for d in args.run_dirs]
    expanded = [
        r
        for d in dirs
        for r in (
            [d]
            if (d / "metrics.json").exists()
            else sorted(p.parent for p in d.glob("**/metrics.json"))
        )
    ]
    if not expanded:
        print("error: no finished runs (metrics.json) under the given directories", file=sys.stderr)
        return 2
    out = Path(args.out)
    write_report(expanded, out)
    print((out / "report.md").read_text())
    return 0


def cmd_wise(args: argparse.Namespace) -> int:
    import copy

    from flyp.compare import wise_sweep
    from flyp.train import prepare

    run_dir = Path(args.run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml", args.set)
    exp = prepare(recipe)
    alphas = args.alphas or recipe.eval.wise_alphas
    result = wise_sweep(exp, run_dir, alphas, copy.deepcopy(exp.bundle.model.state_dict()))
    for p in result["points"]:
        print(
            f"alpha {p['alpha']:.2f}  val {100 * p['val']:.1f}  ID {100 * p['id']:.1f}  OOD mean {100 * p['ood_mean']:.1f}"
        )
    print(f"best alpha on ID validation: {result['best_alpha']}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Build a recipe's benchmark and show what a run would see: classes, splits, counts."""
    from collections import Counter

    from flyp.data import build_benchmark

    recipe = load_recipe(args.recipe, args.set)
    bench = build_benchmark(recipe.data)
    print(
        f"benchmark {bench.name}: {len(bench.class_names)} classes, {len(bench.templates)} templates, "
        f"metric {bench.metric}; ID {bench.id_name}, OOD {', '.join(bench.ood_names) or 'none'}"
    )
    sets = {"train": bench.train, **bench.eval_sets()}
    width = max(len(c) for c in bench.class_names)
    print(f"{'class':<{width}}" + "".join(f"{name:>14}" for name in sets))
    counts = {name: Counter(s.label for s in samples) for name, samples in sets.items()}
    for label, cls in enumerate(bench.class_names):
        print(f"{cls:<{width}}" + "".join(f"{counts[name][label]:>14}" for name in sets))
    print(f"{'total':<{width}}" + "".join(f"{len(samples):>14}" for samples in sets.values()))
    if bench.skipped_images:
        print(f"{bench.skipped_images} unreadable images left out (data.on_bad_image=skip)")
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
    p = sub.add_parser(
        "compare", help="run several methods on the same splits and seeds, then report"
    )
    p.add_argument("recipe")
    p.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help=f"default: {' '.join(DEFAULT_METHODS)}",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="output folder (default runs/<recipe>-compare)")
    p.add_argument(
        "--full",
        action="store_true",
        help="all the data and the recipe's epochs (no quick settings)",
    )
    p.add_argument("--no-wise", action="store_true", help="skip the WiSE-FT sweeps")
    p.add_argument(
        "--soups", action="store_true", help="also uniform and greedy soups over the seeds"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("data", help="check a recipe's data and show its splits and class counts")
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("report", help="rebuild the report from finished run directories")
    p.add_argument("run_dirs", nargs="+", help="run directories, or folders holding them")
    p.add_argument(
        "--out", required=True, help="folder for report.md, results.json, results.csv, figure.png"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("wise", help="WiSE-FT sweep of one finished run")
    p.add_argument("run_dir")
    p.add_argument("--alphas", nargs="+", type=float)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=cmd_wise)
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
