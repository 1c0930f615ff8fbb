"""Hyperparameters chosen on validation: every combination of a grid, trained on the same data,
the choice made on ID validation with the benchmark's headline metric, never on a test set.

out_dir/
  <setting>/   one run directory per combination, e.g. lr=1e-05_weight_decay=0.1
  sweep.json   the grid, every combination's val / ID / OOD mean, the choice and the metric
  sweep.md     the same as a table, the chosen row marked

Which keys a grid may vary: ``train.*`` except ``train.seed`` and ``train.method``. Everything
else (``model.*``, ``data.*``, ``eval.*``, ``name``) decides what is measured (the model, the
splits, the validation and test sets), so the combinations would not be compared on the same
thing; the seed and the method are what a comparison varies around a chosen setting.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from flyp.checkpoint import atomic_write_json, atomic_write_text, read_json
from flyp.distributed import init_distributed, on_main
from flyp.experiment import Experiment, prepare
from flyp.recipe import Recipe, RecipeError, check_device, with_overrides
from flyp.rundir import LOCK_NAME, check_same_run
from flyp.train import finetune

FIXED = ("train.seed", "train.method")  # varied by compare, never by a sweep

Grid = dict[str, list[str]]


def parse_grid(specs: Sequence[str], flag: str = "--grid") -> Grid:
    """``KEY=V1,V2,...`` strings as {key: [value text, ...]}; the shape is checked here, the
    values by :func:`combinations` (against a recipe)."""
    if not specs:
        raise RecipeError(
            f"{flag}: the grid is empty; give {flag} KEY=V1,V2 (e.g. train.lr=1e-5,1e-4)"
        )
    grid: Grid = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        values = [v.strip() for v in text.split(",")]
        if not sep or not key or not all(values):
            raise RecipeError(
                f"{flag} {spec!r}: expected KEY=V1,V2,... with no empty value "
                "(e.g. train.lr=1e-5,1e-4)"
            )
        if key in grid:
            raise RecipeError(
                f"{flag} lists {key} twice; give all its values in one {flag} {key}=V1,V2"
            )
        grid[key] = values
    return grid


def _check_key(key: str, flag: str) -> None:
    if not key.startswith("train.") or key in FIXED:
        raise RecipeError(
            f"{flag} {key}: a sweep compares settings on the same model, data and evaluation, "
            f"so it may vary train.* keys other than {' and '.join(FIXED)}; "
            f"set {key} in the recipe or with --set"
        )


def _text(value: Any) -> str:
    return str(value).replace("/", "-").replace(" ", "")


def combinations(
    recipe: Recipe, grid: Mapping[str, Sequence[Any]], flag: str = "--grid"
) -> list[dict[str, Any]]:
    """Every combination of ``grid`` in grid order (the first key varies slowest), each checked
    against ``recipe`` before anything trains.

    Each is {"name", "settings" (typed values), "overrides" (key=value), "recipe"}."""
    if not grid:
        raise RecipeError(
            f"{flag}: the grid is empty; give {flag} KEY=V1,V2 (e.g. train.lr=1e-5,1e-4)"
        )
    typed: dict[str, list[Any]] = {}
    for key, values in grid.items():
        _check_key(key, flag)
        typed[key] = []
        for value in values:
            try:
                one = with_overrides(recipe, [f"{key}={value}"])
            except RecipeError as err:
                raise RecipeError(f"{flag} {key}={value}: {err}") from None
            parsed = getattr(one.train, key.removeprefix("train."))
            if parsed in typed[key]:
                raise RecipeError(f"{flag} {key} lists {parsed!r} twice; list each value once")
            typed[key].append(parsed)
    combos = []
    for values in itertools.product(*typed.values()):
        settings = dict(zip(typed, values, strict=True))
        overrides = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
        name = "_".join(f"{k.removeprefix('train.')}={_text(v)}" for k, v in settings.items())
        combos.append(
            {
                "name": name,
                "settings": settings,
                "overrides": overrides,
                "recipe": with_overrides(recipe, overrides),
            }
        )
    return combos


def sweep(
    recipe: Recipe,
    grid: Mapping[str, Sequence[Any]],
    out_dir: str | Path,
    exp: Experiment | None = None,
    pretrained: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train every combination of ``grid`` (finished runs reused, killed ones resumed) and choose
    the one with the best headline metric on ID validation (ties: the first in grid order)."""
    out_dir = Path(out_dir)
    combos = combinations(recipe, grid)  # every value checked before anything is built or written
    check_device(recipe.train.device)
    # Under torchrun every rank trains each combination, and rank 0 alone reads and writes
    # out_dir: on_main gives every rank its answer (the same runs, the same choice).
    init_distributed(recipe.train.device, recipe.train.dist_timeout_s)
    on_main(partial(_check_runs, out_dir, combos))  # another experiment's folder: before any work
    exp = exp or prepare(recipe)
    if not exp.benchmark.val:
        raise RecipeError(
            "a sweep chooses on ID validation, and this recipe's validation set is empty; "
            "set data.val_fraction above 0"
        )
    pretrained = pretrained or copy.deepcopy(exp.bundle.model.state_dict())
    rows = []
    for combo in combos:
        run_dir = out_dir / combo["name"]
        metrics = on_main(partial(_finished_metrics, run_dir))
        if metrics is None:
            exp.bundle.model.load_state_dict(pretrained)  # every combination starts pretrained
            run_exp = exp.for_run(combo["recipe"])
            resume = on_main((run_dir / "recipe.yaml").exists)  # killed: continued (or restarted)
            metrics = finetune(combo["recipe"], run_dir, resume=resume, exp=run_exp)
        rows.append(
            {
                "name": combo["name"],
                "settings": combo["settings"],
                "overrides": combo["overrides"],
                "run_dir": str(run_dir),
                "val": metrics["val"],
                "id": metrics["id"],
                "ood_mean": metrics["ood_mean"],
            }
        )
    exp.bundle.model.load_state_dict(pretrained)
    chosen = max(rows, key=lambda r: r["val"])  # max keeps the first of equals: grid order
    result = {
        "recipe": recipe.name,
        "method": recipe.train.method,
        "seed": recipe.train.seed,
        "metric": exp.benchmark.metric,
        "chosen_on": "val",
        "grid": _grid_values(rows),
        "chosen": chosen,
        "runs": rows,
    }
    on_main(partial(_write_sweep, result, out_dir))
    return result


