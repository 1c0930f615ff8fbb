"""A run is read as it was made (issue 22, item 3): its data where it was found."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from fakes import error_lines, make_domains, tiny_overrides
from flyp.cli import main


def test_a_relative_data_root_is_stored_absolute_and_evaluate_elsewhere_reads_the_runs_data(
    tmp_path, monkeypatch
):
    """Trained in A on A/data; B/data is another dataset at the same relative path (other
    colours: the model cannot classify it). `cd B && flyp evaluate ../A/run` scores A's data,
    as the run did: the same accuracy, not B's."""
    a, b = tmp_path / "A", tmp_path / "B"
    make_domains(a / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], per_class=12)
    make_domains(b / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], per_class=12, seed=5)
    for folder in (b / "data").iterdir():  # B's classes swapped: dog's images are horse's
        (folder / "dog").rename(folder / "tmp")
        (folder / "horse").rename(folder / "dog")
        (folder / "tmp").rename(folder / "horse")
    (tmp_path / "r.yaml").write_text("name: r\n")
    sets = [f"--set={s}" for s in tiny_overrides("data", "train.epochs=4")]  # a relative root
    monkeypatch.chdir(a)
    assert main(["finetune", str(tmp_path / "r.yaml"), *sets, "--out", "run"]) == 0
    stored = yaml.safe_load((a / "run" / "recipe.yaml").read_text())["data"]["root"]
    assert stored == str((a / "data").resolve())
    trained = json.loads((a / "run" / "metrics.json").read_text())["sets"]
    monkeypatch.chdir(b)
    assert main(["evaluate", "../A/run", "--out", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    sets_again = again.get("sets", again)
    assert {k: v["accuracy"] for k, v in sets_again.items()} == {
        k: v["accuracy"] for k, v in trained.items() if k in sets_again
    }


# --- run files are checked when read (issue 22, item 4) -----------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished tiny run (with its wise.json) that each test copies and tampers with."""
    root = tmp_path_factory.mktemp("files")
    data = make_domains(root / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], per_class=12)
    (root / "r.yaml").write_text("name: r\n")
    sets = [f"--set={s}" for s in tiny_overrides(data, "train.epochs=1", "eval.wise_alphas=[0, 1]")]
    assert main(["compare", str(root / "r.yaml"), *sets, "--methods", "ft", "l2sp", "--out", str(root / "cmp")]) == 0
    return root / "cmp" / "ft-s0"


def _tampered(finished_run: Path, tmp_path: Path, name: str, change) -> Path:
    run = tmp_path / "runs" / "ft-s0"
    shutil.copytree(finished_run, run)
    path = run / name
    if isinstance(change, bytes):
        path.write_bytes(change)
    else:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return run


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("metrics.json", lambda d: d["sets"]["photo"].update(accuracy=5.0),
         r"'sets.photo.accuracy' is 5.0, outside \[0, 1\]"),
        ("metrics.json", lambda d: d["sets"]["art"].update(accuracy="high"),
         r"'sets.art.accuracy' is 'high' \(str\), not a number"),
        ("metrics.json", lambda d: d.update(sets={}), r"'sets' is empty"),
        ("metrics.json", lambda d: d.update(settings=[1, 2]), r"'settings' is list, not a mapping"),
        ("metrics.json", lambda d: d.update(ood_mean=True), r"'ood_mean' is True \(bool\), not a number"),
        ("metrics.json", lambda d: d["sets"]["photo"].update(n=-3), r"'sets.photo.n' is -3, not a count"),
        ("metrics.json", b"\xff\xfe{not utf8", r"not UTF-8 text"),
        ("wise.json", lambda d: d.update(points="x"), r"'points' is not a list of WiSE-FT points"),
        ("wise.json", lambda d: d.update(best_alpha=50), r"'best_alpha' is 50, outside \[0, 1\]"),
    ],
)  # fmt: skip
def test_report_refuses_a_run_file_not_as_flyp_wrote_it_naming_the_field(
    name, change, message, finished_run, tmp_path, capsys
):
    run = _tampered(finished_run, tmp_path, name, change)
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and re.search(message, err[0]), err
    assert str(run / name) in err[0]
    assert not (tmp_path / "report" / "report.md").exists()


def test_an_untouched_run_still_reports(finished_run, tmp_path):
    run = _tampered(finished_run, tmp_path, "metrics.json", lambda d: None)
    assert main(["report", str(run), "--out", str(tmp_path / "report")]) == 0
    assert "ft" in (tmp_path / "report" / "report.md").read_text()


def test_compare_rerun_refuses_a_tampered_metrics_file_in_one_line(finished_run, tmp_path, capsys):
    """The comparison's own reuse of a finished run reads it through the same check."""
    from flyp.checkpoint import CheckpointError, read_json

    run = _tampered(finished_run, tmp_path, "metrics.json", lambda d: d.update(id=83.3))
    with pytest.raises(CheckpointError, match=r"'id' is 83.3, outside \[0, 1\]"):
        read_json(run / "metrics.json", ("sets",))


def test_export_refuses_weights_cut_short_and_writes_nothing(finished_run, tmp_path, capsys):
    source = (finished_run / "model.safetensors").read_bytes()
    run = _tampered(finished_run, tmp_path, "model.safetensors", source[: len(source) // 2])
    out = tmp_path / "exported"
    assert main(["export", str(run), "--format", "flyp", "--out", str(out)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and f"{run / 'model.safetensors'} is not a readable safetensors file" in err[0]
    assert not out.exists()


def test_weights_of_another_methods_run_are_not_evaluated_as_this_runs(finished_run, tmp_path, capsys):
    """ft and l2sp weights fit the same model: only their metadata tells them apart."""
    other = (finished_run.parent / "l2sp-s0" / "model.safetensors").read_bytes()
    run = _tampered(finished_run, tmp_path, "model.safetensors", other)
    assert main(["evaluate", str(run), "--out", str(tmp_path / "e.json")]) == 2
    err = error_lines(capsys.readouterr().err)
    assert err == [f"error: {run / 'model.safetensors'} holds the weights of a l2sp run, but this "
                   "run is ft: put back the run's own model.safetensors (or evaluate that file "
                   "with its own run's recipe)"]  # fmt: skip
    assert not (tmp_path / "e.json").exists()


def test_a_hand_edited_recipe_is_refused_as_a_set_is(finished_run, tmp_path, capsys):
    """recipe.yaml given another split_seed: evaluate would score images the run trained on.
    The run's metrics.json holds the settings it was made with; the edit is refused by name."""
    run = tmp_path / "runs" / "ft-s0"
    shutil.copytree(finished_run, run)
    text = (run / "recipe.yaml").read_text()
    assert "split_seed: 0" in text
    (run / "recipe.yaml").write_text(text.replace("split_seed: 0", "split_seed: 7"))
    assert main(["evaluate", str(run), "--out", str(tmp_path / "e.json")]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "(data.split_seed 0 -> 7), as its metrics.json records them" in err[0]
    assert not (tmp_path / "e.json").exists()
