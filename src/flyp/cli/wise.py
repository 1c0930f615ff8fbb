"""flyp wise: the WiSE-FT sweep of one finished run; --keep writes the model at one alpha."""

from __future__ import annotations

import argparse
from pathlib import Path

from flyp.cli._common import add_set_option, on_device
from flyp.recipe import load_recipe


def register(sub: argparse._SubParsersAction) -> None:
    """Add `flyp wise` and its options to the subcommands ``sub``."""
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
    add_set_option(p, "eval.batch_size=64")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import copy

    from flyp.compare import wise_sweep
    from flyp.experiment import prepare
    from flyp.paths import broken_link
    from flyp.recipe import RecipeError, check_device
    from flyp.rundir import check_as_trained, run_recipe_path

    run_dir = Path(args.run_dir)
    recipe = load_recipe(run_recipe_path(run_dir, "a finished run directory"), args.set)
    refusal = broken_link(run_dir / "metrics.json")
    if refusal:
        raise FileNotFoundError(refusal)
    if not (run_dir / "metrics.json").is_file():
        raise FileNotFoundError(
            f"{run_dir} has no metrics.json: is the run finished? "
            f"(resume it with flyp finetune --resume {run_dir})"
        )
    check_as_trained(run_dir, recipe, "a WiSE-FT sweep of")
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
    result = wise_sweep(on_device(exp), run_dir, alphas, pretrained, keep=keep)
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
