"""What a new user meets at the command line: help with defaults, a fast --help and --version,
a quiet end when the reader of stdout goes away, Ctrl-C, progress off a terminal, what
`--data` and a short run choose for them, and a figure legend that shows what is drawn."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import flyp.train as train_mod
from fakes import error_lines, make_domains, tiny_overrides
from flyp import tracking
from flyp.cli import build_parser, main
from flyp.train import warmup_cosine

PROGRESS = re.compile(r"^\d\d:\d\d:\d\d ")  # a progress line starts with the time of day


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


def _tiny(tree: Path, *extra: str) -> list[str]:
    return [arg for item in tiny_overrides(tree, *extra) for arg in ("--set", item)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_domains(
        tmp_path_factory.mktemp("tree"), ["photo", "art", "sketch"], ["dog", "horse", "house"], 12
    )


@pytest.fixture
def recipe_file(tmp_path) -> str:
    path = tmp_path / "r.yaml"
    path.write_text("name: r\n")
    return str(path)


# --- 1. help, --version, import time, a closed pipe ------------------------------------------


def _verbs() -> dict:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    return sub.choices


def test_every_option_of_every_verb_has_help_that_shows_its_default():
    """Each argument has help text; each one that is not required says its default."""
    for verb, parser in _verbs().items():
        formatter = parser.formatter_class(parser.prog)
        for action in parser._actions:
            if action.dest == "help":
                continue
            name = f"flyp {verb} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{name} has no help text"
            if action.required or action.nargs == "+":
                continue
            assert "(default: " in formatter._get_help_string(action), f"{name} shows no default"


def test_help_shows_defaults_through_the_cli(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["compare", "--help"])
    assert exit.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: zeroshot lp ft lpft l2sp flyp)" in shown
    assert "--seeds SEEDS [SEEDS ...] training seeds; each method per seed (default: 0)" in shown
    assert "--soups also uniform and greedy soups over the seeds (default: off)" in shown
    assert "(default: runs/<recipe>-compare)" in shown


def test_version_prints_the_installed_package_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"flyp {importlib.metadata.version('flyp')}\n"


def test_help_and_version_import_no_torch():
    """`flyp --help`, `flyp VERB --help` and `flyp --version` answer without importing torch
    (8.6 s before; the verbs import what they need when they run)."""
    code = (
        "import sys\n"
        "from flyp.cli import main\n"
        "for argv in (['--help'], ['finetune', '--help'], ['predict', '--help'], ['--version']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, argv\n"
        "print('torch imported:', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "torch imported: False"
    assert "usage: flyp predict" in done.stdout


def _with_closed_stdout(argv: list[str], unbuffered: bool) -> subprocess.CompletedProcess:
    """Run `python -m flyp ARGV` with stdout a pipe whose reader has already gone (`| head`):
    block-buffered, as a pipe is by default (the error comes when the output is flushed), or
    unbuffered (PYTHONUNBUFFERED: it comes from the first print)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "flyp", *argv],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            env={**env, "HF_HUB_OFFLINE": "1"},
        )
    finally:
        os.close(write)


@pytest.mark.parametrize(
    "argv, unbuffered",
    [
        (["--help"], False),
        (["data", "--data", "TREE", "--id-domain", "photo"], False),
        (["data", "--data", "TREE", "--id-domain", "photo"], True),
    ],
    ids=["help", "data", "data-unbuffered"],
)
def test_output_cut_short_by_its_reader_ends_quietly(argv, unbuffered, tree):
    """`flyp data ... | head`: no BrokenPipeError traceback, exit status 141 (128 + SIGPIPE)."""
    done = _with_closed_stdout([str(tree) if a == "TREE" else a for a in argv], unbuffered)
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert done.returncode == 141


# --- 2. Ctrl-C ----------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, call: int) -> None:
    """Ctrl-C during the ``call``-th training step (counted from 1)."""
    real, calls = train_mod.forward_backward, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "forward_backward", step)


