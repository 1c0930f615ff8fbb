"""The front door, pinned: `flyp --help`, `--version`, every verb's `--help`, and what a broad
set of bad inputs across every verb prints and exits with, compared byte for byte with
tests/golden/cli.json (written from the code before src/flyp/cli.py became a package).

Each case runs ``flyp.cli.main`` in-process in a fresh folder, with an 80-column terminal; the
folder's path is written as <TMP>, the version as <VERSION>, a progress line's time of day as
HH:MM:SS. A change to a help text or a message on purpose is recorded by regenerating the file:
``FLYP_REGEN_GOLDEN=1 pytest tests/test_cli_pinned.py`` (then read the diff). Help and usage
errors are argparse's rendering, which differs between Python versions: those cases are
compared on the Python the file was written with only.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from flyp.cli import build_parser, main

GOLDEN = Path(__file__).parent / "golden" / "cli.json"
PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
CLOCK = re.compile(r"^\d\d:\d\d:\d\d ", re.MULTILINE)


def _verbs() -> list[str]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a.choices, dict)]
    return list(sub.choices)


def _files(tmp: Path) -> None:
    """What the bad-input cases point at: a recipe, an empty folder, a killed run (recipe.yaml
    only), a finished one (recipe.yaml and metrics.json), a weights file, an image, text files."""
    (tmp / "r.yaml").write_text("name: r\n")
    (tmp / "empty").mkdir()
    for run in ("killed", "finished"):
        (tmp / run).mkdir()
        (tmp / run / "recipe.yaml").write_text("name: r\n")
    (tmp / "finished" / "metrics.json").write_text('{"sets": {"photo": {"accuracy": 0.5}}}\n')
    (tmp / "w.safetensors").write_bytes(b"not weights")
    (tmp / "img.png").write_bytes(b"not an image")
    (tmp / "blank.txt").write_text("\n\n")
    (tmp / "templates.txt").write_text("a photo of a {}.\n")
    (tmp / "no_path.csv").write_text("file,label\na.png,cat\n")


# (id, argv, produced by argparse): argv words are formatted with {t}, the case's folder.
HELP = [
    ("top-help", ["--help"]),
    ("top-version", ["--version"]),
    ("no-verb", []),
] + [(f"help-{verb}", [verb, "--help"]) for verb in _verbs()]

PARSER_ERRORS = [
    ("unknown-verb", ["flpy"]),
    ("finetune-unknown-option", ["finetune", "r.yaml", "--bogus"]),
    ("compare-seeds-not-int", ["compare", "r.yaml", "--seeds", "x"]),
    ("compare-methods-empty", ["compare", "r.yaml", "--methods"]),
    ("report-nothing", ["report"]),
    ("report-no-out", ["report", "runs"]),
    ("export-no-format", ["export", "finished", "--out", "o"]),
    ("export-no-out", ["export", "finished", "--format", "hf"]),
    ("predict-no-images", ["predict", "finished"]),
    ("predict-precision-choice", ["predict", "finished", "img.png", "--precision", "fp16"]),
    ("predict-top-k-not-int", ["predict", "finished", "img.png", "--top-k", "x"]),
    ("wise-alphas-not-float", ["wise", "finished", "--alphas", "x"]),
    ("evaluate-no-target", ["evaluate"]),
    ("data-two-recipes", ["data", "r.yaml", "r.yaml"]),
]

ERRORS = [
    # finetune
    ("finetune-nothing", ["finetune"]),
    ("finetune-resume-quick", ["finetune", "--resume", "killed", "--quick"]),
    ("finetune-resume-with-out", ["finetune", "--resume", "killed", "--out", "x"]),
    ("finetune-resume-with-recipe", ["finetune", "r.yaml", "--resume", "killed"]),
    ("finetune-resume-missing", ["finetune", "--resume", "{t}/nope"]),
    ("finetune-resume-not-a-run", ["finetune", "--resume", "{t}/empty"]),
    (
        "finetune-resume-changes-lr",
        ["finetune", "--resume", "killed", "--set", "train.lr=0.5"],
    ),
    ("finetune-id-domain-without-data", ["finetune", "r.yaml", "--id-domain", "photo"]),
    ("finetune-data-missing", ["finetune", "--data", "{t}/nope"]),
    ("finetune-data-is-a-file", ["finetune", "--data", "{t}/r.yaml"]),
    ("finetune-set-unknown-key", ["finetune", "r.yaml", "--set", "train.learning_rate=1"]),
    ("finetune-set-misspelt-method", ["finetune", "r.yaml", "--set", "train.method=fyp"]),
    ("finetune-set-no-equals", ["finetune", "r.yaml", "--set", "train.lr"]),
    ("finetune-set-bad-type", ["finetune", "r.yaml", "--set", "train.epochs=five"]),
    ("finetune-recipe-missing", ["finetune", "{t}/nope.yaml"]),
    ("finetune-out-is-the-recipe", ["finetune", "r.yaml", "--out", "{t}/r.yaml"]),
    # compare
    ("compare-nothing", ["compare"]),
    ("compare-misspelt-method", ["compare", "r.yaml", "--methods", "flpy"]),
    ("compare-method-twice", ["compare", "r.yaml", "--methods", "ft", "ft"]),
    ("compare-seed-twice", ["compare", "r.yaml", "--seeds", "0", "0"]),
    ("compare-bad-sweep", ["compare", "r.yaml", "--sweep", "train.lr"]),
    ("compare-stock-one-seed", ["compare", "r.yaml", "--methods", "ft", "--stock"]),
    ("compare-out-is-the-recipe", ["compare", "r.yaml", "--out", "r.yaml"]),
    ("compare-ood-without-data", ["compare", "r.yaml", "--ood-domains", "art"]),
    # sweep
    ("sweep-no-grid", ["sweep", "r.yaml"]),
    ("sweep-nothing", ["sweep", "--grid", "train.lr=1e-5,1e-4"]),
    ("sweep-grid-without-equals", ["sweep", "r.yaml", "--grid", "train.lr"]),
    ("sweep-grid-of-the-seed", ["sweep", "r.yaml", "--grid", "train.seed=0,1"]),
    ("sweep-data-missing", ["sweep", "--data", "{t}/nope", "--grid", "train.lr=1e-5,1e-4"]),
    # data
    ("data-nothing", ["data"]),
    ("data-data-missing", ["data", "--data", "{t}/nope"]),
    ("data-set-unknown-key", ["data", "r.yaml", "--set", "data.rootz=x"]),
    ("data-set-bad-value", ["data", "r.yaml", "--set", "data.roots=x"]),
    # evaluate
    ("evaluate-missing", ["evaluate", "{t}/nope"]),
    ("evaluate-not-a-run", ["evaluate", "{t}/empty"]),
    ("evaluate-weights-without-recipe", ["evaluate", "{t}/w.safetensors"]),
    ("evaluate-unfinished", ["evaluate", "killed"]),
    # report
    ("report-missing", ["report", "{t}/nope", "--out", "o"]),
    ("report-no-finished-runs", ["report", "{t}/empty", "--out", "o"]),
    # wise
    ("wise-missing", ["wise", "{t}/nope"]),
    ("wise-not-a-run", ["wise", "{t}/empty"]),
    ("wise-unfinished", ["wise", "killed"]),
    ("wise-alpha-out-of-range", ["wise", "finished", "--alphas", "0.5", "1.5"]),
    ("wise-alpha-twice", ["wise", "finished", "--alphas", "0.5", "0.5"]),
    ("wise-bad-keep", ["wise", "finished", "--keep", "2"]),
    ("wise-other-settings", ["wise", "finished", "--set", "train.lr=0.5"]),
    # export
    ("export-missing", ["export", "{t}/nope", "--format", "hf", "--out", "o"]),
    ("export-bad-format", ["export", "finished", "--format", "onnx", "--out", "o"]),
    # predict
    ("predict-classes-twice", ["predict", "finished", "img.png", "--classes", "a", "--classes-file", "f"]),
    ("predict-top-k-zero", ["predict", "finished", "img.png", "--top-k", "0"]),
    ("predict-batch-size-zero", ["predict", "finished", "img.png", "--batch-size", "0"]),
    ("predict-classes-file-missing", ["predict", "finished", "img.png", "--classes-file", "{t}/nope.txt"]),
    ("predict-classes-file-empty", ["predict", "finished", "img.png", "--classes-file", "blank.txt"]),
    ("predict-templates-without-classes", ["predict", "finished", "img.png", "--templates-file", "templates.txt"]),
    ("predict-csv-without-path", ["predict", "finished", "no_path.csv"]),
    ("predict-missing-run", ["predict", "{t}/nope", "img.png"]),
]

CASES = (
    [(i, a, True) for i, a in HELP + PARSER_ERRORS]
    + [(i, a, False) for i, a in ERRORS]
)


def _stable(text: str, tmp: Path) -> str:
    for path in {str(tmp.resolve()), str(tmp)}:
        text = text.replace(path, "<TMP>")
    try:
        text = text.replace(f"flyp {version('flyp')}", "flyp <VERSION>")
    except PackageNotFoundError:
        pass
    return CLOCK.sub("HH:MM:SS ", text)


def run_case(argv: list[str], tmp: Path) -> dict:
    """``flyp ARGV`` in-process in ``tmp``: its exit status, stdout and stderr (as lines)."""
    argv = [a.format(t=tmp) for a in argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit:  # --help, --version and argparse's usage errors
            code = exit.code
    return {
        "exit": code,
        "stdout": _stable(out.getvalue(), tmp).split("\n"),
        "stderr": _stable(err.getvalue(), tmp).split("\n"),
    }


def _run_all(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("LINES", "24")
    results = {}
    for case_id, argv, _ in CASES:
        tmp = root / case_id
        tmp.mkdir()
        _files(tmp)
        monkeypatch.chdir(tmp)
        results[case_id] = {"argv": argv, **run_case(argv, tmp)}
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    with pytest.MonkeyPatch.context() as monkeypatch:
        found = _run_all(tmp_path_factory.mktemp("pinned"), monkeypatch)
    if os.environ.get("FLYP_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"python": PYTHON, "cases": found}, indent=1) + "\n")
    return found


@pytest.fixture(scope="module")
def golden(results) -> dict:  # after results: a regeneration writes the file first
    return json.loads(GOLDEN.read_text())


def test_the_golden_file_covers_every_verb_and_every_case(golden):
    cases = golden["cases"]
    assert [i for i, _, _ in CASES] == list(cases), "regenerate: FLYP_REGEN_GOLDEN=1 pytest ..."
    assert len(ERRORS) + len(PARSER_ERRORS) >= 30
    for verb in _verbs():
        assert f"help-{verb}" in cases
        assert any(c["argv"][:1] == [verb] and c["exit"] == 2 for c in cases.values()), verb


@pytest.mark.parametrize("case_id,argv,by_argparse", CASES, ids=[c[0] for c in CASES])
def test_the_front_door_is_unchanged(case_id, argv, by_argparse, golden, results):
    if by_argparse and golden["python"] != PYTHON:
        pytest.skip(f"argparse's rendering was pinned on Python {golden['python']}, not {PYTHON}")
    want, got = golden["cases"][case_id], results[case_id]
    assert got["argv"] == want["argv"]
    assert "\n".join(got["stderr"]) == "\n".join(want["stderr"])
    assert "\n".join(got["stdout"]) == "\n".join(want["stdout"])
    assert got["exit"] == want["exit"]


def test_the_entry_points_answer_as_main_does(golden, tmp_path):
    """`python -m flyp` and the installed `flyp` script's target (flyp.cli:main) are the same
    front door: the top help through a fresh process matches the pinned one."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "flyp"]
    assert script.value == "flyp.cli:main" and script.load() is main
    env = {**os.environ, "COLUMNS": "80", "LINES": "24"}
    done = subprocess.run(
        [sys.executable, "-m", "flyp", "--help"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    if golden["python"] == PYTHON:
        assert done.stdout.split("\n") == golden["cases"]["top-help"]["stdout"]
