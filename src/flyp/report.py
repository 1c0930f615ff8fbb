"""Reports built from finished run directories only: a Markdown table, JSON and CSV of every
number, and an ID-versus-OOD figure with each method's WiSE-FT curve."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flyp.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    check_results,
)
from flyp.outputs import csv_cell, md_cell, plot_label
from flyp.paths import broken_link

# What a finished run's metrics.json must hold for a report to use it.
RUN_KEYS = ("method", "metric", "id_name", "ood_names", "id", "ood_mean", "sets")


class ReportError(ValueError):
    """A run directory whose results cannot go into a report; the message names the file."""


def _read_json(path: Path, keys: Sequence[str]) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}), maybe cut short by a "
            "killed process; rerun that run or leave its directory out"
        ) from None
    except UnicodeDecodeError:
        raise ReportError(
            f"{path} is not UTF-8 text, so flyp did not write it; rerun that run or leave its "
            "directory out"
        ) from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ReportError(
            f"{path} lacks '{missing[0]}', so it is not a flyp result; rerun that run or leave "
            "its directory out"
        )
    check_results(data, path)  # every field as flyp writes it (accuracies in [0, 1], ...)
    return data


def _stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample std and n of one number over a method's runs, with the values themselves
    (in the order of the method's ``seeds``): the report's per-seed table and results.csv."""
    arr = np.asarray(values, dtype=float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "n": len(arr),
        "values": [float(v) for v in arr],
    }


