"""A fresh adversarial sweep (issue 16, "a fresh sweep of your own finds nothing silent").

What it found silent, each now refused with one line and exit status 2 before any work: a YAML
key given twice (PyYAML keeps the last), a recipe name that walks out of runs/ or carries control
characters, an --out of any writing verb inside the data folder the run reads (the next run
reads what was written there as a domain, class or image), a folder --out that is a run
directory, a CSV benchmark row read otherwise than written, weights with NaN or inf, and
evaluate / wise of a run with other splits than it was trained on. Each test drives
``flyp.cli.main`` on the tiny model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fakes import make_domains, tiny_overrides
from flyp.cli import main


def sets(root: Path, *extra: str) -> list[str]:
    return [f"--set={o}" for o in tiny_overrides(root, "train.epochs=1", *extra)]


def one_error(capsys) -> str:
    """The single stderr line of a refused command, without its 'error: ' prefix."""
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Traceback" in line for line in lines), lines
    return errors[0].removeprefix("error: ")


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny dataset, a recipe file and one finished zero-shot run made from them."""
    base = tmp_path_factory.mktemp("sweep")
    root = make_domains(base / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], 6)
    recipe = base / "r.yaml"
    recipe.write_text("name: r\n")
    run = base / "run"
    args = ["finetune", str(recipe), *sets(root, "train.method=zeroshot"), "--out", str(run)]
    assert main(args) == 0
    return root, recipe, run