def _check_runs(out_dir: Path, combos: Sequence[dict[str, Any]]) -> None:
    for combo in combos:
        check_same_run(out_dir / combo["name"], combo["recipe"])


def _finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """A finished run's metrics (checked before to be this combination's run), else None."""
    if not (run_dir / "metrics.json").exists():
        return None
    return read_json(run_dir / "metrics.json", ("val", "id", "ood_mean"))


def _write_sweep(result: dict[str, Any], out_dir: Path) -> None:
    atomic_write_json(out_dir / "sweep.json", result)
    atomic_write_text(out_dir / "sweep.md", sweep_markdown(result))


def _grid_values(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Each key's values, typed, in grid order."""
    grid: dict[str, list[Any]] = {}
    for row in rows:
        for key, value in row["settings"].items():
            if value not in grid.setdefault(key, []):
                grid[key].append(value)
    return grid


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def sweep_markdown(result: dict[str, Any]) -> str:
    """The whole grid as a table; the chosen row in bold, marked in the last column."""
    keys = list(result["grid"])
    lines = [
        f"# Sweep: {result['recipe']} ({result['method']}, seed {result['seed']})",
        "",
        f"Chosen on ID validation ({result['metric']}), never on a test set: "
        f"**{result['chosen']['name']}** (val {_pct(result['chosen']['val'])}).",
        "",
        "| " + " | ".join(keys) + " | val | ID | OOD mean | chosen |",
        "|" + "---|" * (len(keys) + 4),
    ]
    for row in result["runs"]:
        mark = row["name"] == result["chosen"]["name"]
        cells = [str(row["settings"][k]) for k in keys]
        cells += [_pct(row["val"]), _pct(row["id"]), _pct(row["ood_mean"])]
        if mark:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + f" | {'✓' if mark else ''} |")
    return "\n".join(lines) + "\n"


