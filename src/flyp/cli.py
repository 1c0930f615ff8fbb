"""The ``flyp`` command line. Every subcommand calls the same functions as the Python API."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from flyp.recipe import RESUME_SETTABLE, load_recipe

DEFAULT_METHODS = ["zeroshot", "lp", "ft", "lpft", "l2sp", "flyp"]
# --quick: a comparison of a small dataset in about 10 minutes on 2 CPU cores with the default
# model (README: Sizing a run on your own data); any --set of these keys wins
QUICK = [
    "model.image_size=128",
    "train.epochs=3",
    "data.max_train=1000",
    "data.max_eval=300",
    "eval.wise_alphas=[0, 0.5, 1]",
]

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

        overrides = data_overrides(data, args.id_domain, args.ood_domains, args.set)
        if args.recipe is not None:  # the recipe keeps its own name
            overrides = [o for o in overrides if not o.startswith("name=")]
    elif args.id_domain or args.ood_domains:
        raise RecipeError("--id-domain and --ood-domains go with --data DIR; in a recipe, set data.id_domain / data.ood_domains")
    if getattr(args, "model", None):
        overrides.append(f"model.spec={json.dumps(args.model)}")
    if getattr(args, "quick", False):  # before --set: a --set of the same key wins
        overrides += QUICK
    recipe = load_recipe(args.recipe, [*overrides, *args.set])
    if data is not None and args.recipe is None and args.command != "data":
        from flyp.tracking import say

        say(_data_choices(recipe, wise=args.command == "compare" and not args.no_wise))
    return recipe


def _data_choices(recipe, wise: bool = False) -> str:
    """What ``--data`` without a recipe runs with (the recipe defaults, after any --set), next
    to what the shipped PACS recipes use, and how to change it: one line. The WiSE-FT alphas
    are named only where WiSE-FT runs (``wise``: compare without --no-wise)."""
    templates = (
        f"template set {recipe.data.templates}"
        if recipe.data.templates
        else "1 prompt template ('a photo of a {}.')"
    )
    from flyp.data.templates import fitting_set

    size, epochs = recipe.model.image_size or "the model's own", recipe.train.epochs
    alphas = f", {len(recipe.eval.wise_alphas)} WiSE-FT alphas" if wise else ""
    fitting = fitting_set(recipe.name, Path(str(recipe.data.root or "")).name)
    return (
        f"--data without a recipe: image size {size}, precision {recipe.train.precision} "
        f"(eval {recipe.eval.precision}), {templates}, {epochs} epoch{'s' * (epochs != 1)}, lr "
        f"{recipe.train.lr:g}{alphas} (recipes/pacs.yaml: "
        "160 px, 7 templates); change any with --set, e.g. --set model.image_size=160 "
        f"--set data.templates={fitting}, or pass a recipe; --quick sizes a run for a small "
        "dataset (README: Sizing a run on your own data)"
    )


def _on_device(exp):
    """The experiment's model on the recipe's device (train.device), as a training run has it:
    the device's settings made, and the evaluation's precision said (flyp.precision)."""
    from flyp.distributed import pick_device
    from flyp.precision import announce, configure_device, resolve

    device = pick_device(exp.recipe.train.device)
    exp.bundle.model.to(device)
    configure_device(device)
    announce(None, resolve(exp.recipe.eval.precision, device))
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


def _out_folder(out: str | None, inputs=(), writes=(), data=()) -> Path | None:
    """An --out folder, checked before anything runs (flyp.outputs.check_output): not a file,
    not an input, not a run's own file or a run directory, not in a data folder."""
    from flyp.outputs import check_output

    if out is None:
        return None
    return check_output(out, inputs, folder=True, writes=writes, data=data)


def _data_folders(recipe) -> list[str]:
    """The data folders a recipe reads (flyp.outputs.data_folders): no output may go in them."""
    from flyp.outputs import data_folders

    return data_folders(recipe)


def _run_data_folders(run_dir: Path) -> list[str]:
    """The data folders of the run in ``run_dir`` (none when its recipe.yaml does not load: the
    verb reading the run says why)."""
    from flyp.recipe import RecipeError

    try:
        return _data_folders(load_recipe(run_dir / "recipe.yaml"))
    except (RecipeError, OSError):
        return []


