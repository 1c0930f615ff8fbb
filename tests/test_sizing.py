"""A run sized before it starts (flyp.progress): the plan, an estimate after the first steps,
progress lines with step k/N and an ETA off a terminal, --quick, and a template hint that fits
the data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

import flyp.progress as progress
from fakes import make_domains
from flyp.cli import _data_choices, main
from flyp.recipe import load_recipe

TINY = ["--model", "tiny", "--set", "train.batch_size=6"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    # 10 a class: 7 train (21: 3 steps of 6 an epoch), 1 validation, 2 test; 'sketch' OOD whole
    return make_domains(tmp_path / "d", ["photo", "sketch"], ["cat", "dog", "fox"], per_class=10)


def _said(err: str) -> list[str]:
    return [line[9:] for line in err.splitlines() if re.match(r"\d\d:\d\d:\d\d ", line)]


def test_finetune_says_its_plan_an_estimate_and_progress_lines_off_a_terminal(
    data, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(progress, "EVERY_S", 0.02)
    # a fresh beat thread: one started by an earlier test sleeps up to 1 s between its looks,
    # longer than this whole run's training
    monkeypatch.setattr(progress, "_beat", None)
    real_step = progress.step

    def slow_step(k: int, n: int) -> None:  # long enough for the progress thread to speak
        import time

        time.sleep(0.1)
        real_step(k, n)

    monkeypatch.setattr(progress, "step", slow_step)
    argv = ["finetune", "--data", str(data), "--id-domain", "photo", *TINY]
    assert main([*argv, "--set", "train.epochs=2", "--out", str(tmp_path / "r")]) == 0
    said = _said(capsys.readouterr().err)
    # 2 epochs x 3 steps; validation after each epoch (3 images) and the final evaluation of
    # val, photo (6) and sketch (30): 5 evaluations of 3 + 3 + 3 + 6 + 30 images
    plan = [s for s in said if "plan: " in s]
    assert plan == [
        "flyp seed 0: plan: 1 run, 6 training steps (batch 6), 5 evaluations of 45 images in "
        "all; an estimate of the time follows the first 5 steps"
    ], said
    assert any(re.search(r"estimate: \d:\d\d:\d\d in all, \d:\d\d:\d\d left", s) for s in said)
    steps = [s for s in said if re.search(r"step \d/6, \d/6 steps in all, ETA \d:\d\d:\d\d", s)]
    assert steps, said
    assert progress.line() is None  # no progress line outlives the run


def test_no_plan_outlives_a_run_stopped_or_failed(data, tmp_path):
    from flyp.recipe import load_recipe
    from flyp.train import finetune

    overrides = ["model.spec=tiny", "train.batch_size=6", "data.benchmark=folders"]
    overrides += [f"data.root={data}", "data.ood_domains=[sketch]", "train.stop_after_steps=2"]
    finetune(load_recipe(None, overrides), tmp_path / "r")
    assert progress.line() is None


def test_compare_plans_every_run_and_a_rerun_says_what_it_reuses(data, tmp_path, capsys):
    argv = ["compare", "--data", str(data), "--id-domain", "photo", *TINY, "--set", "train.epochs=1"]
    argv += ["--methods", "zeroshot", "lp", "ft", "--seeds", "0", "1", "--no-wise"]
    argv += ["--out", str(tmp_path / "c")]
    assert main(argv) == 0
    said = _said(capsys.readouterr().err)
    # zeroshot once, lp on seed 0 (copied to seed 1), ft on both seeds: 3 steps each
    assert "plan: 4 runs (1 seed-free copy of the first seed), 6 training steps (batch 6)" in " ".join(said), said
    assert main(argv) == 0
    said = _said(capsys.readouterr().err)
    assert any("plan: 0 runs (5 of 5 finished and reused), 0 training steps" in s for s in said)
    assert progress.line() is None


def test_quick_sizes_the_run_and_a_set_of_the_same_key_wins(data, tmp_path, capsys):
    run = tmp_path / "q"
    argv = ["finetune", "--data", str(data), "--id-domain", "photo", "--quick", *TINY]
    argv += ["--set", "model.image_size=24", "--out", str(run)]
    assert main(argv) == 0
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["train"]["epochs"] == 3 and saved["data"]["max_eval"] == 300
    assert saved["eval"]["wise_alphas"] == [0, 0.5, 1] and saved["model"]["image_size"] == 24


@pytest.mark.parametrize(
    "folder, fitting",
    [("cifar10", "generic"), ("my_flowers", "flowers102"), ("PACS_copy", "pacs")],
)
def test_the_template_hint_names_a_set_that_fits_the_data(folder, fitting, tmp_path):
    root = tmp_path / folder
    recipe = load_recipe(None, [f"name={folder}", "data.benchmark=folders", f"data.root={root}"])
    hint = _data_choices(recipe)
    assert f"--set data.templates={fitting}," in hint


def test_progress_lines_name_evaluation_and_decoding_and_the_eta_counts_both(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_start_beat", lambda: None)  # lines read here, not printed
    progress.plan(1, 10, 2, 200, batch_size=10)
    try:
        assert progress.line() == "working (last: starting), 0/10 steps in all, ETA after the first steps"
        progress.working("decoding images 64/100")
        assert progress.line().startswith("decoding images 64/100, 0/10 steps in all")
        state = progress._state
        state.step_seconds, state.steps_timed, state.steps_done = 4.0, 2, 2  # 2 s a step
        state.eval_seconds, state.eval_timed, state.eval_done = 1.0, 100, 100  # 10 ms an image
        progress.images("val", 100, 100, 0)
        # 8 steps x 2 s + 100 images x ~10 ms left
        assert re.fullmatch(r"evaluating val 100/100 images, 2/10 steps in all, ETA 0:00:17", progress.line())
        progress.idle()
        assert progress.line().startswith("working (last: evaluating val 100/100 images)")
    finally:
        progress.done()
    assert progress.line() is None


def test_quick_is_refused_on_a_resume(tmp_path, capsys):
    assert main(["finetune", "--resume", str(tmp_path / "run"), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop --quick" in err[0], err
