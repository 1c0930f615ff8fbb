"""An OOD domain that covers a subset of the classes (issue 23, item 3): scored on its own
classes (the logits of the others left out, as for ImageNet-R/A), marked as such by `flyp data`,
the run's table and the report, and `flyp predict --classes` with those classes gives the same
accuracy. A class the ID domain lacks is still refused, and so is a domain of one class."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import flyp
from fakes import error_lines, make_domains
from flyp.cli import main
from flyp.data.benchmarks import build_benchmark
from flyp.recipe import load_recipe

CLASSES = ["dog", "horse", "house"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYP_CACHE", str(tmp_path / "cache"))


def _tree(root: Path) -> Path:
    """photo and art with every class; sketch without 'house', and its 'dog' images coloured as
    the house images are (make_domains colours by position), so the house logit, were it not
    left out, would take them."""
    make_domains(root, ["photo", "art"], CLASSES, per_class=12)
    make_domains(root / "tmp", ["sketch"], ["x", "horse", "dog"], per_class=8)
    (root / "sketch").mkdir()
    for name in ("horse", "dog"):
        shutil.move(root / "tmp" / "sketch" / name, root / "sketch" / name)
    shutil.rmtree(root / "tmp")
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("subset")
    root = _tree(base / "data")
    run = base / "run"
    argv = ["finetune", "--data", str(root), "--id-domain", "photo", "--model", "tiny"]
    for item in ("train.batch_size=6", "train.epochs=2", "train.lr=3e-3", "train.warmup_steps=1"):
        argv += ["--set", item]
    assert main([*argv, "--out", str(run)]) == 0
    return root, run


def _data_args(root: Path) -> list[str]:
    return ["data", "--data", str(root), "--id-domain", "photo", "--model", "tiny"]


def test_flyp_data_marks_the_domain_and_counts_its_classes(tmp_path, capsys):
    root = _tree(tmp_path / "data")
    assert main(_data_args(root)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("ID photo, OOD art, sketch (2 of 3 classes)")
    counts = {line.split()[0]: line.split()[1:] for line in out[2:5]}
    assert counts["house"][-1] == "0" and counts["dog"][-1] == "8" and counts["horse"][-1] == "8"


def test_a_run_scores_the_domain_on_its_own_classes_as_predict_does(trained, capsys):
    """The run's sketch numbers are those of its logits of dog and horse only, and so are
    predict's with --classes dog,horse: the same accuracy and the same likelihood of the labels
    (softmax over two classes; over three, each true class would get less)."""
    root, run = trained
    metrics = json.loads((run / "metrics.json").read_text())
    sketch = metrics["sets"]["sketch"]
    assert (sketch["classes"], sketch["of_classes"], sketch["n"]) == (2, 3, 16)
    assert "classes" not in metrics["sets"]["art"]
    capsys.readouterr()
    out = run.parent / "pred.csv"
    images = str(root / "sketch")
    argv = ["predict", str(run), images, "--classes", "dog,horse", "--top-k", "2"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "(zeroshot-text head, 2 of its 3 classes)" in capsys.readouterr().out
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    top1 = {r["path"]: r["class"] for r in rows if r["rank"] == "1"}
    right = sum(Path(p).parent.name == c for p, c in top1.items())
    assert len(top1) == 16 and right / 16 == pytest.approx(sketch["accuracy"])
    truth = [float(r["probability"]) for r in rows if Path(r["path"]).parent.name == r["class"]]
    nll = -sum(math.log(p) for p in truth) / len(truth)
    assert len(truth) == 16 and nll == pytest.approx(sketch["nll"], abs=1e-4)
    # over all three classes the true classes' probabilities are lower: another likelihood
    clf = flyp.load_classifier(run)
    logits = clf.logits(sorted(top1))
    labels = torch.tensor([CLASSES.index(Path(p).parent.name) for p in sorted(top1)])
    every = float(torch.nn.functional.cross_entropy(logits, labels))
    assert every > sketch["nll"] + 1e-3


def test_the_finetune_table_and_the_report_mark_the_set(trained, tmp_path, capsys):
    _, run = trained
    assert main(["evaluate", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "sketch: scored on the 2 of 3 classes it has (the others' logits left out)" in printed
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    report = (tmp_path / "rep" / "report.md").read_text()
    assert "| sketch (2 of 3 classes) |" in report.splitlines()[4]
    assert "covers only k of the n classes and is scored on them" in report


@pytest.mark.parametrize(
    "change, message",
    [
        ("extra", "class folder 'cat' in sketch has no match in photo; rename it after one of "
         "photo's classes or remove it (a domain may lack some of photo's classes, not add any)"),
        ("one", "has only one class folder ('horse'): scored on its own classes, every "
         "prediction would be right"),
    ],
)  # fmt: skip
def test_a_class_the_id_domain_lacks_or_a_one_class_domain_is_refused(change, message, tmp_path, capsys):
    root = _tree(tmp_path / "data")
    if change == "extra":
        make_domains(tmp_path / "more", ["sketch"], ["cat"], per_class=2)
        shutil.move(tmp_path / "more" / "sketch" / "cat", root / "sketch" / "cat")
    else:
        shutil.rmtree(root / "sketch" / "dog")
    assert main(_data_args(root)) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert message in line, line


def test_a_csv_domain_using_some_labels_is_scored_on_them(tmp_path):
    for name in ("a", "b"):
        make_domains(tmp_path / name, ["x"], CLASSES, per_class=4)
    labels = {"a": CLASSES, "b": ["dog", "house"]}  # b uses two of a's three labels
    for name, classes in labels.items():
        rows = [f"{name}/x/{c}/00{i}.png,{c}" for c in classes for i in range(4)]
        (tmp_path / f"{name}.csv").write_text("\n".join(["path,label", *rows]) + "\n")
    overrides = ["data.benchmark=csv", f"data.root={tmp_path}", "data.id_domain=a"]
    overrides += ["data.val_fraction=0.25", "data.test_fraction=0.25"]
    bench = build_benchmark(load_recipe(None, [*overrides, "data.ood_domains=[b]"]).data)
    assert bench.class_subsets == {"b": [0, 2]}