def _given(args: argparse.Namespace) -> list[str]:
    """The recipe and --data folder a command reads: an --out must not be one of them."""
    return [p for p in (args.recipe, getattr(args, "data", None)) if p]


def _unfinished(run_dir: Path, allowed: bool) -> None:
    """Refuse the weights of an unfinished run, or with --unfinished warn on stderr."""
    from flyp.errors import RunError
    from flyp.outputs import unfinished

    reason = unfinished(run_dir)
    if reason and not allowed:
        raise RunError(
            f"{reason}; finish it with flyp finetune --resume {run_dir}, or pass --unfinished "
            "to use those weights anyway"
        )
    if reason:
        print(f"warning: {reason}; the numbers are not the finished run's", file=sys.stderr)


# What evaluating a finished run (flyp evaluate, flyp wise) may change in its recipe: which OOD
# sets and how many images are evaluated, and how (besides where the data lives, the device and
# speed: RESUME_SETTABLE). Anything else would split, build or load another model than the one
# trained: another data.split_seed or test_fraction tests on images the run trained on.
EVAL_SETTABLE = ("data.ood_domains", "data.max_eval", "data.on_bad_image", "eval.")


def _same_run(run_dir: Path, recipe, verb: str) -> None:
    """Refuse a recipe (its --set / --recipe changes, or a recipe.yaml edited by hand) that
    reads ``run_dir`` as another run: compared with the settings the run stored when it finished
    (its metrics.json), else with its recipe.yaml."""
    from flyp.recipe import RecipeError, recipe_differences, run_settings
    from flyp.rundir import saved_settings

    saved, source = saved_settings(run_dir)
    if saved is None:
        saved = run_settings(load_recipe(run_dir / "recipe.yaml"))
    # where the data lives and what is evaluated may differ; so may the flyp that evaluates and
    # the machine (auto precisions are what the run resolved them to)
    ignore = tuple(k for k in {**saved, **run_settings(recipe)} if k.startswith(EVAL_SETTABLE))
    diff = recipe_differences(saved, recipe, ignore)
    if diff:
        raise RecipeError(
            f"{verb} {run_dir} with other settings than it was trained with ({diff}), as its "
            f"{source.name if source else 'recipe.yaml'} records them: other "
            "splits would score images it trained on, another model or head is not this run; "
            "drop those changes (only data.ood_domains, data.max_eval, eval.* and where the data "
            "lives may differ)"
        )


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


def _is_main() -> bool:
    """Whether this process prints a verb's results: rank 0 under torchrun, or the only one."""
    from flyp.distributed import is_main

    return is_main()