def _load_runs(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    runs = []
    for run_dir in map(Path, run_dirs):
        path = run_dir / "metrics.json"
        for name in ("metrics.json", "wise.json", "recipe.yaml"):
            refusal = broken_link(run_dir / name)
            if refusal:
                raise ReportError(refusal)
        if not path.exists():
            raise FileNotFoundError(f"{run_dir} has no metrics.json: is the run finished? (resume it with flyp finetune --resume {run_dir})")
        run = _read_json(path, RUN_KEYS)
        run["run_dir"] = str(run_dir)
        wise = run_dir / "wise.json"
        run["wise"] = _read_json(wise, ("points", "best_alpha")) if wise.exists() else None
        runs.append(run)
    if not runs:
        raise ReportError("no run directories given")
    first = runs[0]
    for run in runs[1:]:
        for key in ("metric", "id_name", "ood_names"):
            if run[key] != first[key]:
                raise ReportError(
                    f"{run['run_dir']} has {key} {run[key]!r} but {first['run_dir']} has "
                    f"{first[key]!r}; a report compares runs of one benchmark setup"
                )
    _check_one_experiment(runs)
    return runs


def _settings(run: dict[str, Any]) -> dict[str, Any] | None:
    """The settings that made a run (its metrics.json's, else its recipe.yaml's); None for a
    merge (soups) or a run from before flyp stored them, which cannot be checked.

    A run whose recipe.yaml no longer describes it (edited by hand: another split_seed, another
    lr) is refused, as ``flyp evaluate`` and ``flyp wise`` refuse it: the report would list it
    under a recipe it was not made with."""
    from flyp.recipe import load_recipe, recipe_differences, run_settings

    path = Path(run["run_dir"]) / "recipe.yaml"
    if run.get("settings") is not None:
        if path.is_file():
            diff = recipe_differences(run["settings"], load_recipe(path))
            if diff:
                raise ReportError(
                    f"{path} differs from the settings its run was made with ({diff}, as its "
                    "metrics.json records them): edited after the run; put it back, or leave "
                    "the run out"
                )
        return run["settings"]
    return run_settings(load_recipe(path)) if path.is_file() else None


def _check_one_experiment(runs: list[dict[str, Any]]) -> None:
    """Refuse what would average or compare unlike things: a method's runs must differ in the
    seed only (and each seed come once), and all runs share the model, data and evaluation."""
    from flyp.recipe import differences

    settings = [(run, _settings(run)) for run in runs]
    known = [(run, s) for run, s in settings if s is not None]
    for run, s in known[1:]:
        diff = differences(known[0][1], s, only=("model.", "data.", "eval.", "train.precision"))
        if diff:
            raise ReportError(
                f"{known[0][0]['run_dir']} and {run['run_dir']} differ in {diff}: a report "
                "compares methods on one model, data, evaluation and precision; report them apart"
            )
    for method in dict.fromkeys(r["method"] for r in runs):
        group = [(r, s) for r, s in settings if r["method"] == method]
        seen: dict[Any, str] = {}
        for run, _ in group:
            seed = run.get("seed")
            if seed in seen:
                raise ReportError(
                    f"{seen[seed]} and {run['run_dir']} are both {method} seed {seed}: a report "
                    "averages distinct seeds; leave one of them out"
                )
            seen[seed] = run["run_dir"]
        checked = [(r, s) for r, s in group if s is not None]
        for run, s in checked[1:]:
            diff = differences(checked[0][1], s, ignore=("train.seed",))
            if diff:
                raise ReportError(
                    f"{checked[0][0]['run_dir']} and {run['run_dir']} are both {method} but "
                    f"differ in more than the seed ({diff}); a report averages the seeds of "
                    "one experiment: report them apart"
                )
        wises = [r for r, _ in group if r["wise"]]
        alphas = {tuple(p.get("alpha") for p in r["wise"]["points"]) for r in wises}
        if len(alphas) > 1:
            raise ReportError(
                f"the WiSE-FT sweeps (wise.json) of {method}'s runs use different alphas; "
                f"redo them with the same alphas (flyp wise RUN_DIR --alphas ...)"
            )


def _method_order(name: str) -> tuple[int, int, str]:
    """The methods table's order (zero-shot first), each method's soups right after it."""
    from flyp.methods import METHODS

    order = list(METHODS)
    base = name.split(" soup")[0]
    kinds = ["uniform", "greedy", "model stock"]  # each method's merges in this order
    kind = name.partition("(")[2].rstrip(")").split(" = ")[0]  # "uniform = greedy": one soup
    merge = kinds.index(kind) + 1 if name != base and kind in kinds else len(kinds) + 1
    return (order.index(base) if base in order else len(order), merge if name != base else 0, name)


def aggregate(run_dirs: Sequence[Path]) -> dict[str, Any]:
    """Group runs by method; mean and std over seeds of every number; WiSE chosen per seed on val."""
    runs = _load_runs(run_dirs)
    first = runs[0]
    set_names = [s for s in first["sets"] if s != "val"]
    methods: dict[str, Any] = {}
    for method in sorted(dict.fromkeys(r["method"] for r in runs), key=_method_order):
        group = [r for r in runs if r["method"] == method]
        entry: dict[str, Any] = {
            "runs": [r["run_dir"] for r in group],
            "seeds": [r.get("seed") for r in group],
            "id": _stat([r["id"] for r in group]),
            "ood_mean": _stat([r["ood_mean"] for r in group]),
            "val": _stat([r["sets"]["val"][first["metric"]] for r in group if "val" in r["sets"]] or [float("nan")]),
            "sets": {s: _stat([r["sets"][s][first["metric"]] for r in group]) for s in set_names},
        }
        if any(r.get("same_as") for r in group):  # a seed-free method (lp): one run, relabelled
            entry["note"] = (
                f"{method} does not depend on the seed: trained once and reported for each "
                "seed, so its spread over seeds is 0"
            )
        calibrated = _calibration(group, first["id_name"], first["ood_names"])
        if calibrated:
            entry["calibration"] = calibrated
        wises = [r["wise"] for r in group if r["wise"]]
        if len(wises) == len(group):
            alphas = [p["alpha"] for p in wises[0]["points"]]
            best = [next(p for p in w["points"] if p["alpha"] == w["best_alpha"]) for w in wises]
            entry["wise"] = {
                "alphas": alphas,
                "id": [_stat([w["points"][i]["id"] for w in wises])["mean"] for i in range(len(alphas))],
                "ood_mean": [_stat([w["points"][i]["ood_mean"] for w in wises])["mean"] for i in range(len(alphas))],
                "best_alpha": [w["best_alpha"] for w in wises],
                "best": {
                    "id": _stat([p["id"] for p in best]),
                    "ood_mean": _stat([p["ood_mean"] for p in best]),
                    "sets": {s: _stat([p["sets"][s][first["metric"]] for p in best]) for s in set_names},
                },
            }
        methods[method] = entry
    covers = {  # sets scored on a subset of the classes (an OOD domain lacking some)
        s: {"classes": v["classes"], "of_classes": v["of_classes"]}
        for s, v in first["sets"].items()
        if isinstance(v.get("classes"), int) and isinstance(v.get("of_classes"), int)
    }
    return {
        "metric": first["metric"],
        "id_name": first["id_name"],
        "ood_names": first["ood_names"],
        "class_subsets": covers,
        "model": first.get("model"),
        "recipe": first.get("recipe"),
        "methods": methods,
    }


CALIBRATION = ("ece", "ece_ts", "nll", "nll_ts")


def _calibration(group: list[dict], id_name: str, ood_names: Sequence[str]) -> dict[str, Any]:
    """ECE and NLL (raw and after temperature scaling on ID validation) on the ID test set and
    averaged over the OOD sets, mean and std over seeds; empty for runs without them."""
    out = {}
    for key in CALIBRATION:
        if not all(r["sets"][id_name].get(key) is not None for r in group):
            continue
        out[f"id_{key}"] = _stat([r["sets"][id_name][key] for r in group])
        ood = [[r["sets"][s].get(key) for s in ood_names] for r in group]
        if ood[0] and all(v is not None for values in ood for v in values):
            out[f"ood_{key}"] = _stat([sum(values) / len(values) for values in ood])
    return out


def calibration_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "ID ECE", "ID ECE (TS)", "OOD ECE", "OOD ECE (TS)", "ID NLL", "ID NLL (TS)"]
    keys = ["id_ece", "id_ece_ts", "ood_ece", "ood_ece_ts", "id_nll", "id_nll_ts"]
    rows = []
    for name, m in results["methods"].items():
        cal = m.get("calibration", {})
        if cal:
            rows.append([name, *[_fmt(cal[k], scale=1 if "nll" in k else 100) if k in cal else "" for k in keys]])
    return header, rows


