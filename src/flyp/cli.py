"""The ``flyp`` command line. Every subcommand calls the same functions as the Python API."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path

from flyp.recipe import RESUME_SETTABLE, load_recipe

DEFAULT_METHODS = ["zeroshot", "lp", "ft", "lpft", "l2sp", "flyp"]

def _recipe(args: argparse.Namespace):
    """The recipe of a subcommand: RECIPE (or the defaults), pointed at ``--data DIR`` and
    ``--model SPEC`` when given, then the ``--set`` overrides."""
    from flyp.recipe import RecipeError

    data = getattr(args, "data", None)
    if args.recipe is None and data is None:
        raise RecipeError(f"flyp {args.command} needs a RECIPE or --data DIR (a folder of images)")
    overrides = []
    if data is not None:
        from flyp.data.own import data_overrides

        overrides = data_overrides(data, args.id_domain, args.ood_domains)
        if args.recipe is not None:  # the recipe keeps its own name
            overrides = [o for o in overrides if not o.startswith("name=")]
    elif args.id_domain or args.ood_domains:
        raise RecipeError("--id-domain and --ood-domains go with --data DIR; in a recipe, set data.id_domain / data.ood_domains")
    if getattr(args, "model", None):
        overrides.append(f"model.spec={json.dumps(args.model)}")
    return load_recipe(args.recipe, [*overrides, *args.set])


def _on_device(exp):
    """The experiment's model on the recipe's device (train.device), as a training run has it."""
    from flyp.distributed import pick_device

    exp.bundle.model.to(pick_device(exp.recipe.train.device))
    return exp


def _default_run_dir(recipe_name: str, method: str, seed: int) -> Path:
    return Path("runs") / f"{recipe_name}-{method}-s{seed}"


# Keys a resumed run may change: where the data lives, how fast and on which device it runs,
# how often it checkpoints. Anything else would make the rest of the run a different run.
def _run_recipe_path(run_dir: Path, what: str) -> Path:
    """``run_dir``/recipe.yaml, or a one-line error saying what the folder is not."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist; pass {what}")
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no recipe.yaml, so it is not a flyp run; pass {what}"
        )
    return path


def _out_folder(out: str | None) -> Path | None:
    """An --out folder; a file of that name is refused before anything runs."""
    if out is None:
        return None
    if Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"--out {out} is a file; pass a folder (new or empty)")
    return Path(out)


def resume_recipe(run_dir: Path, overrides: list[str]):
    """The recipe of a killed run, with the ``--set`` overrides that leave the run the same run
    applied; one that would change it (train.lr, data.max_train, ...) is refused by name."""
    from flyp.recipe import RecipeError, changes, flat

    path = _run_recipe_path(run_dir, "the run directory of a killed run")
    saved = load_recipe(path, ["train.stop_after_steps="])
    recipe = load_recipe(path, ["train.stop_after_steps=", *overrides])
    changed, refused = changes(saved, recipe)
    if refused:
        key = refused[0]
        before, after = flat(saved.to_dict()), flat(recipe.to_dict())
        raise RecipeError(
            f"--resume {run_dir} cannot change {key} ({before.get(key)!r} -> {after[key]!r}): "
            f"the rest of the run would differ from its start; start a new run with --out, "
            f"or change only {', '.join(RESUME_SETTABLE)}"
        )
    return recipe, changed