def cmd_finetune(args: argparse.Namespace) -> int:
    from flyp.recipe import RecipeError, save_recipe
    from flyp.train import finetune

    if args.resume:
        if args.quick:
            raise RecipeError(
                "--quick sizes a new run; a resumed run keeps its own settings: drop --quick"
            )
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
        run_dir = _out_folder(
            args.out or _default_run_dir(recipe.name, recipe.train.method, recipe.train.seed),
            _given(args),
            data=_data_folders(recipe),
        )
    try:
        metrics = finetune(recipe, run_dir, resume=bool(args.resume))
    except KeyboardInterrupt:
        raise Interrupted(_kept_run(run_dir)) from None
    if _is_main():  # under torchrun every rank holds rank 0's metrics; one prints them
        _print_metrics(metrics, run_dir)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from flyp.checkpoint import atomic_write_json, load_weights
    from flyp.evaluate import evaluate_classifier, summarise
    from flyp.experiment import prepare
    from flyp.methods import LossContext, build_classifier, get_method
    from flyp.outputs import check_output, not_a_run
    from flyp.recipe import RecipeError, check_device

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
    _unfinished(weights.parent, args.unfinished)
    if args.out:
        check_output(args.out, [target, weights, recipe_path])
    recipe = load_recipe(recipe_path, args.set)
    if target.is_dir():
        _same_run(target, recipe, "evaluating")
    if args.out:
        check_output(args.out, data=_data_folders(recipe))
    check_device(recipe.train.device)
    exp = _on_device(prepare(recipe))
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
    _print_metrics(metrics, None)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from flyp.compare import check_request, compare
    from flyp.methods import get_method
    from flyp.outputs import for_terminal_lines
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
    check_request(recipe, args.methods, args.seeds, args.soups, args.stock)  # before any sweep
    out = _out_folder(
        args.out or Path("runs") / f"{recipe.name}-compare", _given(args), data=_data_folders(recipe)
    )
    try:
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
    except KeyboardInterrupt:
        raise Interrupted(_kept_runs(out, args.argv)) from None
    if not _is_main():  # under torchrun rank 0 prints; every rank has the same results
        return 0
    print(for_terminal_lines((out / "report.md").read_text()))
    print(
        f"report: {out / 'report.md'}  figure: {out / 'figure.png'}  ({len(results['methods'])} methods)"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from flyp.sweep import parse_grid, sweep

    grid = parse_grid(args.grid)
    recipe = _recipe(args)
    out = _out_folder(
        args.out or Path("runs") / f"{recipe.name}-{recipe.train.method}-sweep",
        _given(args),
        data=_data_folders(recipe),
    )
    try:
        result = sweep(recipe, grid, out)
    except KeyboardInterrupt:
        raise Interrupted(_kept_runs(out, args.argv)) from None
    if not _is_main():  # under torchrun rank 0 prints; every rank has the same choice
        return 0
    print((out / "sweep.md").read_text())
    chosen = " ".join(result["chosen"]["overrides"])
    print(f"chosen on ID validation: {chosen}  (sweep: {out / 'sweep.json'})")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from flyp.outputs import for_terminal_lines
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
                # a run's WiSE-FT model (RUN/wise-model) is in the run's own WiSE columns
                and not (p.parent.name == "wise-model" and (p.parent.parent / "wise.json").exists())
            )
        )
    ]
    if not expanded:
        raise ReportError(
            f"no finished runs (metrics.json) under {', '.join(map(str, dirs))}; "
            "finish or resume them with flyp finetune --resume RUN_DIR"
        )
    reads = [r / name for r in expanded for name in ("metrics.json", "wise.json")]
    data = [p for r in expanded for p in _run_data_folders(r)]
    writes = ("results.json", "results.csv", "figure.png", "report.md")
    out = _out_folder(args.out, reads, writes, data)
    write_report(expanded, out)
    print(for_terminal_lines((out / "report.md").read_text()))
    return 0


def cmd_wise(args: argparse.Namespace) -> int:
    import copy

    from flyp.compare import wise_sweep
    from flyp.experiment import prepare
    from flyp.recipe import RecipeError, check_device

    run_dir = Path(args.run_dir)
    recipe = load_recipe(_run_recipe_path(run_dir, "a finished run directory"), args.set)
    if not (run_dir / "metrics.json").is_file():
        raise FileNotFoundError(
            f"{run_dir} has no metrics.json: is the run finished? "
            f"(resume it with flyp finetune --resume {run_dir})"
        )
    _same_run(run_dir, recipe, "a WiSE-FT sweep of")
    alphas = args.alphas or recipe.eval.wise_alphas
    bad = [a for a in alphas if not 0 <= a <= 1]
    if bad:
        raise RecipeError(f"--alphas: {bad[0]} is out of range; each alpha must be in [0, 1]")
    twice = [a for i, a in enumerate(alphas) if a in alphas[:i]]
    if twice:
        raise RecipeError(f"--alphas lists {twice[0]:g} twice; list each once")
    keep = _keep_alpha(args.keep) if args.keep is not None else None
    if keep is None and recipe.eval.wise_keep:
        keep = "best"
    check_device(recipe.train.device)
    exp = prepare(recipe)
    pretrained = copy.deepcopy(exp.bundle.model.state_dict())
    result = wise_sweep(_on_device(exp), run_dir, alphas, pretrained, keep=keep)
    for p in result["points"]:
        print(
            f"alpha {p['alpha']:.2f}  val {100 * p['val']:.1f}  ID {100 * p['id']:.1f}  OOD mean {100 * p['ood_mean']:.1f}"
        )
    print(f"best alpha on ID validation: {result['best_alpha']}")
    if "model" in result:
        print(
            f"model at alpha {result['kept_alpha']:g}: {result['model']} (flyp predict, flyp "
            "evaluate and flyp export take it)"
        )
    else:
        print(f"no model kept; to keep one: flyp wise {run_dir} --keep best (or an alpha)")
    return 0