# --- recipes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, line",
    [
        ("name: r\ntrain:\n  lr: 0.1\n  lr: 0.001\n", "lr", 4),
        ("name: r\ntrain:\n  lr: 0.1\ntrain:\n  epochs: 2\n", "train", 4),
        ("name: r\nname: s\n", "name", 2),
    ],
)
def test_a_yaml_key_given_twice_is_refused(fake_pacs, tmp_path, capsys, text, key, line):
    """A recipe key given twice in one mapping is refused with its line: PyYAML keeps the last
    silently, so the file would read as one setting and train with another."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    assert main(["data", str(path), *sets(fake_pacs)]) == 2
    assert one_error(capsys) == (
        f"{path} line {line}: key '{key}' is given twice in one mapping; fix the YAML syntax"
    )


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "", "  ", "red\x1b[31m", "a\u202eb"])
def test_a_recipe_name_that_is_no_folder_name_is_refused(
    fake_pacs, tmp_path, capsys, monkeypatch, name
):
    """The recipe's name makes the default run folder (runs/<name>-<method>-s<seed>): a name with
    '/' or '..' would write outside runs/, control characters would land in paths and reports."""
    cwd = tmp_path / "cwd" / "deeper"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: {json.dumps(name)}\n")  # JSON strings are YAML strings
    args = ["finetune", str(recipe), *sets(fake_pacs, "train.method=zeroshot")]
    assert main(args) == 2
    assert one_error(capsys).startswith(f"name: {name!r} cannot name a run folder")
    assert listing(tmp_path / "cwd") == ["deeper"]


# --- outputs in the data folder, or onto a run directory -------------------------------------


def _copy_data(finished, tmp_path) -> Path:
    root, _, _ = finished
    return Path(shutil.copytree(root, tmp_path / "data"))


@pytest.mark.parametrize(
    "verb",
    ["finetune", "compare", "sweep", "evaluate", "report", "export", "predict", "finetune-root"],
)
def test_no_verb_writes_into_the_data_folder(finished, tmp_path, capsys, verb):
    """An --out inside the data folder the run reads (or the folder itself) is refused before any
    work, for every verb that writes: what it wrote there (a run folder, report.md, figure.png)
    would be read by the next run as a new class, domain or stray image."""
    root, recipe, run = finished
    before = listing(root)
    out = root / "photo" / "new"
    plain = [str(recipe), *sets(root, "train.method=zeroshot")]
    args = {
        "finetune": ["finetune", *plain, "--out", str(out)],
        "finetune-root": ["finetune", *plain, "--out", str(root)],
        "compare": ["compare", *plain, "--methods", "zeroshot", "--seeds", "0", "--out", str(out)],
        "sweep": ["sweep", *plain, "--grid", "train.lr=0.1,0.2", "--out", str(out)],
        "evaluate": ["evaluate", str(run), "--out", str(root / "photo" / "metrics.json")],
        "report": ["report", str(run), "--out", str(root / "photo")],
        "export": ["export", str(run), "--format", "flyp", "--out", str(out)],
        "predict": ["predict", str(run), str(root / "photo" / "dog" / "000.png"), "--out",
                    str(root / "photo" / "predictions.csv")],  # fmt: skip
    }[verb]
    assert main(args) == 2
    line = one_error(capsys)
    assert "lies in the data folder" in line and "choose a path outside it" in line
    assert listing(root) == before


@pytest.mark.parametrize("verb", ["predict", "evaluate"])
def test_a_file_out_named_like_an_image_is_refused(finished, tmp_path, capsys, verb):
    """predict --out data/photo/dog/002.png replaced a dataset image with the predictions CSV
    (the run's data folder was not checked for predict) and exited 0. A file --out named like
    an image is refused wherever it lies, and the image is left as it was."""
    root, _, run = finished
    image = Path(shutil.copy(root / "photo" / "dog" / "002.png", tmp_path / "002.png"))
    before = image.read_bytes()
    one = str(root / "photo" / "dog" / "000.png")
    args = ["predict", str(run), one] if verb == "predict" else ["evaluate", str(run)]
    assert main([*args, "--out", str(image)]) == 2
    assert one_error(capsys).startswith(f"--out {image} names an image file")
    assert image.read_bytes() == before


def test_wise_refuses_an_alpha_given_twice(finished, capsys):
    _, _, run = finished
    assert main(["wise", str(run), "--alphas", "0.5", "0.25", "0.5"]) == 2
    assert one_error(capsys) == "--alphas lists 0.5 twice; list each once"


@pytest.mark.parametrize("verb", ["compare", "report", "finetune"])
def test_a_folder_out_that_is_a_run_directory_is_refused(finished, tmp_path, capsys, verb):
    """compare, report (and a new finetune) given a finished run as --out are refused: they
    would mix a comparison's files and run folders into the run."""
    root, recipe, run = finished
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    before = listing(copy)
    plain = [str(recipe), *sets(root, "train.method=zeroshot")]
    args = {
        "compare": ["compare", *plain, "--methods", "zeroshot", "--seeds", "0", "--out", str(copy)],
        "report": ["report", str(run), "--out", str(copy)],
        "finetune": ["finetune", *plain, "--out", str(copy)],
    }[verb]
    assert main(args) == 2
    assert one_error(capsys).startswith(f"--out {copy} is a run directory; pass a new folder")
    assert listing(copy) == before


def test_outputs_outside_the_data_folder_still_work(finished, tmp_path, capsys):
    """The data-folder check leaves an --out next to the data alone (and a sibling whose name
    starts like the data folder's)."""
    root, recipe, run = finished
    out = root.parent / (root.name + "-report")
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert (out / "report.md").is_file()


# --- a CSV benchmark read as written ----------------------------------------------------------


def _csv_args(root: Path) -> list[str]:
    return [
        f"--set={o}"
        for o in (
            "model.spec=tiny",
            "data.benchmark=csv",
            f"data.root={root}",
            "data.id_domain=a",
            "data.ood_domains=[]",
            "data.val_fraction=0.25",
            "data.test_fraction=0.25",
        )
    ]


def _csv_benchmark(root: Path, classes: list[str], header="path,label", extra="", quoted=False):
    """A CSV benchmark under ``root`` (domain x: a.csv, 4 images a class; ``extra`` appended to
    its first row) and a recipe file; returns the recipe's path."""
    make_domains(root / "img", ["x"], classes, per_class=4)
    cell = '"{}"' if quoted else "{}"
    paths = [(f"img/x/{c}/00{i}.png", c) for c in classes for i in range(4)]
    rows = [f"{cell.format(path)},{cell.format(label)}" for path, label in paths]
    rows[0] += extra
    (root / "a.csv").write_text("\n".join([header, *rows]) + "\n")
    recipe = root / "r.yaml"
    recipe.write_text("name: r\n")
    return recipe


@pytest.mark.parametrize(
    "header, extra, expected",
    [
        ("path,label,label", ",cat", "the header names the column 'label' twice; keep one"),
        ("path,label", ", dog", "line 2: more cells than the header has columns; quote a path"),
    ],
)
def test_a_csv_row_is_read_as_written_or_refused(tmp_path, capsys, header, extra, expected):
    """A CSV benchmark whose header names 'label' twice (csv.DictReader keeps the last without a
    word) or whose row has more cells than the header (an unquoted comma: 'hot, dog' read as
    'hot') is refused, naming the file and line, instead of training on the wrong labels."""
    recipe = _csv_benchmark(tmp_path, ["cat", "dog", "cow"], header, extra)
    assert main(["data", str(recipe), *_csv_args(tmp_path)]) == 2
    line = one_error(capsys)
    assert line.startswith(str(tmp_path / "a.csv")) and expected in line


def test_a_quoted_comma_in_a_csv_is_one_cell(tmp_path, capsys):
    """The refusal above leaves a quoted comma alone: it is one label."""
    recipe = _csv_benchmark(tmp_path, ["cat", "dog", "hot, dog"], quoted=True)
    assert main(["data", str(recipe), *_csv_args(tmp_path)]) == 0
    assert "hot, dog" in capsys.readouterr().out


# --- weights that cannot classify ------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("verb", ["predict", "evaluate", "api"])
def test_non_finite_weights_are_refused(finished, tmp_path, capsys, value, verb):
    """A model.safetensors with a NaN or inf weight (here the logit scale) gave 'dog nan' as
    predict's top-1 and an accuracy of 1/classes from evaluate (argmax of NaN is class 0), with
    exit status 0. It is refused where the weights load, naming the tensor."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    import flyp
    from flyp.checkpoint import CheckpointError

    root, _, run = finished
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    weights = copy / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    state = load_file(str(weights))
    state["model.logit_scale"] = torch.full_like(state["model.logit_scale"], value)
    save_file(state, str(weights), metadata=meta)
    expected = f"{weights} holds non-finite values (NaN or inf) in model.logit_scale"
    if verb == "api":
        with pytest.raises(CheckpointError, match=r"non-finite values \(NaN or inf\)"):
            flyp.load_classifier(copy)
        return
    image = root / "photo" / "dog" / "000.png"
    args = ["predict", str(copy), str(image)] if verb == "predict" else ["evaluate", str(copy)]
    assert main(args) == 2
    assert one_error(capsys).startswith(expected)


# --- evaluating a run as another run ---------------------------------------------------------


@pytest.mark.parametrize(
    "verb, change, shown",
    [
        ("evaluate", "data.test_fraction=0.5", "data.test_fraction 0.25 -> 0.5"),
        ("evaluate", "data.split_seed=5", "data.split_seed 0 -> 5"),
        ("evaluate", "data.id_domain=art", "data.id_domain 'photo' -> 'art'"),
        ("wise", "data.val_fraction=0.5", "data.val_fraction 0.25 -> 0.5"),
        ("wise", "data.id_domain=art", "data.id_domain 'photo' -> 'art'"),
    ],
)
def test_evaluate_and_wise_refuse_other_splits(finished, tmp_path, capsys, verb, change, shown):
    """flyp evaluate / flyp wise of a run with a --set that changes its splits scored (and, for
    wise, chose alpha on) images the run trained on and wrote the result with exit status 0.
    Refused now, naming the key; the run is left as it was."""
    root, _, run = finished
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    before = listing(copy)
    extra = ["--set", "data.ood_domains=[photo, sketch]"] if "id_domain" in change else []
    assert main([verb, str(copy), "--set", change, *extra]) == 2
    line = one_error(capsys)
    assert f"{copy} with other settings than it was trained with ({shown})" in line
    assert "drop those changes" in line
    assert listing(copy) == before


def test_evaluate_may_still_change_ood_sets_and_eval_settings(finished, capsys):
    """What does not change the run (the OOD sets, eval.batch_size, data.max_eval) still works."""
    _, _, run = finished
    args = ["evaluate", str(run), "--set", "data.ood_domains=[art]", "--set", "eval.batch_size=5"]
    assert main([*args, "--set", "data.max_eval=4"]) == 0
    out = capsys.readouterr().out
    assert "art" in out and "sketch" not in out


# --- a comparison rerun on other data ---------------------------------------------------------


@pytest.mark.parametrize(
    "classes, per_class, shown",
    [
        (["dog", "horse", "house"], 4, "photo 6 -> 3 images"),  # same classes, other images
        (["cat", "horse", "house"], 6, "classes dog, horse, house -> cat, horse, house"),
    ],
)
def test_compare_does_not_reuse_runs_of_another_dataset(tmp_path, capsys, classes, per_class, shown):
    """A finished run is reused only if it was trained on the data the recipe reads now. Rerun
    into the same --out with data.root pointed at another dataset (same domain names, so the
    settings fingerprint, which leaves data.root out, agrees) reported the old runs, exit 0."""
    first = make_domains(tmp_path / "a", ["photo", "art", "sketch"], ["dog", "horse", "house"], 6)
    other = make_domains(tmp_path / "b", ["photo", "art", "sketch"], classes, per_class)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    out = tmp_path / "cmp"
    command = ["compare", str(recipe), "--methods", "zeroshot", "--seeds", "0", "--out", str(out)]
    assert main([*command, *sets(first)]) == 0
    before = (out / "zeroshot" / "metrics.json").read_bytes()
    capsys.readouterr()
    assert main([*command, *sets(other)]) == 2
    line = one_error(capsys)
    assert line.startswith(f"{out / 'zeroshot'} holds a run trained on other data than {other}")
    assert shown in line and line.endswith("pass a new --out")
    assert (out / "zeroshot" / "metrics.json").read_bytes() == before


def test_a_csv_benchmark_may_write_next_to_its_csv(tmp_path):
    """A CSV benchmark lists its images, so an --out in its folder is never read as data: the
    data-folder refusal leaves it alone."""
    recipe = _csv_benchmark(tmp_path, ["cat", "dog", "cow"])
    args = ["finetune", str(recipe), *_csv_args(tmp_path), "--set", "train.method=zeroshot"]
    assert main([*args, "--out", str(tmp_path / "runs" / "zs")]) == 0
    assert (tmp_path / "runs" / "zs" / "metrics.json").is_file()
