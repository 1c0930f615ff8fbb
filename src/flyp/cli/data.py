"""flyp data: check a recipe's data and show what a run would see: classes, splits, counts."""

from __future__ import annotations

import argparse

from flyp.cli._common import add_data_options, add_set_option, build_recipe


def register(sub: argparse._SubParsersAction) -> None:
    """Add `flyp data` and its options to the subcommands ``sub``."""
    p = sub.add_parser("data", help="check a recipe's data and show its splits and class counts")
    p.add_argument("recipe", nargs="?", help="recipe YAML (default: none; use --data)")
    add_data_options(p)
    add_set_option(p, "data.max_train=100")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build a recipe's benchmark and show what a run would see: classes, splits, counts."""
    from collections import Counter

    from flyp.data import build_benchmark
    from flyp.outputs import for_terminal

    recipe = build_recipe(args)
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
        f"benchmark {bench.name}: {total} classes, "
        f"{len(bench.templates)} template{'s' * (len(bench.templates) != 1)}, "
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