def _keep_alpha(text: str) -> float | str:
    """--keep: "best" (the alpha chosen on ID validation) or an alpha in [0, 1]."""
    from flyp.recipe import RecipeError

    if text == "best":
        return text
    try:
        alpha = float(text)
    except ValueError:
        alpha = float("nan")
    if not 0 <= alpha <= 1:
        raise RecipeError(f"--keep {text}: give best or an alpha in [0, 1], e.g. --keep 0.5")
    return alpha


def cmd_data(args: argparse.Namespace) -> int:
    """Build a recipe's benchmark and show what a run would see: classes, splits, counts."""
    from collections import Counter

    from flyp.data import build_benchmark
    from flyp.outputs import for_terminal

    recipe = _recipe(args)
    bench = build_benchmark(recipe.data)
    shown = [for_terminal(c) for c in bench.class_names]  # folder names: no control characters
    total = len(bench.class_names)
    ood = [  # a domain covering a subset of the classes is scored on those: said here
        f"{name} ({len(bench.class_subsets[name])} of {total} classes)"
        if name in bench.class_subsets
        else name
        for name in bench.ood_names
    ]
    print(for_terminal(
        f"benchmark {bench.name}: {total} classes, {len(bench.templates)} templates, "
        f"metric {bench.metric}; ID {bench.id_name}, OOD {', '.join(ood) or 'none'}"
    ))
    # a streamed training set is never indexed: no column, one line instead
    sets = ({} if bench.stream else {"train": bench.train}) | bench.eval_sets()
    width = max(len(c) for c in shown)
    print(f"{'class':<{width}}" + "".join(f"{for_terminal(name):>14}" for name in sets))
    counts = {name: Counter(s.label for s in samples) for name, samples in sets.items()}
    for label, cls in enumerate(shown):
        print(f"{cls:<{width}}" + "".join(f"{counts[name][label]:>14}" for name in sets))
    print(f"{'total':<{width}}" + "".join(f"{len(samples):>14}" for samples in sets.values()))
    if bench.stream is not None:
        print(for_terminal(bench.stream.summary()))
    if bench.image_check is not None:
        print(bench.image_check.summary())
    if bench.skipped_images:
        print(f"{bench.skipped_images} unreadable images left out (data.on_bad_image=skip)")
    if bench.skipped_links:
        print(
            f"{len(bench.skipped_links)} links that lead nowhere left out "
            "(data.on_bad_image=skip)"
        )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flyp.export import export_run

    out = export_run(Path(args.run_dir), args.format, Path(args.out))
    print(f"exported {args.run_dir} as {args.format} to {out} (how to load it: {out / 'README.md'})")
    return 0


