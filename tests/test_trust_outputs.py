"""No silent wrong number, the output side: an output path never destroys an input or a run's
files, names from folders, CSVs and weights metadata cannot inject into terminals, CSV files or
reports, tampered metadata and bad templates are refused with their field or line, unfinished
runs and indistinguishable class names are refused, and a comparison folder is named as one."""

from __future__ import annotations

import csv
import json
import re
import shutil
from itertools import groupby
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from fakes import make_domains, tiny_overrides
from flyp.checkpoint import METADATA_KEY, read_metadata
from flyp.cli import main
from flyp.data import templates as tpl
from flyp.outputs import OutputError, check_output, csv_cell, md_cell
from flyp.recipe import load_recipe
from flyp.train import finetune

CLASSES = ["dog", "horse", "house"]
HOSTILE_DOMAIN = "sk|etch <img src=x onerror=alert(1)>"
MATH_DOMAIN = r"$\nocommand{$"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A finished flyp and ft run, a killed flyp run, and a zeroshot run whose OOD domains have
    hostile folder names (tiny model)."""
    base = tmp_path_factory.mktemp("outputs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYP_CACHE", str(base / "cache"))
        root = make_domains(base / "data", ["photo", "art", "sketch"], CLASSES, per_class=12)
        for method in ("flyp", "ft"):
            finetune(load_recipe(None, tiny_overrides(root, f"train.method={method}")), base / method)
        killed = tiny_overrides(root, "train.stop_after_steps=4")  # after epoch 1's selection
        finetune(load_recipe(None, killed), base / "killed")
        hostile = make_domains(
            base / "hostile", ["photo", HOSTILE_DOMAIN, MATH_DOMAIN], CLASSES, per_class=8
        )
        overrides = [
            *tiny_overrides(hostile, "train.method=zeroshot"),
            f"data.ood_domains={json.dumps([HOSTILE_DOMAIN, MATH_DOMAIN])}",
        ]
        finetune(load_recipe(None, overrides), base / "hostile-run")
    return base


@pytest.fixture
def image(runs) -> Path:
    return runs / "data" / "photo" / "dog" / "000.png"


def _error(capsys) -> str:
    """The one error line on stderr (progress notes may come before it)."""
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


def _retag(src: Path, dst: Path, meta, tensors=None) -> Path:
    """A copy of a weights file with its flyp metadata (and optionally tensors) replaced."""
    state = load_file(str(src)) if tensors is None else tensors
    save_file(state, str(dst), metadata={METADATA_KEY: json.dumps(meta)})
    return dst


# ---- 1. a file lost: output targets -------------------------------------------------------


def test_predict_out_naming_the_input_csv_is_refused_and_the_csv_kept(runs, image, tmp_path, capsys):
    listing = tmp_path / "list.csv"
    listing.write_text(f"path\n{image}\n")
    before = listing.read_bytes()
    assert main(["predict", str(runs / "flyp"), str(listing), "--out", str(listing)]) == 2
    assert "would overwrite the input" in _error(capsys)
    assert listing.read_bytes() == before
    link = tmp_path / "link.csv"  # the same file through a symlink
    link.symlink_to(listing)
    assert main(["predict", str(runs / "flyp"), str(listing), "--out", str(link)]) == 2
    assert f"would overwrite the input {listing}" in _error(capsys)
    assert listing.read_bytes() == before


@pytest.mark.parametrize("name", ["model.safetensors", "metrics.json", "recipe.yaml", "log.jsonl"])
def test_predict_out_inside_a_runs_own_files_is_refused(runs, image, name, tmp_path, capsys):
    """`predict RUN img --out RUN/model.safetensors` would have replaced the trained weights."""
    run = tmp_path / "run"
    shutil.copytree(runs / "flyp", run)
    before = (run / name).read_bytes()
    assert main(["predict", str(runs / "flyp"), str(image), "--out", str(run / name)]) == 2
    err = _error(capsys)
    assert f"would overwrite {name} of the run directory {run}" in err
    assert (run / name).read_bytes() == before


def test_evaluate_out_is_checked_before_any_work(runs, tmp_path, capsys, monkeypatch):
    """An existing folder, the run's metrics.json or its recipe (an input) as `evaluate --out`
    is refused before the evaluation starts, not after it."""
    import flyp.experiment

    def no_work(*_a, **_k):
        raise AssertionError("evaluation started before --out was checked")

    monkeypatch.setattr(flyp.experiment, "prepare", no_work)
    run = tmp_path / "run"
    shutil.copytree(runs / "flyp", run)
    folder = tmp_path / "folder"
    folder.mkdir()
    assert main(["evaluate", str(run), "--out", str(folder)]) == 2
    assert f"--out {folder} is a folder; pass a file name" in _error(capsys)
    before = (run / "metrics.json").read_bytes()
    assert main(["evaluate", str(run), "--out", str(run / "metrics.json")]) == 2
    assert "would overwrite" in _error(capsys)
    assert (run / "metrics.json").read_bytes() == before
    weights = run / "model.safetensors"
    args = ["evaluate", str(weights), "--recipe", str(run / "recipe.yaml")]
    assert main([*args, "--out", str(run / "recipe.yaml")]) == 2
    assert "would overwrite the input" in _error(capsys)


def test_export_out_naming_the_run_or_its_weights_is_refused(runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "flyp", run)
    for out in (run, run / "model.safetensors"):
        assert main(["export", str(run), "--format", "flyp", "--out", str(out)]) == 2
        assert f"--out {out}" in _error(capsys)
    assert (run / "model.safetensors").read_bytes() == (runs / "flyp/model.safetensors").read_bytes()


def test_compare_out_naming_its_data_folder_is_refused(runs, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(runs / "data", data)
    before = sorted(p.name for p in data.iterdir())
    args = ["compare", "--data", str(data), "--id-domain", "photo", "--model", "tiny"]
    assert main([*args, "--methods", "zeroshot", "--out", str(data)]) == 2
    assert f"would overwrite the input {data}" in _error(capsys)
    assert sorted(p.name for p in data.iterdir()) == before


def test_check_output_refuses_a_target_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="lies under .*f, which is a file"):
        check_output(tmp_path / "f" / "out.csv")
    assert check_output(tmp_path / "new" / "out.csv") == tmp_path / "new" / "out.csv"


# ---- 2. something injected: terminal, CSV, Markdown, figure --------------------------------


def test_hostile_class_names_are_neutral_on_the_terminal_and_in_the_csv(runs, image, tmp_path, capsys):
    """Class names from weights metadata: an ANSI escape is printed as visible text, and a
    formula is written to the CSV as text (OWASP: a leading quote), through the csv module."""
    names = ["dog\x1b[2J\x1b[31m", '=HYPERLINK("http://evil","click")', "@house\r"]
    meta = {**read_metadata(runs / "flyp/model.safetensors"), "class_names": names}
    weights = _retag(runs / "flyp/model.safetensors", tmp_path / "model.safetensors", meta)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(weights), str(image), "--top-k", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed and "\r" not in printed
    assert "dog\\x1b[2J\\x1b[31m" in printed
    with open(out, newline="") as f:
        cells = [row["class"] for row in csv.DictReader(f)]
    assert sorted(cells) == sorted(["dog\x1b[2J\x1b[31m", "'" + names[1], "'" + names[2]])
    assert [csv_cell(v) for v in ("-1+1", "+x", "\tx", "ok", 0.5)] == ["'-1+1", "'+x", "'\tx", "ok", 0.5]


def test_hostile_domain_names_cannot_break_the_report(runs, tmp_path, capsys):
    """A domain folder named `sk|etch <img src=x onerror=alert(1)>` keeps the report's table
    whole and adds no HTML; `$...$` in a name is no math text for the figure; the CSV keeps it."""
    out = tmp_path / "report"
    assert main(["report", str(runs / "hostile-run"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "<img" not in report and "&lt;img src=x onerror=alert(1)&gt;" in report
    lines = report.splitlines()
    tables = [list(rows) for is_row, rows in groupby(lines, key=lambda x: x.startswith("|")) if is_row]
    assert len(tables) == 2  # results and calibration
    for table in tables:  # every row has its header's number of cells
        assert len({len(re.split(r"(?<!\\)\|", row)) for row in table}) == 1, table
    assert (out / "figure.png").stat().st_size > 0
    with open(out / "results.csv", newline="") as f:
        quantities = {row["quantity"] for row in csv.DictReader(f)}  # one row per number
    assert HOSTILE_DOMAIN in quantities and MATH_DOMAIN in quantities
    assert "<img" not in capsys.readouterr().out


def test_export_readme_escapes_the_source_run_folder(runs, tmp_path):
    run = tmp_path / "r|<b>x`"
    shutil.copytree(runs / "flyp", run)
    out = tmp_path / "exported"
    assert main(["export", str(run), "--format", "flyp", "--out", str(out)]) == 0
    readme = (out / "README.md").read_text()
    assert "<b>" not in readme and "r\\|&lt;b&gt;x&#96;" in readme


def test_md_cell_escapes_each_markdown_and_html_breaker():
    cell = md_cell("a|b<c>&d`e\nf[g](h)")
    assert cell == "a\\|b&lt;c&gt;&amp;d&#96;e f\\[g\\](h)"


def test_flyp_data_shows_folder_names_with_control_characters_escaped(tmp_path, capsys):
    """Class and domain folder names reach the terminal with their ANSI escapes made visible."""
    root = make_domains(tmp_path / "d", ["photo", "art\x1b[2J"], ["dog", "red\x1b[31mcat"], 6)
    assert main(["data", "--data", str(root), "--id-domain", "photo", "--model", "tiny"]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed
    assert "red\\x1b[31mcat" in printed and "art\\x1b[2J" in printed


def test_terminal_error_lines_show_control_characters_escaped(tmp_path, capsys):
    bad = tmp_path / "x\x1b[31m"
    assert main(["predict", str(bad), "img.png"]) == 2
    err = _error(capsys)
    assert "\x1b" not in err and "x\\x1b[31m" in err


# ---- 3. tampered weights metadata -------------------------------------------------------


def _tamper(meta: dict, key: str, value) -> dict:
    meta = dict(meta)
    if value is _DROP:
        del meta[key]
    else:
        meta[key] = value
    return meta


_DROP = object()
TAMPERED = [
    ("no_head", "head", _DROP, "head is None"),
    ("image_size_negative", "image_size", -5, "image_size is -5"),
    ("image_size_text", "image_size", "big", "image_size is 'big'"),
    ("templates_empty", "templates", [], "templates: no templates"),
    ("template_two_fields", "templates", ["a {} {}"], "has 2 {} fields"),
    ("template_named", "templates", ["a {name}"], "has the field {name}"),
    ("class_names_text", "class_names", "dog,cat", "class_names is not a list"),
    ("class_names_twice", "class_names", ["dog", "dog", "cat"], "lists 'dog' twice"),
    ("std_zero", "std", [0, 1, 1], "std is [0, 1, 1]"),
    ("model_spec_missing", "model_spec", _DROP, "model_spec is None"),
]


@pytest.mark.parametrize("key,value,expected", [c[1:] for c in TAMPERED], ids=[c[0] for c in TAMPERED])
def test_tampered_metadata_is_refused_naming_file_and_field(runs, image, tmp_path, capsys, key, value, expected):
    meta = _tamper(read_metadata(runs / "flyp/model.safetensors"), key, value)
    weights = _retag(runs / "flyp/model.safetensors", tmp_path / "w.safetensors", meta)
    assert main(["predict", str(weights), str(image)]) == 2
    err = _error(capsys)
    assert str(weights) in err and expected in err and "tampered or broken" in err


def test_metadata_that_is_not_a_mapping_is_refused_by_predict_and_evaluate(runs, image, tmp_path, capsys):
    weights = _retag(runs / "flyp/model.safetensors", tmp_path / "w.safetensors", ["a", "list"])
    assert main(["predict", str(weights), str(image)]) == 2
    assert f"{weights}: its flyp metadata is a JSON list, not a mapping" in _error(capsys)
    args = ["evaluate", str(weights), "--recipe", str(runs / "flyp/recipe.yaml")]
    assert main(args) == 2
    assert "not a mapping" in _error(capsys)


def test_linear_head_rows_that_differ_from_the_class_names_are_refused(runs, image, tmp_path, capsys):
    """7 head rows with 3 class names in the metadata."""
    import torch

    tensors = load_file(str(runs / "ft/model.safetensors"))
    dim = tensors["head.weight"].shape[1]
    tensors["head.weight"], tensors["head.bias"] = torch.zeros(7, dim), torch.zeros(7)
    meta = read_metadata(runs / "ft/model.safetensors")
    weights = _retag(runs / "ft/model.safetensors", tmp_path / "w.safetensors", meta, tensors)
    assert main(["predict", str(weights), str(image)]) == 2
    assert "its linear head scores 7 classes but its metadata class_names lists 3" in _error(capsys)


# ---- 4. template files: one validator ------------------------------------------------------


@pytest.mark.parametrize(
    "line,expected",
    [
        ("a photo of a {} {}.", "has 2 {} fields"),
        ("a photo of a {name}.", "has the field {name}"),
        ("a photo.", "has 0 {} fields"),
        ("a photo of a {.", "unbalanced braces"),
        ("a photo of a }{}.", "unbalanced braces"),
    ],
)
def test_bad_template_file_line_is_refused_with_its_number(runs, image, tmp_path, capsys, line, expected):
    file = tmp_path / "templates.txt"
    file.write_text(f"a photo of a {{}}.\n\n{line}\n")
    args = ["predict", str(runs / "flyp"), str(image), "--classes", "cat,car"]
    assert main([*args, "--templates-file", str(file)]) == 2
    err = _error(capsys)
    assert f"templates file {file}, line 3:" in err and expected in err


def test_template_sets_use_the_same_validator(monkeypatch):
    monkeypatch.setitem(tpl.TEMPLATE_SETS, "bad", ["a {}.", "a {} and {}."])
    with pytest.raises(tpl.TemplateError, match=r"template set 'bad', template 2: .* has 2 \{\}"):
        tpl.get_templates("bad")
    assert all(tpl.get_templates(name) for name in tpl.TEMPLATE_SETS if name != "bad")


# ---- 5. unfinished runs --------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["predict", "evaluate"])
def test_unfinished_run_is_refused_unless_asked_then_warned(runs, image, verb, capsys):
    killed = runs / "killed"
    assert (killed / "state.pt").exists() and (killed / "model.safetensors").exists()
    args = [verb, str(killed), *([str(image)] if verb == "predict" else [])]
    assert main(args) == 2
    err = _error(capsys)
    assert "is an unfinished run" in err and f"flyp finetune --resume {killed}" in err
    assert "--unfinished" in err
    if verb == "predict":  # the weights file itself is refused the same way
        assert main(["predict", str(killed / "model.safetensors"), str(image)]) == 2
        assert "is an unfinished run" in _error(capsys)
    assert main([*args, "--unfinished"]) == 0
    assert "warning: " in capsys.readouterr().err


# ---- 6. class names the model cannot tell apart ------------------------------------------


def test_classes_equal_to_the_tokenizer_are_refused_naming_the_pair(runs, image, capsys):
    args = ["predict", str(runs / "flyp"), str(image)]
    assert main([*args, "--classes", "Cat,dog,cat"]) == 2
    err = _error(capsys)
    assert "class names 'Cat'" in err and "'cat'" in err and "'dog'" not in err
    words = " ".join(f"w{i}" for i in range(20))  # the tiny tokenizer keeps 16 tokens
    assert main([*args, "--classes", f"{words} end,{words} other,dog"]) == 2
    err = _error(capsys)
    assert f"class names '{words} end' and '{words} other'" in err


# ---- 7. a comparison folder passed as one run --------------------------------------------


@pytest.mark.parametrize("verb", ["predict", "evaluate"])
def test_comparison_folder_is_named_as_one_with_its_runs(runs, image, tmp_path, verb, capsys):
    comparison = tmp_path / "cmp"
    for name in ("flyp-s0", "ft-s0"):
        shutil.copytree(runs / name.split("-")[0], comparison / name)
    (comparison / "report.md").write_text("# report\n")
    args = [verb, str(comparison), *([str(image)] if verb == "predict" else [])]
    assert main(args) == 2
    err = _error(capsys)
    assert f"{comparison} is a comparison holding 2 runs, not one run" in err
    assert f"e.g. {comparison / 'flyp-s0'}" in err and "ft-s0" in err
    assert "--resume" not in err
