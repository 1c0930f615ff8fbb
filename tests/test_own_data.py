"""Your own folder of images without a recipe (`--data DIR`), and `flyp compare` running a
recipe as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fakes import make_domains
from flyp.cli import main

TINY = ["--model", "tiny", "--set", "train.batch_size=6", "--set", "train.epochs=1"]


def one_domain(tmp_path: Path) -> Path:
    make_domains(tmp_path / "src", ["only"], ["cat", "dog", "fox"], per_class=10)
    return tmp_path / "src" / "only"


def test_one_domain_folder_is_split_and_trained(tmp_path, capsys):
    data = one_domain(tmp_path)
    run = tmp_path / "run"
    assert main(["finetune", "--data", str(data), *TINY, "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # 10 per class: 7 train, 1 validation, 2 test (the recipe defaults 0.1 / 0.2)
    assert metrics["id_name"] == "only" and metrics["ood_names"] == []
    assert metrics["sets"]["val"]["n"] == 3 and metrics["sets"]["only"]["n"] == 6
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["name"] == "only" and saved["data"]["benchmark"] == "folders"
    assert saved["data"]["root"] == str(data.parent) and saved["data"]["id_domain"] == "only"
    # the saved recipe repeats the run
    again = tmp_path / "again"
    assert main(["finetune", str(run / "recipe.yaml"), "--out", str(again)]) == 0
    assert json.loads((again / "metrics.json").read_text())["sets"] == metrics["sets"]


def test_domains_folder_needs_the_training_domain_and_tests_on_the_others(tmp_path, capsys):
    data = make_domains(tmp_path / "d", ["photo", "art", "sketch"], ["dog", "horse", "house"], 8)
    run = tmp_path / "run"
    assert main(["data", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "holds the domains art, photo, sketch" in err and "--id-domain" in err
    assert main(["data", "--data", str(data), "--id-domain", "photo"]) == 0
    shown = capsys.readouterr().out
    assert "ID photo, OOD art, sketch" in shown
    args = ["finetune", "--data", str(data), "--id-domain", "photo", "--ood-domains", "sketch"]
    assert main([*args, *TINY, "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ood_names"] == ["sketch"] and metrics["sets"]["sketch"]["n"] == 24
    assert set(metrics["sets"]) == {"val", "photo", "sketch"}


@pytest.mark.parametrize(
    "layout, extra, fragment",
    [
        ("missing", [], "does not exist or is not a folder"),
        ("empty", [], "has no sub-folders"),
        ("no-images", [], "holds no images"),
        ("one-domain", ["--id-domain", "x"], "holds class folders, not domains"),
        ("domains", ["--id-domain", "photo", "--ood-domains", "photo"], "holds the ID domain"),
    ],
)
def test_bad_own_data_is_refused_in_one_line(layout, extra, fragment, tmp_path, capsys):
    data = tmp_path / "data"
    if layout == "empty":
        data.mkdir()
    elif layout == "no-images":
        (data / "cat").mkdir(parents=True)
        (data / "cat" / "notes.txt").write_text("x")
    elif layout == "one-domain":
        data = one_domain(tmp_path)
    elif layout == "domains":
        make_domains(data, ["photo", "art"], ["dog", "horse"], 4)
    rc = main(["finetune", "--data", str(data), *extra, *TINY, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "run").exists()


def test_compare_runs_a_recipe_as_written(tmp_path):
    """No hidden quick settings: every training image, every evaluation image, the recipe's
    epochs and WiSE-FT alphas."""
    data = one_domain(tmp_path)
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(data), *TINY, "--set", "train.epochs=2", "--methods", "flyp"]
    assert main([*args, "--set", "eval.wise_alphas=[0, 0.3, 1]", "--out", str(out)]) == 0
    recipe = yaml.safe_load((out / "flyp-s0" / "recipe.yaml").read_text())
    assert recipe["data"]["max_train"] is None and recipe["data"]["max_eval"] is None
    assert recipe["train"]["epochs"] == 2
    metrics = json.loads((out / "flyp-s0" / "metrics.json").read_text())
    steps = [json.loads(x) for x in (out / "flyp-s0" / "log.jsonl").read_text().splitlines()]
    vals = [s["val"] for s in steps if "val" in s]
    assert metrics["sets"]["only"]["n"] == 6 and len(vals) == 2
    assert metrics["selected_epoch"] == 1 + vals.index(max(vals))
    assert max(s["step"] for s in steps) == 2 * (21 // 6)  # all 21 training images, 2 epochs
    wise = json.loads((out / "flyp-s0" / "wise.json").read_text())
    assert [p["alpha"] for p in wise["points"]] == [0, 0.3, 1]


def test_the_demo_recipe_holds_the_quick_settings():
    from flyp.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    demo, full = load_recipe(root / "pacs_demo.yaml"), load_recipe(root / "pacs.yaml")
    assert (demo.data.max_train, demo.data.max_eval, demo.train.epochs) == (640, 300, 3)
    assert demo.eval.wise_alphas == [0, 0.5, 1.0]  # the demo within 15 min in fp32
    assert (full.data.max_train, full.data.max_eval, full.train.epochs) == (None, None, 5)
    # otherwise the same experiment
    assert demo.model == full.model and demo.train.lr == full.train.lr
    assert (demo.data.id_domain, demo.data.ood_domains) == (full.data.id_domain, full.data.ood_domains)
    makefile = (root.parent / "Makefile").read_text()
    assert "flyp compare recipes/pacs_demo.yaml" in makefile