def _lines(path: str, what: str) -> list[str]:
    """The non-empty lines of a text file (class names, templates), or a one-line error; UTF-8,
    or UTF-16/32 with a byte-order mark (flyp.data.folders.read_text)."""
    from flyp.data.folders import DataError, read_text

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{what} {file} does not exist; write one entry per line")
    lines = [line.strip() for line in read_text(file, what).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise DataError(f"{what} {file} is empty; write one entry per line")
    return lines


def cmd_predict(args: argparse.Namespace) -> int:
    from flyp.checkpoint import atomic_write_text
    from flyp.data.folders import DataError
    from flyp.data.templates import read_templates_file
    from flyp.distributed import pick_device
    from flyp.outputs import check_output, for_terminal
    from flyp.precision import announce_predict
    from flyp.predict import collect_images, load_classifier, predict_files, predictions_csv
    from flyp.recipe import RecipeError, check_device

    if args.classes and args.classes_file:
        raise RecipeError("give --classes or --classes-file, not both")
    if args.top_k < 1 or args.batch_size < 1:
        raise RecipeError("--top-k and --batch-size must be at least 1")
    check_device(args.device, "--device")
    names = args.classes.split(",") if args.classes else None
    if args.classes_file:
        names = _lines(args.classes_file, "--classes-file")
    templates = read_templates_file(args.templates_file) if args.templates_file else None
    if templates and names is None:
        raise RecipeError(
            "--templates-file goes with --classes or --classes-file (the new class names)"
        )
    paths, skipped = collect_images(args.images)
    target = Path(args.target)
    reads = [target, target / "model.safetensors", *args.images, *paths]
    reads += [f for f in (args.classes_file, args.templates_file) if f]
    run_dir = target if target.is_dir() else target.parent
    data = _run_data_folders(run_dir) if (run_dir / "recipe.yaml").is_file() else []
    out = check_output(args.out, reads, data=data) if args.out else None
    if target.exists():
        _unfinished(target if target.is_dir() else target.parent, args.unfinished)
    clf = load_classifier(
        args.target, device=pick_device(args.device), unfinished=True, precision=args.precision
    )
    announce_predict(
        clf.precision, args.precision is not None, clf.metadata.get("eval_precision_used")
    )
    if names is not None:
        try:
            clf = clf.with_classes(names, templates)
        except ValueError as err:
            raise DataError(f"--classes/--templates-file: {err}") from None
    result = predict_files(clf, paths, top_k=args.top_k, batch_size=args.batch_size)
    skipped += result.skipped
    for path, reason in skipped:
        print(f"skipped {for_terminal(path)}: {for_terminal(reason)}", file=sys.stderr)
    if not result.paths:
        raise DataError(
            f"no image could be classified ({len(skipped)} skipped, listed above); "
            "pass image files, folders of images, or a CSV with a 'path' column"
        )
    shown = [for_terminal(p) for p in result.paths]  # names and paths: no control characters
    width = min(60, max(len(p) for p in shown))
    print(f"{'path':<{width}}  {'top-1':<20}{'prob':>7}  top-{args.top_k}")
    for path, top in zip(shown, result.top, strict=True):
        rest = ", ".join(f"{for_terminal(c)} {p:.3f}" for c, p in top)
        print(f"{path:<{width}}  {for_terminal(top[0][0]):<20}{top[0][1]:>7.3f}  {rest}")
    of = f" of its {clf.all_classes}" if clf.subset is not None else ""  # --classes: some of its own
    print(
        f"{len(result.paths)} images classified, {len(skipped)} skipped "
        f"({clf.head} head, {len(clf.class_names)}{of} classes)"
    )
    if out is not None:
        atomic_write_text(out, predictions_csv(result))
        print(f"predictions: {out}")
    return 0


def _print_metrics(metrics: dict, run_dir: Path | None) -> None:
    from flyp.outputs import for_terminal

    if "sets" not in metrics:
        print(json.dumps(metrics))
        return
    print(f"{'set':<16}{'accuracy':>10}{'macro-F1':>10}{'worst cls':>10}{'n':>7}")
    for name, m in metrics["sets"].items():
        name = for_terminal(name)  # domain names are folder names
        print(
            f"{name:<16}{100 * m['accuracy']:>10.1f}{100 * m['macro_f1']:>10.1f}{100 * m['worst_class_accuracy']:>10.1f}{m['n']:>7}"
        )
    for name, m in metrics["sets"].items():
        if m.get("classes") is not None:
            print(
                f"{for_terminal(name)}: scored on the {m['classes']} of {m['of_classes']} "
                "classes it has (the others' logits left out)"
            )
    if metrics.get("ood_mean") is not None:
        print(
            f"ID ({for_terminal(metrics['id_name'])}) {100 * metrics['id']:.1f}   "
            f"OOD mean {100 * metrics['ood_mean']:.1f}   ({metrics.get('metric', 'accuracy')})"
        )
    if run_dir is not None:
        print(f"run directory: {run_dir}")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with every option's default: "(default: X)" after the help text, unless
    the text already says it; a default of None (nothing given) must be said in the text, since
    only it knows what nothing means ("runs/<recipe>-compare", "the recipe's model")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default:" in text or action.required or action.default in (None, argparse.SUPPRESS):
            return text
        default = action.default
        if isinstance(default, bool):
            shown = "on" if default else "off"
        elif isinstance(default, (list, tuple)):
            shown = " ".join(map(str, default)) or "none"
        else:
            shown = str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other flyp error, and every
    option's default in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        metavar="DIR",
        help="your own images: DIR/<class>/<image> (split into train/val/test) or "
        "DIR/<domain>/<class>/<image> (one domain trained on, the others OOD test sets), a "
        "Hugging Face dataset (a save_to_disk folder or Parquet files: its splits are the "
        "domains) or WebDataset .tar shards (a folder, a shard or a brace pattern: the name "
        "before a shard's number is its domain); "
        "without a RECIPE, the recipe defaults apply and flyp says which it chose "
        "(default: the recipe's data)",
    )
    p.add_argument(
        "--id-domain",
        help="with --data: the domain to train on (default: the only domain; needed when DIR "
        "holds several)",
    )
    p.add_argument(
        "--ood-domains",
        nargs="+",
        help="with --data: the OOD test domains (default: the other domains)",
    )
    p.add_argument(
        "--model",
        metavar="SPEC",
        help="model spec (model.spec): default, open_clip:..., hf:DIR (default: the recipe's "
        "model.spec)",
    )