def _fmt(stat: dict[str, float], scale: float = 100) -> str:
    digits = 1 if scale == 100 else 3
    text = f"{scale * stat['mean']:.{digits}f}"
    return text + (f" ± {scale * stat['std']:.{digits}f}" if stat.get("n", 1) > 1 else "")


def set_column(results: dict[str, Any], name: str) -> str:
    """A set's column in the report: '<id> (ID)', '<set> (5 of 7 classes)' for a set scored on
    the classes it covers, else its name."""
    if name == results["id_name"]:
        return f"{name} (ID)"
    covers = results.get("class_subsets", {}).get(name)
    return f"{name} ({covers['classes']} of {covers['of_classes']} classes)" if covers else name


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    sets = [results["id_name"], *results["ood_names"]]
    header = ["method", *[set_column(results, s) for s in sets], "OOD mean", "WiSE α", "WiSE ID", "WiSE OOD mean"]
    rows = []
    for name, m in results["methods"].items():
        row = [name, *[_fmt(m["sets"][s]) for s in sets], _fmt(m["ood_mean"])]
        if "wise" in m:
            alphas = m["wise"]["best_alpha"]
            row += ["/".join(f"{a:g}" for a in alphas), _fmt(m["wise"]["best"]["id"]), _fmt(m["wise"]["best"]["ood_mean"])]
        else:
            row += ["", "", ""]
        rows.append(row)
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; every cell escaped (names come from folders and metrics files)."""
    lines = ["| " + " | ".join(map(md_cell, header)) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    return lines + ["| " + " | ".join(map(md_cell, r)) + " |" for r in rows]


def spread_note(results: dict[str, Any]) -> str:
    """What ± means in the tables: the sample standard deviation (n − 1 in the denominator)
    over a method's n seeds, with n said (grouped by n when methods differ)."""
    by_n: dict[int, list[str]] = {}
    for name, m in results["methods"].items():
        if m["ood_mean"]["n"] > 1:
            by_n.setdefault(m["ood_mean"]["n"], []).append(name)
    what = "± is the sample standard deviation (n − 1 in the denominator) over"
    if not by_n:
        return "one run per method, so no ± spread"
    if len(by_n) == 1:
        return f"{what} n = {next(iter(by_n))} seeds"
    counts = "; ".join(f"n = {n}: {', '.join(names)}" for n, names in sorted(by_n.items()))
    return f"{what} each method's seeds ({counts})"


