"""The small things a new user met (issue 23, "Why 6"): results.csv of numbers, the values of
each seed in the report, a did-you-mean for --methods, "1 epoch", and --no-wise saying nothing
about WiSE-FT α. One tiny comparison (two seeds) feeds the report checks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fakes import error_lines, make_domains, tiny_overrides
from flyp.cli import _data_choices, main
from flyp.recipe import load_recipe

CLASSES = ["dog", "horse", "house"]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_domains(tmp_path_factory.mktemp("tree"), ["photo", "art", "sketch"], CLASSES, 8)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text("name: r\n")
    return str(path)


@pytest.fixture(scope="module")
def compared(tree, recipe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmp") / "out"
    extra = ["train.epochs=1", "eval.wise_alphas=[0, 0.5, 1]"]
    argv = ["compare", recipe, *_sets(tiny_overrides(tree, *extra)), "--methods", "zeroshot", "ft"]
    assert main([*argv, "--seeds", "0", "1", "--soups", "--out", str(out)]) == 0
    return out


def _csv(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_results_csv_holds_numbers_mean_std_n_and_each_seed(compared):
    rows = _csv(compared)
    assert list(rows[0]) == ["method", "quantity", "metric", "unit", "mean", "std", "n", "seed 0", "seed 1"]
    assert not any("±" in v for row in rows for v in row.values())
    runs = {s: json.loads((compared / f"ft-s{s}" / "metrics.json").read_text()) for s in (0, 1)}
    (ood,) = [r for r in rows if r["method"] == "ft" and r["quantity"] == "OOD mean"]
    per_seed = [100 * runs[s]["ood_mean"] for s in (0, 1)]
    assert float(ood["seed 0"]) == pytest.approx(per_seed[0], abs=1e-5)
    assert float(ood["seed 1"]) == pytest.approx(per_seed[1], abs=1e-5)
    assert float(ood["mean"]) == pytest.approx(sum(per_seed) / 2, abs=1e-5)
    spread = abs(per_seed[0] - per_seed[1]) / 2**0.5  # the sample std of two values
    assert float(ood["std"]) == pytest.approx(spread, abs=1e-5) and ood["n"] == "2"
    assert ood["unit"] == "%" and ood["metric"] == "accuracy"
    (photo,) = [r for r in rows if r["method"] == "ft" and r["quantity"] == "photo (ID)"]
    assert float(photo["seed 1"]) == pytest.approx(100 * runs[1]["id"], abs=1e-5)
    (alpha,) = [r for r in rows if r["method"] == "ft" and r["quantity"] == "WiSE α"]
    chosen = [json.loads((compared / f"ft-s{s}" / "wise.json").read_text())["best_alpha"] for s in (0, 1)]
    assert [float(alpha["seed 0"]), float(alpha["seed 1"])] == chosen and alpha["unit"] == "alpha"
    soup = [r for r in rows if r["method"].startswith("ft soup (uniform")]  # "= greedy" too
    assert soup and all(r["n"] == "1" and r["seed 0"] == r["seed 1"] == "" for r in soup)
    float(soup[0]["mean"])  # a number


def test_report_shows_each_seeds_values(compared):
    report = (compared / "report.md").read_text()
    assert "Per seed: the values behind each mean ± std." in report
    table = report.split("Per seed:", 1)[1]
    for seed in (0, 1):
        metrics = json.loads((compared / f"ft-s{seed}" / "metrics.json").read_text())
        wise = json.loads((compared / f"ft-s{seed}" / "wise.json").read_text())
        line = next(r for r in table.splitlines() if r.startswith(f"| ft | {seed} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == f"{100 * metrics['id']:.1f}"
        assert cells[5] == f"{100 * metrics['ood_mean']:.1f}"
        assert cells[6] == f"{wise['best_alpha']:g}"
    assert "| zeroshot | 0 |" not in table  # one run: its value is the table's


def test_no_wise_says_nothing_of_alphas_and_nothing_chosen(tree, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compare", "--data", str(tree), "--id-domain", "photo", "--model", "tiny"]
    argv += _sets(["train.batch_size=6", "train.epochs=1"])
    assert main([*argv, "--methods", "zeroshot", "ft", "--no-wise", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    (line,) = [s for s in captured.err.splitlines() if "--data without a recipe:" in s]
    assert "WiSE" not in line and "alpha" not in line and "1 epoch," in line
    report = (out / "report.md").read_text()
    assert "α chosen" not in report and "chosen" not in captured.out
    assert not (out / "ft-s0" / "wise.json").exists()


def test_data_choices_name_the_alphas_only_where_wise_runs():
    recipe = load_recipe(None, ["eval.wise_alphas=[0, 0.5, 1]"])
    assert ", 3 WiSE-FT alphas" in _data_choices(recipe, wise=True)
    assert "WiSE" not in _data_choices(recipe, wise=False)


def test_one_epoch_is_said_in_the_singular(tree, recipe, tmp_path, capsys):
    argv = ["finetune", recipe, *_sets(tiny_overrides(tree, "train.epochs=1")), "--out", str(tmp_path / "r")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "training 1 epoch of 2 steps" in err and "1 epochs" not in err


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["compare", "r.yaml", "--methods", "ft", "flpy"], "unknown method 'flpy' (did you mean 'flyp'?)"),
        (["finetune", "r.yaml", "--set", "train.method=fyp"], "(did you mean 'flyp'?)"),
    ],
)
def test_a_misspelt_method_gets_did_you_mean(argv, hint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("name: r\n")
    assert main(argv) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert hint in line, line
    assert not (tmp_path / "runs").exists()
