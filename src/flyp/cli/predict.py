"""flyp predict: classify images with a finished run, with its own classes or new ones
zero-shot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flyp.cli._common import add_unfinished_option


def register(sub: argparse._SubParsersAction) -> None:
    """Add `flyp predict` and its options to the subcommands ``sub``."""
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
    add_unfinished_option(p, "classify with")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flyp.checkpoint import atomic_write_text
    from flyp.data.folders import DataError
    from flyp.data.templates import read_templates_file
    from flyp.distributed import pick_device
    from flyp.outputs import check_output, for_terminal
    from flyp.precision import announce_predict
    from flyp.predict import collect_images, load_classifier, predict_files, predictions_csv
    from flyp.recipe import RecipeError, check_device
    from flyp.rundir import check_finished, run_data_folders

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
    data = run_data_folders(run_dir) if (run_dir / "recipe.yaml").is_file() else []
    out = check_output(args.out, reads, data=data) if args.out else None
    if target.exists():
        check_finished(target if target.is_dir() else target.parent, args.unfinished)
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