def markdown(results: dict[str, Any], title: str) -> str:
    header, rows = table_rows(results)
    wise = any("wise" in m for m in results["methods"].values())  # none with --no-wise
    chosen = " WiSE-FT α chosen on ID validation, per seed." if wise else ""
    lines = [f"# {md_cell(title)}", "", f"Metric: {results['metric']} (%), mean over seeds; {spread_note(results)}.{chosen}", ""]
    lines += _md_table(header, rows)
    notes = [m["note"] for m in results["methods"].values() if m.get("note")]
    if results.get("class_subsets"):
        notes.append(
            "a set marked (k of n classes) covers only k of the n classes and is scored on "
            "them: the logits of the other classes are left out, as for ImageNet-R and -A"
        )
    lines += ["", *(f"Note: {md_cell(note)}." for note in notes)] if notes else []
    header, rows = per_seed_rows(results)
    if rows:
        lines += ["", "Per seed: the values behind each mean ± std.", ""]
        lines += _md_table(header, rows)
    header, rows = calibration_rows(results)
    if rows:
        lines += ["", "Calibration: expected calibration error (%, 15 bins) and negative log-likelihood, "
                  "as trained and after temperature scaling (TS) fitted on ID validation.", ""]
        lines += _md_table(header, rows)
    lines += ["", "![ID vs OOD](figure.png)", ""]
    return "\n".join(lines)


def _numbers(m: dict[str, Any], sets: Sequence[str], id_name: str) -> list[tuple[str, str, dict]]:
    """(quantity, unit, stat) of every number of one method's row of the table: each set, the
    OOD mean and, where WiSE-FT ran, the chosen α and its ID and OOD mean."""
    named = [(f"{s} (ID)" if s == id_name else s, m["sets"][s]) for s in sets]
    named.append(("OOD mean", m["ood_mean"]))
    out = [(name, "%", stat) for name, stat in named]
    if "wise" in m:
        alphas = _stat(m["wise"]["best_alpha"])
        out += [("WiSE α", "alpha", alphas), ("WiSE ID", "%", m["wise"]["best"]["id"])]
        out.append(("WiSE OOD mean", "%", m["wise"]["best"]["ood_mean"]))
    return out


def _seeds(results: dict[str, Any]) -> list[int]:
    """Every training seed of the report's runs, in order (a merge's -1 is none)."""
    seeds = {s for m in results["methods"].values() for s in m["seeds"] if isinstance(s, int) and s >= 0}
    return sorted(seeds)


def write_csv(results: dict[str, Any]) -> str:
    """One row per method and number, every cell a number: mean, std (sample, over seeds), n,
    then the value of each seed (empty where the method has no run of that seed; a merge's one
    value is its mean). Percentages as in the report (unit '%'); WiSE-FT's α as chosen."""
    metric = results["metric"]
    sets = [results["id_name"], *results["ood_names"]]
    seeds = _seeds(results)
    header = ["method", "quantity", "metric", "unit", "mean", "std", "n", *[f"seed {s}" for s in seeds]]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([csv_cell(c) for c in header])  # no cell a spreadsheet runs as a formula
    for name, m in results["methods"].items():
        for quantity, unit, stat in _numbers(m, sets, results["id_name"]):
            scale = 100 if unit == "%" else 1
            by_seed = dict(zip(m["seeds"], stat.get("values", []), strict=False))
            cells = [_num(scale * by_seed[s]) if s in by_seed else "" for s in seeds]
            kind = metric if unit == "%" else "WiSE-FT alpha"
            row = [name, quantity, kind, unit, _num(scale * stat["mean"]), _num(scale * stat["std"]), stat["n"]]
            writer.writerow([csv_cell(c) for c in row[:4]] + row[4:] + cells)
    return buf.getvalue()


def _num(value: float) -> float:
    """A number as results.csv holds it: rounded to 1e-6 (of a percent: far below any
    difference a report shows), so a spreadsheet shows 71.0, not 70.99999999999999."""
    return round(float(value), 6)


