"""flyp compare: several methods on the same splits and seeds, then the report (with WiSE-FT,
soups, Model Stock and a per-method sweep when asked)."""

from __future__ import annotations

import argparse
from pathlib import Path

from flyp.cli._common import (
    Interrupted,
    add_data_options,
    add_quick_option,
    add_set_option,
    build_recipe,
    data_folders,
    given,
    is_main,
    out_folder,
)

DEFAULT_METHODS = ["zeroshot", "lp", "ft", "lpft", "l2sp", "flyp"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add `flyp compare` and its options to the subcommands ``sub``."""
    p = sub.add_parser(
        "compare", help="run several methods on the same splits and seeds, then report"
    )
    p.add_argument(
        "recipe", nargs="?", help="recipe YAML, run as written (default: none; use --data)"
    )
    add_data_options(p)
    p.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        help="the methods to compare (README: Methods)",
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="training seeds; each method per seed"
    )
    add_quick_option(p)
    add_set_option(p)
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flyp.compare import check_request, compare
    from flyp.methods import get_method
    from flyp.outputs import for_terminal_lines
    from flyp.recipe import RecipeError
    from flyp.rundir import kept_runs
    from flyp.sweep import parse_grid, sweep_methods, write_sweeps

    for name in args.methods:
        get_method(name)  # a typo fails before the first method trains
    for flag, values in (("--methods", args.methods), ("--seeds", args.seeds)):
        twice = sorted({v for v in values if values.count(v) > 1})
        if twice:
            raise RecipeError(f"{flag} lists {twice[0]} twice; list each once")
    grid = parse_grid(args.sweep, "--sweep") if args.sweep is not None else None
    recipe = build_recipe(args)  # as written: the demo's quick settings live in recipes/pacs_demo.yaml
    check_request(recipe, args.methods, args.seeds, args.soups, args.stock)  # before any sweep
    out = out_folder(
        args.out or Path("runs") / f"{recipe.name}-compare", given(args), data=data_folders(recipe)
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
        raise Interrupted(kept_runs(out, args.argv)) from None
    if not is_main():  # under torchrun rank 0 prints; every rank has the same results
        return 0
    print(for_terminal_lines((out / "report.md").read_text()))
    print(
        f"report: {out / 'report.md'}  figure: {out / 'figure.png'}  ({len(results['methods'])} methods)"
    )
    return 0