def sweep_methods(
    recipe: Recipe,
    methods: Sequence[str],
    seeds: Sequence[int],
    grid: Mapping[str, Sequence[Any]],
    out_dir: str | Path,
    flag: str = "--sweep",
) -> dict[str, dict[str, Any]]:
    """What ``flyp compare --sweep`` runs first: each method that trains gets its own sweep on
    the first seed (out_dir/sweep-<method>/), as the paper tuned every baseline. The chosen run
    is copied to out_dir/<method>-s<seed> so the comparison reuses it. Returns {method: sweep}."""
    from flyp.methods import get_method

    out_dir = Path(out_dir)
    trained = [m for m in methods if get_method(m).objective != "none"]  # not zeroshot, lp
    recipes = {}
    for name in trained:  # every method's grid checked before anything is built or written
        recipes[name] = copy.deepcopy(recipe)
        recipes[name].train.method, recipes[name].train.seed = name, seeds[0]
        combinations(recipes[name], grid, flag)
    if not trained:
        raise RecipeError(
            f"{flag}: none of --methods {' '.join(methods)} trains (zeroshot and lp have no "
            f"training settings to sweep); add ft, lpft, l2sp or flyp, or drop {flag}"
        )
    exp = prepare(recipe)
    pretrained = copy.deepcopy(exp.bundle.model.state_dict())
    results = {}
    for name in trained:
        results[name] = sweep(recipes[name], grid, out_dir / f"sweep-{name}", exp, pretrained)
        on_main(partial(_keep_chosen, recipes[name], seeds, results[name], out_dir))
    return results


def _keep_chosen(recipe: Recipe, seeds: Sequence[int], result: dict[str, Any], out_dir: Path) -> None:
    """The chosen run copied to out_dir/<method>-s<first seed>, the comparison's run for that
    seed (not trained twice); a run left there by an earlier comparison must have the chosen
    settings, for every seed."""
    name = recipe.train.method
    for seed in seeds:
        run_recipe = copy.deepcopy(recipe)
        run_recipe.train.seed = seed
        run_recipe = with_overrides(run_recipe, result["chosen"]["overrides"])
        check_same_run(out_dir / f"{name}-s{seed}", run_recipe)
    target = out_dir / f"{name}-s{seeds[0]}"
    if not target.exists():
        staging = out_dir / f".{target.name}.copying"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(
            result["chosen"]["run_dir"], staging, ignore=shutil.ignore_patterns(LOCK_NAME)
        )
        staging.rename(target)


def write_sweeps(results: Mapping[str, dict[str, Any]], out_dir: str | Path) -> None:
    """out_dir/sweeps.json (each method's choice and grid) and a section after report.md's
    (written by rank 0 alone under torchrun)."""
    on_main(partial(_write_sweeps, results, Path(out_dir)))


def _write_sweeps(results: Mapping[str, dict[str, Any]], out_dir: Path) -> None:
    summary = {
        name: {
            "chosen": r["chosen"]["settings"],
            "overrides": r["chosen"]["overrides"],
            "val": r["chosen"]["val"],
            "metric": r["metric"],
            "seed": r["seed"],
            "sweep": str(out_dir / f"sweep-{name}" / "sweep.json"),
        }
        for name, r in results.items()
    }
    atomic_write_json(out_dir / "sweeps.json", summary)
    lines = ["", "## Hyperparameters chosen on ID validation", ""]
    for name, s in summary.items():
        setting = ", ".join(f"{k}={v}" for k, v in s["chosen"].items())
        lines.append(
            f"- {name}: {setting} (val {_pct(s['val'])} {s['metric']}, seed {s['seed']}; "
            f"grid in sweep-{name}/sweep.md)"
        )
    report = out_dir / "report.md"
    atomic_write_text(report, report.read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")