def cmd_finetune(args: argparse.Namespace) -> int:
    from flyp.recipe import RecipeError, save_recipe
    from flyp.train import finetune

    if args.resume:
        if args.recipe or args.out or args.data:
            raise RecipeError(
                "--resume continues a run with its own recipe.yaml in its own folder; "
                "drop the RECIPE and --out arguments (or drop --resume to start a new run)"
            )
        run_dir = Path(args.resume)
        recipe, changed = resume_recipe(run_dir, args.set)
        if changed and (run_dir / "state.pt").exists():
            save_recipe(recipe, run_dir / "recipe.yaml")  # the applied overrides are kept
    else:
        recipe = _recipe(args)
        run_dir = _out_folder(args.out) or _default_run_dir(
            recipe.name, recipe.train.method, recipe.train.seed
        )
    metrics = finetune(recipe, run_dir, resume=bool(args.resume))
    _print_metrics(metrics, run_dir)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flyp.checkpoint import atomic_write_json, load_weights
    from flyp.evaluate import summarise
    from flyp.methods import LossContext, build_classifier, get_method
    from flyp.recipe import RecipeError
    from flyp.train import evaluate_classifier, prepare

    target = Path(args.target)
    if not target.exists():
        raise FileNotFoundError(
            f"{target} does not exist; pass a run directory or a .safetensors file"
        )
    if target.is_dir():
        recipe_path = (
            Path(args.recipe)
            if args.recipe
            else _run_recipe_path(target, "a run directory or a .safetensors file")
        )
        weights = target / "model.safetensors"
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
    recipe = load_recipe(recipe_path, args.set)
    exp = _on_device(prepare(recipe))
    method = get_method(recipe.train.method)
    ctx = LossContext(exp.bundle.tokenizer, exp.benchmark.class_names, exp.benchmark.templates)
    classifier = build_classifier(method, exp.bundle.model, ctx)
    load_weights(classifier, weights)
    sets = evaluate_classifier(classifier, exp)
    bench = exp.benchmark
    metrics = {
        **summarise(sets, bench.id_name, bench.ood_names, bench.metric),
        "sets": sets,
        "weights": str(weights),
    }
    if args.out:
        atomic_write_json(Path(args.out), metrics)
    _print_metrics(metrics, None)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from flyp.compare import compare
    from flyp.methods import get_method
    from flyp.recipe import RecipeError
    from flyp.sweep import parse_grid, sweep_methods, write_sweeps

    for name in args.methods:
        get_method(name)  # a typo fails before the first method trains
    for flag, values in (("--methods", args.methods), ("--seeds", args.seeds)):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise RecipeError(f"{flag} lists {twice[0]} twice; list each once")
    grid = parse_grid(args.sweep, "--sweep") if args.sweep is not None else None
    recipe = _recipe(args)  # as written: the demo's quick settings live in recipes/pacs_demo.yaml
    out = _out_folder(args.out) or Path("runs") / f"{recipe.name}-compare"
    sweeps = sweep_methods(recipe, args.methods, args.seeds, grid, out) if grid else {}
    results = compare(
        recipe,
        args.methods,
        args.seeds,
        out,
        wise=not args.no_wise,
        soups=args.soups,
        stock=args.stock,
        method_overrides={m: r["chosen"]["overrides"] for m, r in sweeps.items()},
    )
    if sweeps:
        write_sweeps(sweeps, out)
    print((out / "report.md").read_text())
    print(
        f"report: {out / 'report.md'}  figure: {out / 'figure.png'}  ({len(results['methods'])} methods)"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from flyp.sweep import parse_grid, sweep

    grid = parse_grid(args.grid)
    recipe = _recipe(args)
    out = _out_folder(args.out) or Path("runs") / f"{recipe.name}-{recipe.train.method}-sweep"
    result = sweep(recipe, grid, out)
    print((out / "sweep.md").read_text())
    chosen = " ".join(result["chosen"]["overrides"])
    print(f"chosen on ID validation: {chosen}  (sweep: {out / 'sweep.json'})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flyp.report import ReportError, write_report

    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(
                f"{d} does not exist; pass run directories or folders holding them"
            )
    expanded = [
        r
        for d in dirs
        for r in (
            [d]
            if (d / "metrics.json").exists()
            else sorted(
                p.parent
                for p in d.glob("**/metrics.json")
                # a sweep's runs are candidates, not the comparison's seeds
                if not any((q / "sweep.json").exists() for q in p.parents if d in q.parents)
            )
        )
    ]
    if not expanded:
        raise ReportError(
            f"no finished runs (metrics.json) under {', '.join(map(str, dirs))}; "
            "finish or resume them with flyp finetune --resume RUN_DIR"
        )
    out = _out_folder(args.out)
    write_report(expanded, out)
    print((out / "report.md").read_text())
    return 0


def cmd_wise(args: argparse.Namespace) -> int:
    import copy

    from flyp.compare import wise_sweep
    from flyp.recipe import RecipeError
    from flyp.train import prepare

    run_dir = Path(args.run_dir)
    recipe = load_recipe(_run_recipe_path(run_dir, "a finished run directory"), args.set)
    if not (run_dir / "metrics.json").is_file():
        raise FileNotFoundError(
            f"{run_dir} has no metrics.json: is the run finished? "
            f"(resume it with flyp finetune --resume {run_dir})"
        )
    alphas = args.alphas or recipe.eval.wise_alphas
    bad = [a for a in alphas if not 0 <= a <= 1]
    if bad:
        raise RecipeError(f"--alphas: {bad[0]} is out of range; each alpha must be in [0, 1]")
    exp = prepare(recipe)
    pretrained = copy.deepcopy(exp.bundle.model.state_dict())
    result = wise_sweep(_on_device(exp), run_dir, alphas, pretrained)
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

    recipe = _recipe(args)
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
    if bench.image_check is not None:
        print(bench.image_check.summary())
    if bench.skipped_images:
        print(f"{bench.skipped_images} unreadable images left out (data.on_bad_image=skip)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flyp.export import export_run

    out = export_run(Path(args.run_dir), args.format, Path(args.out))
    print(f"exported {args.run_dir} as {args.format} to {out} (how to load it: {out / 'README.md'})")
    return 0


def _lines(path: str, what: str) -> list[str]:
    """The non-empty lines of a text file (class names, templates), or a one-line error."""
    from flyp.data.folders import DataError

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} does not exist; write one entry per line")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{what} {file} is empty; write one entry per line")
    return lines


def cmd_predict(args: argparse.Namespace) -> int:
    from flyp.checkpoint import atomic_write_text
    from flyp.data.folders import DataError
    from flyp.distributed import pick_device
    from flyp.predict import collect_images, load_classifier, predict_files, predictions_csv
    from flyp.recipe import RecipeError

    if args.classes and args.classes_file:
        raise RecipeError("give --classes or --classes-file, not both")
    if args.top_k < 1 or args.batch_size < 1:
        raise RecipeError("--top-k and --batch-size must be at least 1")
    names = args.classes.split(",") if args.classes else None
    if args.classes_file:
        names = _lines(args.classes_file, "--classes-file")
    templates = _lines(args.templates_file, "--templates-file") if args.templates_file else None
    if templates and names is None:
        raise RecipeError(
            "--templates-file goes with --classes or --classes-file (the new class names)"
        )
    out = Path(args.out) if args.out else None
    if out is not None and out.is_dir():
        raise FileExistsError(f"--out {out} is a folder; pass a CSV file name")
    paths, skipped = collect_images(args.images)
    clf = load_classifier(args.target, device=pick_device(args.device))
    if names is not None:
        try:
            clf = clf.with_classes(names, templates)
        except ValueError as err:
            raise DataError(f"--classes/--templates-file: {err}") from None
    result = predict_files(clf, paths, top_k=args.top_k, batch_size=args.batch_size)
    skipped += result.skipped
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not result.paths:
        raise DataError(
            f"no image could be classified ({len(skipped)} skipped, listed above); "
            "pass image files, folders of images, or a CSV with a 'path' column"
        )
    width = min(60, max(len(p) for p in result.paths))
    print(f"{'path':<{width}}  {'top-1':<20}{'prob':>7}  top-{args.top_k}")
    for path, top in zip(result.paths, result.top, strict=True):
        rest = ", ".join(f"{c} {p:.3f}" for c, p in top)
        print(f"{path:<{width}}  {top[0][0]:<20}{top[0][1]:>7.3f}  {rest}")
    print(
        f"{len(result.paths)} images classified, {len(skipped)} skipped "
        f"({clf.head} head, {len(clf.class_names)} classes)"
    )
    if out is not None:
        atomic_write_text(out, predictions_csv(result))
        print(f"predictions: {out}")
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
            f"ID ({metrics['id_name']}) {100 * metrics['id']:.1f}   "
            f"OOD mean {100 * metrics['ood_mean']:.1f}   ({metrics.get('metric', 'accuracy')})"
        )
    if run_dir is not None:
        print(f"run directory: {run_dir}")


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other flyp error."""

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        metavar="DIR",
        help="your own images: DIR/<class>/<image> (split into train/val/test) or "
        "DIR/<domain>/<class>/<image> (one domain trained on, the others OOD test sets)",
    )
    p.add_argument("--id-domain", help="with --data: the domain to train on")
    p.add_argument("--ood-domains", nargs="+", help="with --data: the OOD test domains (default: the others)")
    p.add_argument("--model", metavar="SPEC", help="model spec (model.spec): default, open_clip:..., hf:DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flyp", description="Finetune CLIP-like models like they were pretrained."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("finetune", help="train one method of a recipe and evaluate it")
    p.add_argument("recipe", nargs="?", help="recipe YAML (see recipes/); or use --data")
    _add_data_options(p)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. train.lr=1e-5",
    )
    p.add_argument("--out", help="run directory (default runs/<recipe>-<method>-s<seed>)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed run from its last checkpoint; --set may then change only "
        + ", ".join(RESUME_SETTABLE),
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
    p.add_argument("recipe", nargs="?", help="recipe YAML, run as written; or use --data")
    _add_data_options(p)
    p.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help=f"default: {' '.join(DEFAULT_METHODS)}",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="output folder (default runs/<recipe>-compare)")
    p.add_argument("--no-wise", action="store_true", help="skip the WiSE-FT sweeps")
    p.add_argument(
        "--soups", action="store_true", help="also uniform and greedy soups over the seeds"
    )
    p.add_argument(
        "--stock",
        action="store_true",
        help="also the Model Stock merge of each method's seeds (needs two or more seeds)",
    )
    p.add_argument(
        "--sweep",
        action="append",
        metavar="KEY=V1,V2",
        help="give each method that trains its own best setting: sweep these train.* values on "
        "the first seed (chosen on ID validation), then run every seed with it; repeatable",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "sweep",
        help="train every combination of a grid; choose on ID validation (never a test set)",
        description="Each combination is a run directory under --out; finished ones are reused "
        "and killed ones resumed, so rerunning the same command continues a sweep. A grid may "
        "vary train.* keys other than train.seed and train.method.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML; or use --data")
    _add_data_options(p)
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values of one key, e.g. train.lr=1e-5,3e-5,1e-4; repeat for more keys",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", help="output folder (default runs/<recipe>-<method>-sweep)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("data", help="check a recipe's data and show its splits and class counts")
    p.add_argument("recipe", nargs="?", help="recipe YAML; or use --data")
    _add_data_options(p)
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

    p = sub.add_parser(
        "export",
        help="write a finished run as an open_clip checkpoint, a Hugging Face folder or flyp's own format",
    )
    p.add_argument("run_dir")
    p.add_argument("--format", required=True, help="open_clip, hf or flyp (docs/export.md)")
    p.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "predict",
        help="classify images with a finished run (its own classes, or new ones zero-shot)",
        description="Top-k classes and probabilities per image, in batches. Files that cannot "
        "be read are listed on stderr and skipped; the exit status is 2 only when no image "
        "could be classified.",
    )
    p.add_argument("target", help="run directory, or its model.safetensors (self-describing)")
    p.add_argument(
        "images",
        nargs="+",
        help="image files, folders (searched recursively), or a CSV with a 'path' column",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image (default 5)")
    p.add_argument(
        "--out",
        help="also write a CSV with one row per image and rank: path,rank,class,probability "
        "(rank 1 is the top-1 class)",
    )
    p.add_argument(
        "--classes",
        help='new class names, comma-separated ("cat,dog"): zero-shot with the run\'s text tower',
    )
    p.add_argument("--classes-file", help="new class names, one per line")
    p.add_argument(
        "--templates-file",
        help="prompt templates for the new classes, one per line with {} for the name "
        "(default: the run's own)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, ...")
    p.set_defaults(func=cmd_predict)
    return parser


def _one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Bad input (a recipe, data, model, checkpoint, run directory or path
    of the user's) ends with one line on stderr and exit status 2; anything else is a bug and
    keeps its traceback."""
    from flyp.checkpoint import CheckpointError
    from flyp.data.folders import DataError
    from flyp.models.base import ModelSpecError
    from flyp.recipe import RecipeError
    from flyp.report import ReportError
    from flyp.train import RunError

    args = build_parser().parse_args(argv)
    if args.command == "finetune" and not (args.recipe or args.resume or args.data):
        print("error: flyp finetune needs a RECIPE, --data DIR or --resume RUN_DIR", file=sys.stderr)
        return 2
    expected = (
        RecipeError,
        DataError,
        ModelSpecError,
        RunError,
        CheckpointError,
        ReportError,
        FileNotFoundError,
        FileExistsError,
        PermissionError,
    )
    try:
        return args.func(args)
    except expected as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {err.filename}" if err.filename else ""
        print(
            f"error: no space left on device{where}; free space or choose another --out",
            file=sys.stderr,
        )
        return 2