def test_ctrl_c_in_finetune_says_what_was_kept_and_the_resume_command(
    tree, recipe_file, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "my run"  # a space: the command must come back quoted
    argv = ["finetune", recipe_file, *_tiny(tree, "train.checkpoint_every=2"), "--out", str(run)]
    _interrupt_at(monkeypatch, 6)  # 3 steps an epoch: the last checkpoint is at step 4
    assert main(argv) == 130
    err = error_lines(capsys.readouterr().err)
    resume = f"flyp finetune --resume {shlex.quote(str(run))}"
    assert err == [f"interrupted: kept {shlex.quote(str(run))} at its last checkpoint (step 4); resume with: {resume}"]
    # the printed command finishes the run (the Ctrl-C was one step, now past)
    assert main(shlex.split(resume)[1:]) == 0
    assert json.loads((run / "metrics.json").read_text())["sets"]


def test_ctrl_c_before_the_first_checkpoint_keeps_nothing_and_says_so(
    tree, recipe_file, tmp_path, monkeypatch, capsys
):
    run = tmp_path / "run"
    _interrupt_at(monkeypatch, 2)
    assert main(["finetune", recipe_file, *_tiny(tree), "--out", str(run)]) == 130
    err = error_lines(capsys.readouterr().err)
    assert err == [
        "interrupted: nothing was kept (no checkpoint yet); start it again with the same command"
    ]
    assert not run.exists()


def test_ctrl_c_in_compare_says_what_was_kept_and_the_command_that_continues(
    tree, recipe_file, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "cmp"
    argv = ["compare", recipe_file, *_tiny(tree, "train.checkpoint_every=2")]
    argv += ["--methods", "zeroshot", "ft", "--no-wise", "--out", str(out)]
    _interrupt_at(monkeypatch, 5)
    assert main(argv) == 130
    err = error_lines(capsys.readouterr().err)
    again = shlex.join(["flyp", *argv])
    assert err == [
        f"interrupted: kept 1 finished run in {out} and ft-s0 at its last checkpoint; "
        f"continue with the same command: {again}"
    ]
    assert main(shlex.split(again)[1:]) == 0
    assert (out / "report.md").is_file() and (out / "ft-s0" / "metrics.json").is_file()


# --- 3. progress: plain lines off a terminal, named bars on one ---------------------------------


def test_off_a_terminal_finetune_logs_one_line_per_phase_and_epoch(
    tree, recipe_file, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(["finetune", recipe_file, *_tiny(tree), "--out", str(run)]) == 0
    err = _lines(capsys.readouterr().err)
    assert all(PROGRESS.match(line) for line in err), err  # plain lines, no bar
    said = [line[9:] for line in err]
    assert "flyp seed 0: training 3 epochs of 3 steps (batch 6, lr 0.003 after 2 warmup steps)" in said
    epochs = [line for line in said if re.match(r"flyp seed 0: epoch \d/3 ", line)]
    assert [line.split()[4] for line in epochs] == ["1/3", "2/3", "3/3"]
    for line in epochs:
        assert re.fullmatch(
            r"flyp seed 0: epoch \d/3  loss \d+\.\d{4}  \d+\.\d images/s  elapsed 0:00:\d\d", line
        ), line
    for name in ("val", "photo", "art", "sketch"):
        assert any(re.fullmatch(rf"flyp seed 0: evaluating {name} \(\d+ images\)", s) for s in said)


def test_off_a_terminal_compare_logs_wise_soups_and_report(tree, recipe_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", recipe_file, *_tiny(tree, "eval.wise_alphas=[0, 0.5, 1]", "train.epochs=1")]
    assert main([*argv, "--methods", "ft", "--seeds", "0", "1", "--soups", "--out", str(out)]) == 0
    said = [line[9:] for line in _lines(capsys.readouterr().err)]
    assert "zeroshot seed 0: evaluating val (9 images)" in said
    assert "ft seed 1 WiSE α=0.5: evaluating sketch (36 images)" in said
    assert any(line.startswith("ft soups: evaluating val") for line in said)
    assert said[-1] == f"report: writing {out / 'report.md'}"


def test_on_a_terminal_progress_bars_name_method_seed_and_set(
    tree, recipe_file, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(tracking, "on_terminal", lambda: True)
    assert main(["finetune", recipe_file, *_tiny(tree), "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "flyp seed 0: epoch 2/3" in err and "flyp seed 0: eval sketch" in err
    assert "images/s  elapsed" not in err  # the bars say it; no plain lines


# --- 4. what --data and a short run choose ------------------------------------------------------


def test_data_without_a_recipe_says_what_it_chose_and_how_to_change_it(tree, tmp_path, capsys):
    argv = ["finetune", "--data", str(tree), "--id-domain", "photo", "--model", "tiny"]
    argv += ["--set", "train.batch_size=6", "--set", "train.epochs=1", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    said = [line[9:] for line in _lines(capsys.readouterr().err)]
    (line,) = [s for s in said if s.startswith("--data without a recipe:")]
    assert "image size the model's own" in line and "1 prompt template ('a photo of a {}.')" in line
    assert "1 epoch," in line and "WiSE-FT" not in line  # finetune sweeps no alphas
    assert "--set model.image_size=160" in line and "or pass a recipe" in line


def test_a_recipe_with_data_says_nothing_about_defaults(tree, recipe_file, tmp_path, capsys):
    argv = ["finetune", recipe_file, "--data", str(tree), "--id-domain", "photo"]
    argv += _tiny(tree, "train.epochs=1") + ["--out", str(tmp_path / "b")]
    assert main(argv) == 0
    assert "--data without a recipe" not in capsys.readouterr().err


def test_a_warmup_longer_than_half_the_run_is_capped_so_the_run_reaches_its_lr(
    tree, recipe_file, tmp_path, capsys
):
    """train.warmup_steps=20 in a 9-step run: warmup over 4 steps, the schedule reaches
    train.lr, and a line says so (on a terminal too)."""
    run = tmp_path / "run"
    argv = ["finetune", recipe_file, *_tiny(tree, "train.warmup_steps=20", "train.select_on=last")]
    assert main([*argv, "--out", str(run)]) == 0
    lrs = [r["lr"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "lr" in r]
    # "lr" is the rate after each step: (k + 1) / 4 of 3e-3 up to step 3, then the cosine to 0
    assert lrs[:3] == pytest.approx([3e-3 * 2 / 4, 3e-3 * 3 / 4, 3e-3])
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] == pytest.approx(0.0, abs=1e-12)
    said = [line[9:] for line in _lines(capsys.readouterr().err)]
    assert (
        "flyp seed 0: train.warmup_steps=20 is more than half of this run's 9 steps; warming up "
        "over 4 so that it reaches train.lr=0.003 (set train.warmup_steps to choose)"
    ) in said


def test_the_readme_quick_example_reaches_its_learning_rate():
    """14 steps with the default 20 warmup steps peaked at 0.75 of train.lr; now at 1.0. A
    warmup of at most half the run (the shipped recipes) is as it was."""
    assert max(map(warmup_cosine(20, 14), range(14))) == 1.0
    assert [warmup_cosine(20, 60)(s) for s in (0, 9, 19)] == [1 / 20, 10 / 20, 1.0]


# --- 5. the figure's legend ---------------------------------------------------------------------


def test_every_legend_entry_shows_the_marker_drawn_for_it(tree, recipe_file, tmp_path):
    """Soups (no spread over seeds) and methods: each legend handle has the marker, colours and
    no error bars of the point drawn under its label, and every labelled point is in it."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    from flyp.report import figure

    out = tmp_path / "cmp"
    argv = ["compare", recipe_file, *_tiny(tree, "eval.wise_alphas=[0, 1]", "train.epochs=1")]
    with contextlib.redirect_stderr(io.StringIO()):
        argv += ["--methods", "lp", "ft", "--seeds", "0", "1", "--soups", "--out", str(out)]
        assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    fig = figure(results, "t")
    try:
        (legend,) = fig.legends
        drawn = {
            line.get_label(): line
            for line in fig.axes[0].get_lines()
            if not line.get_label().startswith("_")
        }
        labels = [t.get_text() for t in legend.get_texts()]
        assert sorted(labels) == sorted(drawn)
        assert {"zero-shot", "ft", "lp"} <= set(labels)
        soups = {"ft soup (uniform)", "ft soup (greedy)"}  # or one: greedy kept every run
        assert soups <= set(labels) or "ft soup (uniform = greedy)" in labels
        for handle, label in zip(legend.legend_handles, labels, strict=True):
            point = drawn[label]
            assert isinstance(handle, Line2D), (label, handle)  # a marker, not error bars
            assert handle.get_marker() == point.get_marker(), label
            assert handle.get_linestyle() == point.get_linestyle() == "None", label
            assert handle.get_markerfacecolor() == point.get_markerfacecolor(), label
            assert handle.get_markeredgecolor() == point.get_markeredgecolor(), label
    finally:
        plt.close(fig)
