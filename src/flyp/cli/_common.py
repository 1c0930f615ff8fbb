"""What the verbs of ``flyp`` share: the parser that prints its usage errors as one line, the
help that shows every default, the option builders (--data, --quick, --set), the recipe a verb
runs (RECIPE, --data, --model, --quick, --set), the checks of an --out folder, and the metrics
table. Imports nothing heavy: ``flyp --help`` builds every verb's parser without torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flyp.recipe import load_recipe

# --quick: a comparison of a small dataset in about 10 minutes on 2 CPU cores with the default
# model (README: Sizing a run on your own data); any --set of these keys wins
QUICK = [
    "model.image_size=128",
    "train.epochs=3",
    "data.max_train=1000",
    "data.max_eval=300",
    "eval.wise_alphas=[0, 0.5, 1]",
]


def build_recipe(args: argparse.Namespace):
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

        say(data_choices(recipe, wise=args.command == "compare" and not args.no_wise))
    return recipe


def data_choices(recipe, wise: bool = False) -> str:
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


def on_device(exp):
    """The experiment's model on the recipe's device (train.device), as a training run has it:
    the device's settings made, and the evaluation's precision said (flyp.precision)."""
    from flyp.distributed import pick_device
    from flyp.precision import announce, configure_device, resolve

    device = pick_device(exp.recipe.train.device)
    exp.bundle.model.to(device)
    configure_device(device)
    announce(None, resolve(exp.recipe.eval.precision, device))
    return exp


def out_folder(out: str | None, inputs=(), writes=(), data=()) -> Path | None:
    """An --out folder, checked before anything runs (flyp.outputs.check_output): not a file,
    not an input, not a run's own file or a run directory, not in a data folder."""
    from flyp.outputs import check_output

    if out is None:
        return None
    return check_output(out, inputs, folder=True, writes=writes, data=data)


def data_folders(recipe) -> list[str]:
    """The data folders a recipe reads (flyp.outputs.data_folders): no output may go in them."""
    from flyp.outputs import data_folders

    return data_folders(recipe)


def given(args: argparse.Namespace) -> list[str]:
    """The recipe and --data folder a command reads: an --out must not be one of them."""
    return [p for p in (args.recipe, getattr(args, "data", None)) if p]


def is_main() -> bool:
    """Whether this process prints a verb's results: rank 0 under torchrun, or the only one."""
    from flyp.distributed import is_main

    return is_main()


def print_metrics(metrics: dict, run_dir: Path | None) -> None:
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


class Interrupted(Exception):
    """Ctrl-C, with what a verb kept and the command that continues it (the message)."""


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
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


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line like every other flyp error, and every
    option's default in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelp)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def add_data_options(p: argparse.ArgumentParser) -> None:
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


def add_quick_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quick",
        action="store_true",
        help="size the run for a quick look: " + ", ".join(QUICK) + " (a --set of these keys "
        "wins; README: Sizing a run on your own data) (default: the recipe's settings)",
    )


def add_set_option(p: argparse.ArgumentParser, example: str = "train.lr=1e-5") -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a recipe key, e.g. {example}; repeatable (keys: src/flyp/recipe.py)",
    )


def add_unfinished_option(p: argparse.ArgumentParser, doing: str) -> None:
    """--unfinished: the verb reads a killed or running run's weights (flyp.rundir.check_finished
    refuses them without it)."""
    p.add_argument(
        "--unfinished",
        action="store_true",
        help=f"{doing} a killed or running run's best weights so far (warns)",
    )
