"""Disk and reuse in a comparison (issue 23, item 4): no WiSE-FT model unless one is asked to be
kept, a seed-free run stored once, a greedy soup that is the uniform one stated and stored once,
and a rerun that says what it reused and leaves finished soups in place."""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

import pytest

import flyp.compare as compare_mod
from fakes import error_lines, make_domains, tiny_overrides
from flyp.cli import main
from flyp.predict import load_classifier


def _argv(tmp: Path, root: Path, out: Path) -> list[str]:
    extra = ("train.epochs=1", "eval.wise_alphas=[0, 0.5, 1]")
    sets = [f"--set={o}" for o in tiny_overrides(root, *extra)]
    argv = ["compare", str(tmp / "r.yaml"), *sets, "--methods", "zeroshot", "lp", "ft"]
    return [*argv, "--seeds", "0", "1", "--soups", "--out", str(out)]


def _said(err: str) -> list[str]:
    return [line[9:] for line in err.splitlines() if line[:2].isdigit()]


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """A comparison in which every candidate scores the same on ID validation, so the greedy
    soup keeps every run: it is the uniform soup. Then the same command again."""
    tmp = tmp_path_factory.mktemp("disk")
    root = make_domains(tmp / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], 8)
    (tmp / "r.yaml").write_text("name: r\n")
    out = tmp / "cmp"
    argv = _argv(tmp, root, out)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYP_CACHE", str(tmp / "cache"))
        mp.setattr(compare_mod, "validation_score", lambda classifier, exp: 0.5)
        capture = tmp / "first.err"  # progress lines (stderr): capsys is per test
        with open(capture, "w") as err, contextlib.redirect_stderr(err):
            assert main(argv) == 0
        soup = out / "soups" / "ft-soup-uniform"
        before = {p.name: p.stat().st_mtime_ns for p in soup.iterdir()}
        with open(tmp / "again.err", "w") as err, contextlib.redirect_stderr(err):
            assert main(argv) == 0
    return out, capture.read_text(), (tmp / "again.err").read_text(), before


def test_no_wise_model_is_written_unless_kept(compared):
    out, *_ = compared
    for run in ("lp-s0", "lp-s1", "ft-s0", "ft-s1"):
        wise = json.loads((out / run / "wise.json").read_text())
        assert wise["best_alpha"] in (0, 0.5, 1) and len(wise["points"]) == 3
        assert "model" not in wise and not (out / run / "wise-model").exists(), run


def test_a_seed_free_run_is_stored_once(compared):
    out, *_ = compared
    for name in ("model.safetensors", "probe.json"):
        first, second = (out / "lp-s0" / name).stat(), (out / "lp-s1" / name).stat()
        assert (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino), name
    metrics = [json.loads((out / f"lp-s{s}" / "metrics.json").read_text()) for s in (0, 1)]
    assert [m["seed"] for m in metrics] == [0, 1] and metrics[1]["same_as"] == str(out / "lp-s0")
    assert (out / "lp-s0" / "metrics.json").stat().st_ino != (out / "lp-s1" / "metrics.json").stat().st_ino


def test_a_greedy_soup_of_every_run_is_the_uniform_soup_said_once(compared):
    out, first, *_ = compared
    assert not (out / "soups" / "ft-soup-greedy").exists()
    soup = json.loads((out / "soups" / "ft-soup-uniform" / "metrics.json").read_text())
    assert soup["method"] == "ft soup (uniform = greedy)" and soup["is_also"] == ["greedy"]
    assert "ft soups: the greedy soup kept all 2 runs: it is the uniform soup (greedy = uniform), stored once" in _said(first)
    report = (out / "report.md").read_text()
    rows = [line.split("|")[1].strip() for line in report.splitlines() if line.startswith("| ft")]
    assert "ft soup (uniform = greedy)" in rows and "ft soup (greedy)" not in rows
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"zeroshot", "lp", "ft", "ft soup (uniform = greedy)"}


def test_a_rerun_says_what_it_reused_and_leaves_the_soup_in_place(compared):
    out, _, again, before = compared
    said = _said(again)
    assert "reused 5 finished runs (zeroshot, lp-s0, ft-s0, lp-s1, ft-s1); 4 finished WiSE-FT sweeps (lp-s0, ft-s0, lp-s1, ft-s1)" in said
    assert f"ft soups: reused {out / 'soups' / 'ft-soup-uniform'} (finished over the same runs)" in said
    work = [line for line in said if re.search(r"training \d+ epoch|evaluating ", line)]
    assert not work, said  # the plan line ("0 training steps") is no work
    soup = out / "soups" / "ft-soup-uniform"
    assert {p.name: p.stat().st_mtime_ns for p in soup.iterdir()} == before


def test_flyp_wise_keep_writes_the_model_without_evaluating_the_sweep_again(compared, tmp_path, capsys):
    out, *_ = compared
    run = out / "ft-s1"
    assert main(["wise", str(run), "--keep", "0.5"]) == 0
    captured = capsys.readouterr()
    assert "evaluating" not in captured.err  # α=0.5 is in wise.json already
    assert f"model at alpha 0.5: {run / 'wise-model'}" in captured.out
    assert load_classifier(run / "wise-model").metadata["merge"] == {"kind": "wise-ft", "alpha": 0.5}
    wise = json.loads((run / "wise.json").read_text())
    assert wise["model"] == str(run / "wise-model") and wise["kept_alpha"] == 0.5
    kept = json.loads((run / "wise-model" / "metrics.json").read_text())
    point = next(p for p in wise["points"] if p["alpha"] == 0.5)
    assert kept["ood_mean"] == point["ood_mean"] and kept["sets"] == point["sets"]
    # the report still has one row per run, none for the kept model
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    assert not any("WiSE" in m for m in json.loads((tmp_path / "rep" / "results.json").read_text())["methods"])
    assert main(["wise", str(run), "--keep", "2"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert line == "error: --keep 2: give best or an alpha in [0, 1], e.g. --keep 0.5"
    assert os.path.isdir(run / "wise-model")
