"""A run is read as it was made (issue 22, item 3): its data where it was found."""

from __future__ import annotations

import json

import yaml

from fakes import make_domains, tiny_overrides
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