def _add_quick_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="size the run for a quick look: " + ", ".join(QUICK) + " (a --set of these keys "
        "wins; README: Sizing a run on your own data) (default: the recipe's settings)",
    )


def _add_set_option(p: argparse.ArgumentParser, example: str = "train.lr=1e-5") -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a recipe key, e.g. {example}; repeatable (keys: src/flyp/recipe.py)",
    )


def _version() -> str:
    """The installed package's version (read from its metadata: no import of flyp's modules)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flyp")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flyp", description="Finetune CLIP-like models like they were pretrained."
    )
    parser.add_argument("--version", action="version", version=f"flyp {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("finetune", help="train one method of a recipe and evaluate it")
    p.add_argument(
        "recipe", nargs="?", help="recipe YAML (see recipes/) (default: none; use --data)"
    )
    _add_data_options(p)
    _add_quick_option(p)
    _add_set_option(p)
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<method>-s<seed>)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed run from its last checkpoint; --set may then change only "
        + ", ".join(RESUME_SETTABLE)
        + " (default: start a new run)",
    )
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("evaluate", help="evaluate a run directory or a weights file")
    p.add_argument("target", help="run directory, or a .safetensors file (with --recipe)")
    p.add_argument(
        "--recipe", help="recipe the weights were trained with (default: RUN_DIR/recipe.yaml)"
    )
    _add_set_option(p, "eval.batch_size=64")
    p.add_argument("--out", help="also write the metrics to this JSON file (default: print only)")
    p.add_argument(
        "--unfinished",
        action="store_true",
        help="evaluate a killed or running run's best weights so far (warns)",
    )
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser(
        "compare", help="run several methods on the same splits and seeds, then report"
    )
    p.add_argument(
        "recipe", nargs="?", help="recipe YAML, run as written (default: none; use --data)"
    )
    _add_data_options(p)
    p.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="the methods to compare (README: Methods)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="training seeds; each method per seed"
    )
    _add_quick_option(p)
    _add_set_option(p)
    p.add_argument("--out", help="output folder (default: runs/<recipe>-compare)")
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
        "the first seed (chosen on ID validation), then run every seed with it; repeatable "
        "(default: no sweep, the recipe's values)",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "sweep",
        help="train every combination of a grid; choose on ID validation (never a test set)",
        description="Each combination is a run directory under --out; finished ones are reused "
        "and killed ones resumed, so rerunning the same command continues a sweep. A grid may "
        "vary train.* keys other than train.seed and train.method.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML (default: none; use --data)")
    _add_data_options(p)
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values of one key, e.g. train.lr=1e-5,3e-5,1e-4; repeat for more keys",
    )
    _add_quick_option(p)
    _add_set_option(p)
    p.add_argument("--out", help="output folder (default: runs/<recipe>-<method>-sweep)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("data", help="check a recipe's data and show its splits and class counts")
    p.add_argument("recipe", nargs="?", help="recipe YAML (default: none; use --data)")
    _add_data_options(p)
    _add_set_option(p, "data.max_train=100")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("report", help="rebuild the report from finished run directories")
    p.add_argument("run_dirs", nargs="+", help="run directories, or folders holding them")
    p.add_argument(
        "--out", required=True, help="folder for report.md, results.json, results.csv, figure.png"
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "wise",
        help="WiSE-FT sweep of one finished run; --keep writes the model at an alpha as "
        "RUN_DIR/wise-model (predict, evaluate and export take it)",
    )
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument(
        "--keep",
        metavar="ALPHA",
        help="write the model at this alpha, or at the one chosen on ID validation (best), as "
        "RUN_DIR/wise-model; the sweep's points already in wise.json are not evaluated again "
        "(default: no model, unless the recipe sets eval.wise_keep: best)",
    )
    p.add_argument(
        "--alphas",
        nargs="+",
        type=float,
        help="mixing weights in [0, 1]: 0 is the zero-shot model, 1 the finetuned one "
        "(default: the recipe's eval.wise_alphas)",
    )
    _add_set_option(p, "eval.batch_size=64")
    p.set_defaults(func=cmd_wise)

    p = sub.add_parser(
        "export",
        help="write a finished run as an open_clip checkpoint, a Hugging Face folder or flyp's own format",
    )
    p.add_argument("run_dir", help="a finished run directory")
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
    p.add_argument("--top-k", type=int, default=5, help="classes shown per image")
    p.add_argument(
        "--out",
        help="also write a CSV with one row per image and rank: path,rank,class,probability; "
        "rank 1 is the top-1 class (default: print only)",
    )
    p.add_argument(
        "--classes",
        help='new class names, comma-separated ("cat,dog"): zero-shot with the run\'s text tower '
        "(default: the run's own classes)",
    )
    p.add_argument(
        "--classes-file", help="new class names, one per line (default: the run's own classes)"
    )
    p.add_argument(
        "--templates-file",
        help="prompt templates for the new classes, one per line with {} for the name "
        "(default: the run's own)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, ...")
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help="precision of the image tower (default: the run's eval.precision, resolved here as "
        "its evaluation resolved it: auto is bf16 where the hardware has it natively)",
    )
    p.add_argument(
        "--unfinished",
        action="store_true",
        help="classify with a killed or running run's best weights so far (warns)",
    )
    p.set_defaults(func=cmd_predict)
    return parser


def _one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


class Interrupted(Exception):
    """Ctrl-C, with what a verb kept and the command that continues it (the message)."""


def _command(argv: list[str]) -> str:
    """The command line a user typed, quoted so that it can be pasted back."""
    import shlex

    return shlex.join(["flyp", *argv])


def _checkpoint_step(state_path: Path) -> int | None:
    """The step of a run's last checkpoint, or None if its state cannot be read."""
    from flyp.checkpoint import load_state

    try:
        return int(load_state(state_path)["step"])
    except Exception:  # a message about an interrupted run must not fail on a bad state file
        return None