def per_seed_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The value behind each mean: one row per method and seed (methods with one run, the
    zero-shot model and the merges, are in the main table already)."""
    sets = [results["id_name"], *results["ood_names"]]
    header = ["method", "seed", *[set_column(results, s) for s in sets], "OOD mean"]
    wise = any("wise" in m for m in results["methods"].values())
    header += ["WiSE α", "WiSE ID", "WiSE OOD mean"] if wise else []
    rows = []
    for name, m in results["methods"].items():
        if m["ood_mean"]["n"] < 2:
            continue
        numbers = _numbers(m, sets, results["id_name"])
        for i, seed in enumerate(m["seeds"]):
            row = [name, str(seed)]
            for _, unit, stat in numbers:
                value = stat["values"][i]
                row.append(f"{value:g}" if unit == "alpha" else f"{100 * value:.1f}")
            rows.append(row + [""] * (len(header) - len(row)))
    return header, rows


MARKERS = {"uniform": "s", "greedy": "^", "model stock": "P"}  # soups; a method is a circle


def figure(results: dict[str, Any], title: str):
    """Two panels: every method with its WiSE-FT line from the zero-shot star (left), and a zoom
    on the finetuned models with error bars over seeds and the soups (right). A method and its
    soups share a colour; soups are squares (uniform), triangles (greedy) and plus signs (Model
    Stock). Each point is a marker of its own, labelled; error bars (only where there is a
    spread), WiSE-FT lines and diamonds are unlabelled, so each legend entry shows exactly the
    marker drawn for it. Returns the matplotlib figure (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    bases = list(dict.fromkeys(name.split(" soup")[0] for name in methods if name != "zeroshot"))
    colour = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(bases)}
    entries = sum(name != "zeroshot" for name in methods)
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5 + 0.3 * -(-entries // 5)), dpi=120)
    for panel, ax in enumerate(axes):
        for name, m in methods.items():
            x, y = 100 * m["id"]["mean"], 100 * m["ood_mean"]["mean"]
            if name == "zeroshot":
                if panel == 0:
                    ax.plot([x], [y], ls="none", marker="*", ms=24, color="gold", mec="black", zorder=5, label="zero-shot")
                continue
            base = name.split(" soup")[0]
            marker = MARKERS.get(name.partition("(")[2].rstrip(")").split(" = ")[0], "o")
            xerr, yerr = 100 * m["id"]["std"], 100 * m["ood_mean"]["std"]
            if xerr or yerr:
                ax.errorbar([x], [y], xerr=[xerr], yerr=[yerr], fmt="none", ecolor=colour[base], capsize=3, zorder=3)
            ax.plot([x], [y], ls="none", marker=marker, ms=11, color=colour[base], mec="black", label=plot_label(name), zorder=4)
            if "wise" in m and panel == 0:
                ax.plot([100 * v for v in m["wise"]["id"]], [100 * v for v in m["wise"]["ood_mean"]], "-", color=colour[base], alpha=0.7, lw=2.5)
            if "wise" in m:
                best = m["wise"]["best"]
                ax.plot([100 * best["id"]["mean"]], [100 * best["ood_mean"]["mean"]], ls="none", marker="D", ms=7, color=colour[base], mec="black", zorder=4)
        ax.grid(alpha=0.3)
        ax.set_xlabel(plot_label(f"ID {results['metric']} ({results['id_name']}), %"), fontsize=14)
        ax.tick_params(labelsize=12)
    axes[0].set_ylabel(plot_label(f"OOD mean {results['metric']} ({', '.join(results['ood_names'])}), %"), fontsize=12)
    axes[0].set_title("all methods; lines: WiSE-FT from α=0 (star) to α=1", fontsize=13)
    axes[1].set_title("finetuned models (± std over seeds); diamonds: WiSE α chosen on ID val", fontsize=13)
    # the legend below both panels: with several methods and their merges it would hide points;
    # the left panel holds every labelled point (the zero-shot star too)
    handles, labels = axes[0].get_legend_handles_labels()
    rows = -(-len(labels) // 5)
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=10, frameon=False)
    fig.suptitle(plot_label(title), fontsize=16, fontweight="bold")
    fig.tight_layout(rect=(0, 0.045 * rows + 0.02, 1, 1))
    return fig


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    """:func:`figure`, written to ``path`` as a PNG (atomically)."""
    fig = figure(results, title)  # sets the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def write_report(run_dirs: Sequence[Path], out_dir: Path, title: str | None = None) -> dict[str, Any]:
    results = aggregate(run_dirs)
    title = title or f"{results['recipe']}: {results['model']}"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "results.json", results)
    atomic_write_text(out_dir / "results.csv", write_csv(results))
    plot(results, out_dir / "figure.png", title)
    atomic_write_text(out_dir / "report.md", markdown(results, title))
    return results
