"""flyp sweep: every combination of a grid of train.* values, chosen on ID validation."""

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


def register(sub: argparse._SubParsersAction) -> None:
    """Add `flyp sweep` and its options to the subcommands ``sub``."""
    p = sub.add_parser(
        "sweep",
        help="train every combination of a grid; choose on ID validation (never a test set)",
        description="Each combination is a run directory under --out; finished ones are reused "
        "and killed ones resumed, so rerunning the same command continues a sweep. A grid may "
        "vary train.* keys other than train.seed and train.method.",
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML (default: none; use --data)")
    add_data_options(p)
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values of one key, e.g. train.lr=1e-5,3e-5,1e-4; repeat for more keys",
    )
    add_quick_option(p)
    add_set_option(p)
    p.add_argument("--out", help="output folder (default: runs/<recipe>-<method>-sweep)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flyp.rundir import kept_runs
    from flyp.sweep import parse_grid, sweep

    grid = parse_grid(args.grid)
    recipe = build_recipe(args)
    out = out_folder(
        args.out or Path("runs") / f"{recipe.name}-{recipe.train.method}-sweep",
        given(args),
        data=data_folders(recipe),
    )
    try:
        result = sweep(recipe, grid, out)
    except KeyboardInterrupt:
        raise Interrupted(kept_runs(out, args.argv)) from None
    if not is_main():  # under torchrun rank 0 prints; every rank has the same choice
        return 0
    print((out / "sweep.md").read_text())
    chosen = " ".join(result["chosen"]["overrides"])
    print(f"chosen on ID validation: {chosen}  (sweep: {out / 'sweep.json'})")
    return 0