def _kept_run(run_dir: Path) -> str:
    """What an interrupted ``flyp finetune`` kept, and how to go on."""
    import shlex

    state = run_dir / "state.pt"
    if (run_dir / "metrics.json").is_file():
        return f"the run had finished: its results are in {run_dir / 'metrics.json'}"
    if not state.is_file():
        return "nothing was kept (no checkpoint yet); start it again with the same command"
    step = _checkpoint_step(state)
    at = f" (step {step})" if step is not None else ""
    resume = _command(["finetune", "--resume", str(run_dir)])
    return f"kept {shlex.quote(str(run_dir))} at its last checkpoint{at}; resume with: {resume}"


def _kept_runs(out: Path, argv: list[str]) -> str:
    """What an interrupted ``flyp compare`` or ``flyp sweep`` kept under ``out``, and how to go
    on: rerunning the same command reuses finished runs and resumes killed ones."""
    finished = sorted(p.parent.name for p in out.glob("**/metrics.json"))
    partial = sorted(p.parent.name for p in out.glob("**/state.pt"))
    kept = f"kept {len(finished)} finished run{'s' * (len(finished) != 1)} in {out}"
    if partial:
        their = "its last checkpoint" if len(partial) == 1 else "their last checkpoints"
        kept += f" and {', '.join(partial)} at {their}"
    return f"{kept}; continue with the same command: {_command(argv)}"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand (the ``flyp`` entry point).

    Bad input (a recipe, data, model, checkpoint, run directory or path of the user's) ends with
    one line on stderr and exit status 2; Ctrl-C with one line saying what was kept and how to
    continue, status 130; output cut short by its reader (``flyp data ... | head``) quietly,
    status 141 (128 + SIGPIPE, as a shell reports it). Anything else is a bug and keeps its
    traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        with _sigterm_as_interrupt():
            try:
                return _main(argv)
            except Interrupted as err:
                print(f"interrupted: {_stopped_by(err)}{err}", file=sys.stderr)
                return _interrupted_status(err)
            except KeyboardInterrupt as err:
                print(
                    f"interrupted: {_stopped_by(err)}nothing half-written was left",
                    file=sys.stderr,
                )
                return _interrupted_status(err)
            finally:
                sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
    except BrokenPipeError:
        # The reader went away (head, less): the Python docs' recipe. Point stdout at devnull
        # so that the interpreter's own flush at exit finds nothing to complain about.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's stop, torchrun ending its workers): handled as
    Ctrl-C is, so it leaves the same files and says the same things, with exit status 143."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` while a verb runs (the main thread only: Python runs
    signal handlers there); the previous handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _was_terminated(err: BaseException) -> bool:
    return isinstance(err, Terminated) or isinstance(err.__context__, Terminated)


