"""flyp finetune: train one method of a recipe and evaluate it; --resume continues a killed run."""

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
    print_metrics,
)
from flyp.recipe import RESUME_SETTABLE


def register(sub: argparse._SubParsersAction) -> None:
    """Add `flyp finetune` and its options to the subcommands ``sub``."""
    p = sub.add_parser("finetune", help="train one method of a recipe and evaluate it")
    p.add_argument(
        "recipe", nargs="?", help="recipe YAML (see recipes/) (default: none; use --data)"
    )
    add_data_options(p)
    add_quick_option(p)
    add_set_option(p)
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<method>-s<seed>)")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a killed run from its last checkpoint; --set may then change only "
        + ", ".join(RESUME_SETTABLE)
        + " (default: start a new run)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flyp.recipe import RecipeError, save_recipe
    from flyp.rundir import default_run_dir, kept_run, resume_recipe
    from flyp.train import finetune

    if not (args.recipe or args.resume or args.data):
        raise RecipeError("flyp finetune needs a RECIPE, --data DIR or --resume RUN_DIR")
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
        recipe = build_recipe(args)
        run_dir = out_folder(
            args.out or default_run_dir(recipe.name, recipe.train.method, recipe.train.seed),
            given(args),
            data=data_folders(recipe),
        )
    try:
        metrics = finetune(recipe, run_dir, resume=bool(args.resume))
    except KeyboardInterrupt:
        raise Interrupted(kept_run(run_dir)) from None
    if is_main():  # under torchrun every rank holds rank 0's metrics; one prints them
        print_metrics(metrics, run_dir)
    return 0
