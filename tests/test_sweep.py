"""flyp sweep and flyp compare --sweep: settings chosen on ID validation, never on a test set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import flyp.compare
import flyp.sweep
from fakes import tiny_overrides
from flyp.checkpoint import atomic_write_json
from flyp.cli import main
from flyp.recipe import load_recipe, save_recipe
from flyp.sweep import sweep


def _sets(val: float, test: float) -> dict:
    def one(acc: float, n: int) -> dict:  # n: the set's size in fake_pacs (compare checks it)
        return {"accuracy": acc, "macro_f1": acc, "worst_class_accuracy": acc, "n": n}

    return {"val": one(val, 9), "photo": one(test, 9), "art": one(test, 36), "sketch": one(test, 36)}


class FakeFinetune:
    """Writes a finished run whose scores come from ``scores[(method, lr, weight_decay)]`` =
    (val, test): the validation and test scores disagree by design. Records every call."""

    def __init__(self, scores: dict, fail_on_call: int | None = None):
        self.scores, self.fail_on_call, self.calls = scores, fail_on_call, []

    def __call__(self, recipe, run_dir, resume=False, exp=None):
        t = recipe.train
        self.calls.append((t.method, t.seed, t.lr, t.weight_decay, Path(run_dir).name, resume))
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
        if len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt  # killed mid-run: recipe.yaml written, no metrics.json
        val, test = self.scores.get((t.method, t.lr, t.weight_decay), (0.3, 0.3))
        metrics = {
            "recipe": recipe.name,
            "method": t.method,
            "model": "tiny",
            "seed": t.seed,
            "metric": "accuracy",
            "id_name": "photo",
            "id": test,
            "ood_names": ["art", "sketch"],
            "ood_mean": test,
            "val": val,
            "sets": _sets(val, test),
        }
        atomic_write_json(run_dir / "metrics.json", metrics)
        return metrics


def _recipe_file(fake_pacs: Path, tmp_path: Path, *extra: str) -> str:
    path = tmp_path / "tiny.yaml"
    save_recipe(load_recipe(None, ["name=tiny", *tiny_overrides(fake_pacs, *extra)]), path)
    return str(path)


# Validation prefers lr=3e-5 with wd=0.2; every test number prefers lr=1e-5 with wd=0.1.
SCORES = {
    ("flyp", 1e-5, 0.1): (0.50, 0.99),
    ("flyp", 1e-5, 0.2): (0.55, 0.90),
    ("flyp", 3e-5, 0.1): (0.80, 0.60),
    ("flyp", 3e-5, 0.2): (0.85, 0.55),
    ("flyp", 1e-4, 0.1): (0.85, 0.40),  # ties the best val later in grid order: not chosen
    ("flyp", 1e-4, 0.2): (0.70, 0.70),
}
GRID = {"train.lr": ["1e-5", "3e-5", "1e-4"], "train.weight_decay": ["0.1", "0.2"]}
NAMES = [
    "lr=1e-05_weight_decay=0.1",
    "lr=1e-05_weight_decay=0.2",
    "lr=3e-05_weight_decay=0.1",
    "lr=3e-05_weight_decay=0.2",
    "lr=0.0001_weight_decay=0.1",
    "lr=0.0001_weight_decay=0.2",
]


def test_sweep_chooses_on_validation_where_the_test_set_would_choose_otherwise(
    fake_pacs, tmp_path, monkeypatch
):
    fake = FakeFinetune(SCORES)
    monkeypatch.setattr(flyp.sweep, "finetune", fake)
    out = tmp_path / "sweep"
    result = sweep(load_recipe(None, tiny_overrides(fake_pacs)), GRID, out)

    assert [c[4] for c in fake.calls] == NAMES  # every combination, in grid order
    saved = json.loads((out / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["chosen"]["name"] == "lr=3e-05_weight_decay=0.2"
    assert saved["chosen"]["settings"] == {"train.lr": 3e-5, "train.weight_decay": 0.2}
    assert saved["chosen"]["overrides"] == ["train.lr=3e-05", "train.weight_decay=0.2"]
    assert saved["chosen_on"] == "val" and saved["metric"] == "accuracy"
    assert saved["grid"] == {"train.lr": [1e-5, 3e-5, 1e-4], "train.weight_decay": [0.1, 0.2]}
    assert [r["name"] for r in saved["runs"]] == NAMES
    assert [(r["val"], r["id"], r["ood_mean"]) for r in saved["runs"]] == [
        SCORES["flyp", lr, wd][:1] + SCORES["flyp", lr, wd][1:] * 2
        for lr in (1e-5, 3e-5, 1e-4)
        for wd in (0.1, 0.2)
    ]
    table = (out / "sweep.md").read_text().splitlines()
    marked = [line for line in table if line.endswith("| ✓ |")]
    assert marked == ["| **3e-05** | **0.2** | **85.0** | **55.0** | **55.0** | ✓ |"]
    assert "| 1e-05 | 0.1 | 50.0 | 99.0 | 99.0 |  |" in table


def test_an_interrupted_sweep_reruns_only_what_is_missing(fake_pacs, tmp_path, monkeypatch):
    recipe = load_recipe(None, tiny_overrides(fake_pacs))
    out = tmp_path / "sweep"
    killed = FakeFinetune(SCORES, fail_on_call=2)
    monkeypatch.setattr(flyp.sweep, "finetune", killed)
    with pytest.raises(KeyboardInterrupt):
        sweep(recipe, GRID, out)
    assert [c[4] for c in killed.calls] == NAMES[:2]
    assert not (out / "sweep.json").exists()

    again = FakeFinetune(SCORES)
    monkeypatch.setattr(flyp.sweep, "finetune", again)
    result = sweep(recipe, GRID, out)
    # the finished first run is reused, the killed second one resumed, the rest started
    assert [(c[4], c[5]) for c in again.calls] == [(NAMES[1], True)] + [
        (n, False) for n in NAMES[2:]
    ]
    assert [r["name"] for r in result["runs"]] == NAMES
    assert result["chosen"]["name"] == "lr=3e-05_weight_decay=0.2"


def test_a_sweep_folder_of_another_experiment_is_refused(fake_pacs, tmp_path, monkeypatch, capsys):
    fake = FakeFinetune(SCORES)
    monkeypatch.setattr(flyp.sweep, "finetune", fake)
    recipe = _recipe_file(fake_pacs, tmp_path)
    out = tmp_path / "sweep"
    assert main(["sweep", recipe, "--grid", "train.lr=1e-5,3e-5", "--out", str(out)]) == 0
    capsys.readouterr()
    command = ["sweep", recipe, "--grid", "train.lr=1e-5,3e-5", "--set", "train.epochs=2"]
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {out / 'lr=1e-05'} holds a run made with other settings (train.epochs 3 -> 2; "
        "from its recipe.yaml): it belongs to another experiment; pass a new --out (or the "
        "settings it used)\n"
    )
    assert len(fake.calls) == 2  # nothing more trained
    # only what a resumed run may change (device, paths, speed) may differ
    assert (
        main(
            [
                "sweep",
                recipe,
                "--grid",
                "train.lr=1e-5,3e-5",
                "--set",
                "eval.batch_size=7",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert len(fake.calls) == 2


@pytest.mark.parametrize(
    "grid, fragment",
    [
        ([], "--grid: the grid is empty"),
        (["train.lr"], "--grid 'train.lr': expected KEY=V1,V2"),
        (["train.lr=1e-5,"], "--grid 'train.lr=1e-5,': expected KEY=V1,V2"),
        (["train.lr=1e-5", "train.lr=1e-4"], "--grid lists train.lr twice"),
        (["train.lr=1e-5,0.00001"], "--grid train.lr lists 1e-05 twice"),
        (["data.max_train=4,8"], "--grid data.max_train: a sweep compares settings on the same"),
        (["eval.max_eval=4,8"], "--grid eval.max_eval: a sweep compares"),
        (["train.seed=0,1"], "--grid train.seed: a sweep compares"),
        (["train.method=ft,flyp"], "--grid train.method: a sweep compares"),
        (
            ["train.lrr=1e-5,1e-4"],
            "--grid train.lrr=1e-5: unknown recipe key 'train.lrr' (did you mean 'lr'?)",
        ),
        (["train.lr=1e-5,-1"], "--grid train.lr=-1: train.lr"),
        (["train.epochs=1,two"], "--grid train.epochs=two: train.epochs: expected int"),
    ],
)
def test_bad_grids_are_refused_in_one_line_before_anything_is_written(
    fake_pacs, tmp_path, monkeypatch, capsys, grid, fragment
):
    def never(*args, **kwargs):
        raise AssertionError("a bad grid must be refused before anything trains")

    monkeypatch.setattr(flyp.sweep, "finetune", never)
    out = tmp_path / "sweep"
    args = [_recipe_file(fake_pacs, tmp_path)]
    assert main(["sweep", *args, *[a for g in grid for a in ("--grid", g)], "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {fragment}"), err
    assert not out.exists()


def test_a_tiny_sweep_end_to_end_through_the_cli(fake_pacs, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = [_recipe_file(fake_pacs, tmp_path, "train.epochs=1")]
    command = ["sweep", *args, "--grid", "train.lr=1e-3,3e-3", "--out", str(out)]
    assert main(command) == 0
    saved = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in saved["runs"]] == ["lr=0.001", "lr=0.003"]
    vals = []
    for name, lr in (("lr=0.001", 1e-3), ("lr=0.003", 3e-3)):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert load_recipe(out / name / "recipe.yaml").train.lr == lr
        assert metrics["val"] == metrics["sets"]["val"]["accuracy"]
        vals.append(metrics["val"])
    assert [r["val"] for r in saved["runs"]] == vals
    assert saved["chosen"]["name"] == ["lr=0.001", "lr=0.003"][vals.index(max(vals))]
    printed = capsys.readouterr().out
    assert f"chosen on ID validation: {saved['chosen']['overrides'][0]}" in printed
    # run again: both runs are reused, nothing retrains
    stamps = [(out / n / "metrics.json").stat().st_mtime_ns for n in ("lr=0.001", "lr=0.003")]
    assert main(command) == 0
    assert [
        (out / n / "metrics.json").stat().st_mtime_ns for n in ("lr=0.001", "lr=0.003")
    ] == stamps
    assert json.loads((out / "sweep.json").read_text()) == saved


def test_compare_sweep_gives_each_method_its_own_setting(fake_pacs, tmp_path, monkeypatch, capsys):
    # ft prefers lr=1e-4 on validation, flyp lr=1e-5; the test sets prefer the other way round
    scores = {
        ("ft", 1e-5, 0.1): (0.60, 0.90),
        ("ft", 1e-4, 0.1): (0.70, 0.50),
        ("flyp", 1e-5, 0.1): (0.80, 0.40),
        ("flyp", 1e-4, 0.1): (0.75, 0.95),
    }
    fake = FakeFinetune(scores)
    monkeypatch.setattr(flyp.sweep, "finetune", fake)
    monkeypatch.setattr(flyp.compare, "finetune", fake)
    out = tmp_path / "cmp"
    args = [_recipe_file(fake_pacs, tmp_path), "--set", "train.weight_decay=0.1"]
    command = ["compare", *args, "--methods", "zeroshot", "ft", "flyp", "--seeds", "0", "1"]
    assert main([*command, "--no-wise", "--sweep", "train.lr=1e-5,1e-4", "--out", str(out)]) == 0

    assert [c[:5] for c in fake.calls] == [
        ("ft", 0, 1e-5, 0.1, "lr=1e-05"),  # the sweeps, on the first seed
        ("ft", 0, 1e-4, 0.1, "lr=0.0001"),
        ("flyp", 0, 1e-5, 0.1, "lr=1e-05"),
        ("flyp", 0, 1e-4, 0.1, "lr=0.0001"),
        ("zeroshot", 0, 3e-3, 0.1, "zeroshot"),  # not swept: the recipe's own lr
        ("ft", 1, 1e-4, 0.1, "ft-s1"),  # seed 0 is the chosen sweep run, copied
        ("flyp", 1, 1e-5, 0.1, "flyp-s1"),
    ]
    sweeps = json.loads((out / "sweeps.json").read_text())
    assert {m: s["chosen"] for m, s in sweeps.items()} == {
        "ft": {"train.lr": 1e-4},
        "flyp": {"train.lr": 1e-5},
    }
    for method, lr in (("ft", 1e-4), ("flyp", 1e-5)):
        for seed in (0, 1):
            run = out / f"{method}-s{seed}"
            assert load_recipe(run / "recipe.yaml").train.lr == lr
            assert json.loads((run / "metrics.json").read_text())["seed"] == seed
    report = (out / "report.md").read_text()
    assert "- ft: train.lr=0.0001 (val 70.0 accuracy, seed 0; grid in sweep-ft/sweep.md)" in report
    assert (
        "- flyp: train.lr=1e-05 (val 80.0 accuracy, seed 0; grid in sweep-flyp/sweep.md)" in report
    )
    assert "- ft: train.lr=0.0001" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--methods", "zeroshot", "lp"], "--sweep: none of --methods zeroshot lp trains"),
        (["--methods", "ft"], "--sweep data.max_train: a sweep compares settings on the same"),
    ],
)
def test_compare_refuses_a_sweep_it_cannot_run(
    fake_pacs, tmp_path, monkeypatch, capsys, extra, fragment
):
    def never(*args, **kwargs):
        raise AssertionError("a bad sweep must be refused before anything trains")

    monkeypatch.setattr(flyp.sweep, "finetune", never)
    monkeypatch.setattr(flyp.compare, "finetune", never)
    out = tmp_path / "cmp"
    sweep_arg = "train.lr=1e-5,1e-4" if "lp" in extra else "data.max_train=4,8"
    command = ["compare", _recipe_file(fake_pacs, tmp_path), *extra, "--sweep", sweep_arg]
    assert main([*command, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {fragment}"), err
    assert not out.exists()


def test_report_of_a_comparison_leaves_its_sweeps_out(fake_pacs, tmp_path):
    import shutil

    from flyp.train import finetune

    out = tmp_path / "cmp"
    finetune(load_recipe(None, tiny_overrides(fake_pacs, "train.epochs=1")), out / "flyp-s0")
    candidate = out / "sweep-flyp" / "lr=0.1"
    shutil.copytree(out / "flyp-s0", candidate)
    (out / "sweep-flyp" / "sweep.json").write_text("{}")
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert results["methods"]["flyp"]["runs"] == [str(out / "flyp-s0")]
    # the sweep folder itself can still be reported
    assert main(["report", str(out / "sweep-flyp"), "--out", str(tmp_path / "rep2")]) == 0
    again = json.loads((tmp_path / "rep2" / "results.json").read_text())
    assert again["methods"]["flyp"]["runs"] == [str(candidate)]