def _stopped_by(err: BaseException) -> str:
    """What stopped the verb, where the message does not say it already."""
    if _was_terminated(err):
        return "stopped by SIGTERM; "
    return "" if isinstance(err, Interrupted) else "stopped by Ctrl-C; "


def _interrupted_status(err: BaseException) -> int:
    return 143 if _was_terminated(err) else 130  # 128 + the signal, as a shell reports it


# What the machine answered, in words a user can act on (an OSError's errno).
_MACHINE_ANSWERS = {
    errno.ENOSPC: "no space left on the device; free space or choose another --out",
    errno.EDQUOT: "the disk quota is used up; free space or choose another --out",
    errno.EROFS: "the file system is read-only; choose an --out on a writable disk",
    errno.ENAMETOOLONG: "a file name is too long; choose a shorter --out or recipe name",
}


# A path that is not what flyp reads or writes there, named by the error (a run's metrics.json
# that is a folder, a link that loops on the way to a root): the path, then one of these.
_PATH_ANSWERS = {
    errno.EISDIR: "is a folder where flyp reads or writes a file; move it away or fix the path",
    errno.ENOTDIR: "is not a folder, or a part of it is a file; fix the path",
    errno.ELOOP: "is, or passes through, a symbolic link that loops; remove the link or fix it",
}


def _main(argv: list[str]) -> int:
    """Parse and run one subcommand; its expected errors become one line and status 2."""
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command as typed: an interrupted run says how to continue it
    # After parsing: --help and --version need none of these (nor torch, which they import).
    from flyp.checkpoint import CheckpointError
    from flyp.data.folders import DataError
    from flyp.errors import RunError
    from flyp.models.base import ModelSpecError
    from flyp.recipe import RecipeError
    from flyp.report import ReportError

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
        from flyp.outputs import for_terminal

        print(f"error: {for_terminal(_one_line(err))}", file=sys.stderr)
        return 2
    except OSError as err:
        answer = _MACHINE_ANSWERS.get(err.errno)
        from flyp.outputs import for_terminal

        if answer is None and err.errno in _PATH_ANSWERS and err.filename:
            print(f"error: {for_terminal(f'{err.filename} {_PATH_ANSWERS[err.errno]}')}", file=sys.stderr)
            return 2
        if answer is None:
            raise

        # a copy's error names its source first; the file being written is its second name
        target = err.filename2 or err.filename
        where = f"cannot write {target}: " if target else ""
        print(f"error: {for_terminal(where + answer)}", file=sys.stderr)
        return 2
