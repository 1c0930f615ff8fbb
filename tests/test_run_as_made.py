"""A run is read as it was made (issue 22, item 3).

Its settings hold the precision it computed in: ``auto`` is stored as what it resolved to (fp32
or bf16), so a resume on a machine where ``auto`` resolves otherwise is refused in one line, and
a rerun or a report does not take runs of two precisions as one experiment; evaluating it on
such a machine is no change to it. ``flyp report`` refuses a run whose recipe.yaml was edited
after it was made, as ``flyp evaluate`` does. The hardware is mocked:
``flyp.hardware.native_bf16`` is what ``auto`` asks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import flyp.hardware
from flyp.cli import main
from flyp.precision import AUTO_ENV
from flyp.recipe import load_recipe, run_settings
from test_trust_runs import one_error, recipe_file, sets


@pytest.fixture
def hardware(monkeypatch):
    """hardware(True): this machine computes bf16 natively; (False): it does not. ``auto`` then
    resolves by the hardware alone (the suite's FLYP_AUTO_PRECISION pin is lifted)."""

    def say(native: bool) -> None:
        monkeypatch.delenv(AUTO_ENV, raising=False)
        why = "mocked: native bf16" if native else "mocked: no bf16"
        monkeypatch.setattr(flyp.hardware, "native_bf16", lambda device: (native, why))

    return say


@pytest.mark.parametrize("native, name", [(True, "bf16"), (False, "fp32")])
def test_run_settings_hold_the_resolved_precision_not_auto(native, name, hardware):
    hardware(native)
    settings = run_settings(load_recipe(None, []))
    assert settings["train.precision"] == name and settings["eval.precision"] == name
    asked = run_settings(load_recipe(None, ["train.precision=fp32", "eval.precision=bf16"]))
    assert (asked["train.precision"], asked["eval.precision"]) == ("fp32", "bf16")


def test_a_resume_where_auto_resolves_otherwise_is_refused(fake_pacs, tmp_path, capsys, hardware):
    run = tmp_path / "run"
    hardware(False)  # started on a machine without bf16: auto is fp32
    args = ["finetune", recipe_file(tmp_path), *sets(fake_pacs, "train.stop_after_steps=2")]
    assert main([*args, "--out", str(run)]) == 0
    state = torch.load(run / "state.pt", weights_only=True)
    assert state["settings"]["train.precision"] == "fp32"
    capsys.readouterr()
    hardware(True)  # resumed on one with bf16: auto is bf16 here
    assert main(["finetune", "--resume", str(run)]) == 2
    line = one_error(capsys)
    assert f"{run} started in train.precision fp32, but auto resolves to bf16" in line
    assert "write 'precision: fp32' under train: in its recipe.yaml" in line
    assert (run / "state.pt").exists() and not (run / "metrics.json").exists()
    text = (run / "recipe.yaml").read_text()
    assert text.count("precision: auto") == 2  # train and eval
    (run / "recipe.yaml").write_text(text.replace("precision: auto", "precision: fp32"))
    assert main(["finetune", "--resume", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["precision"] == {"train": "fp32", "eval": "fp32"}


def test_a_rerun_into_a_run_of_the_other_precision_is_refused(
    fake_pacs, tmp_path, capsys, hardware
):
    """A finished run is reused only where it computed in what auto means now."""
    run = tmp_path / "run"
    args = [
        "finetune",
        recipe_file(tmp_path),
        *sets(fake_pacs, "train.method=zeroshot"),
        "--out",
        str(run),
    ]
    hardware(False)
    assert main(args) == 0
    capsys.readouterr()
    hardware(True)
    assert main(["finetune", "--resume", str(run)]) == 2
    line = one_error(capsys)
    assert "holds a run made with other settings (train.precision 'fp32' -> 'bf16'" in line


def _zeroshot(root: Path, run: Path, seed: int) -> Path:
    args = [
        "finetune",
        recipe_file(run.parent),
        *sets(root, "train.method=zeroshot", f"train.seed={seed}"),
    ]
    assert main([*args, "--out", str(run)]) == 0
    return run


def test_report_refuses_runs_of_two_precisions_and_of_none_stored(
    fake_pacs, tmp_path, capsys, hardware
):
    """Runs made where auto meant fp32 and where it meant bf16 are not one experiment; a run
    from a flyp that stored 'auto' (or no precision) is no run of either."""
    hardware(False)
    a = _zeroshot(fake_pacs, tmp_path / "a", 0)
    hardware(True)
    b = _zeroshot(fake_pacs, tmp_path / "b", 1)
    capsys.readouterr()
    report = ["report", str(a), str(b), "--out", str(tmp_path / "rep")]
    assert main(report) == 2
    line = one_error(capsys)
    assert "differ in train.precision 'fp32' -> 'bf16', eval.precision 'fp32' -> 'bf16'" in line
    assert "one model, data, evaluation and precision" in line
    assert not (tmp_path / "rep").exists()
    metrics = json.loads((b / "metrics.json").read_text())
    for old in ("auto", None):  # an older flyp's run: 'auto', or no key at all
        for key in ("train.precision", "eval.precision"):
            metrics["settings"][key] = "fp32"
        if old is None:
            del metrics["settings"]["eval.precision"]
        else:
            metrics["settings"]["eval.precision"] = old
        (b / "metrics.json").write_text(json.dumps(metrics))
        assert main(report) == 2
        shown = "(none)" if old is None else f"'{old}'"
        assert f"differ in eval.precision 'fp32' -> {shown}" in one_error(capsys)


def test_report_refuses_a_run_whose_recipe_was_edited_after_it(fake_pacs, tmp_path, capsys):
    b = _zeroshot(fake_pacs, tmp_path / "b", 1)
    capsys.readouterr()
    report = ["report", str(b), "--out", str(tmp_path / "rep")]
    text = (b / "recipe.yaml").read_text()
    assert "split_seed: 0" in text and "name: r" in text
    (b / "recipe.yaml").write_text(text.replace("split_seed: 0", "split_seed: 5"))
    assert main(report) == 2
    line = one_error(capsys)
    assert f"{b / 'recipe.yaml'} differs from the settings its run was made with" in line
    assert "(data.split_seed 0 -> 5, as its metrics.json records them)" in line
    assert "put it back, or leave the run out" in line
    assert not (tmp_path / "rep").exists()
    (b / "recipe.yaml").write_text(text.replace("name: r", "name: renamed"))  # no number
    assert main(report) == 0


def test_auto_precision_read_on_another_machine_is_the_same_run(
    fake_pacs, tmp_path, capsys, hardware
):
    """The recipe.yaml of a run made where auto meant fp32 still describes it where auto means
    bf16: report and evaluate take it (evaluate computes in what it is told)."""
    hardware(False)
    a = _zeroshot(fake_pacs, tmp_path / "a", 0)
    capsys.readouterr()
    hardware(True)
    assert main(["report", str(a), "--out", str(tmp_path / "rep")]) == 0
    assert main(["evaluate", str(a), "--set", "eval.precision=fp32"]) == 0
    (a / "recipe.yaml").write_text(
        (a / "recipe.yaml").read_text().replace("precision: auto", "precision: bf16", 1)
    )
    assert main(["report", str(a), "--out", str(tmp_path / "rep2")]) == 2
    assert "(train.precision 'fp32' -> 'bf16'" in one_error(capsys)
