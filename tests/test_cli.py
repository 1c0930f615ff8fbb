import dataclasses
import json
from pathlib import Path

import yaml

from fakes import tiny_overrides
from flyp.cli import main

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pacs.yaml"
QUICK = [
    "--set",
    "model.spec=tiny",
    "--set",
    "model.image_size=32",
    "--set",
    "data.max_train=56",
    "--set",
    "data.max_eval=28",
    "--set",
    "train.epochs=2",
    "--set",
    "train.batch_size=14",
    "--set",
    "train.warmup_steps=2",
]


def assert_selected_best_validation(run, metrics):
    """The selected epoch is the first with the best logged validation score, and the selected
    weights reproduce that score."""
    vals = [x["val"] for x in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "val" in x]
    assert len(vals) == 2
    assert metrics["selected_epoch"] == 1 + vals.index(max(vals))
    assert metrics["sets"]["val"]["accuracy"] == max(vals)


def test_cli_finetune_and_evaluate_on_a_pacs_subset(pacs_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            ["finetune", str(RECIPE), *QUICK, "--set", f"data.root={pacs_root}", "--out", str(run)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "OOD mean" in printed and "sketch" in printed
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["sets"]) == {"val", "photo", "art_painting", "cartoon", "sketch"}
    assert metrics["id_name"] == "photo"
    assert_selected_best_validation(run, metrics)
    ood = [metrics["sets"][d]["accuracy"] for d in ("art_painting", "cartoon", "sketch")]
    assert abs(metrics["ood_mean"] - sum(ood) / 3) < 1e-9
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["train"]["epochs"] == 2 and recipe["model"]["spec"] == "tiny"
    steps = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == list(range(1, 9))
    assert all({"loss", "lr", "temperature"} <= s.keys() for s in steps if "loss" in s)

    out = tmp_path / "again.json"
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["sets"] == metrics["sets"]


def test_cli_refuses_unknown_key_by_name(capsys):
    assert main(["finetune", str(RECIPE), "--set", "train.learning_rate=1"]) == 2
    assert "unknown recipe key 'train.learning_rate'" in capsys.readouterr().err


def test_cli_missing_data_root(tmp_path, capsys):
    assert (
        main(
            [
                "finetune",
                str(RECIPE),
                "--set",
                "model.spec=tiny",
                "--set",
                f"data.root={tmp_path}/none",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_resume_of_a_killed_run(pacs_root, tmp_path):
    run = tmp_path / "run"
    args = ["finetune", str(RECIPE), *QUICK, "--set", f"data.root={pacs_root}", "--out", str(run)]
    assert main([*args, "--set", "train.stop_after_steps=3"]) == 0
    assert not (run / "metrics.json").exists()
    assert main(["finetune", "--resume", str(run)]) == 0
    assert_selected_best_validation(run, json.loads((run / "metrics.json").read_text()))


def test_cli_unknown_method_is_named(tmp_path, capsys):
    assert main(["finetune", str(RECIPE), "--set", "model.spec=tiny", "--set", "train.method=flip", "--out", str(tmp_path / "r")]) == 2
    assert "train.method: 'flip' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_data_shows_splits_and_counts(fake_pacs, capsys):
    args = ["data", str(RECIPE), "--set", "data.benchmark=folders", "--set", f"data.root={fake_pacs}",
            "--set", "data.ood_domains=[art, sketch]", "--set", "data.val_fraction=0.25", "--set", "data.test_fraction=0.25"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and "OOD art, sketch" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:]}
    assert rows["dog"] == ["6", "3", "3", "12", "12"]  # train, val, photo test, art, sketch
    assert rows["total"] == ["18", "9", "9", "36", "36"]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_cli_evaluate_reports_the_benchmarks_headline_metric(fake_pacs, tmp_path, monkeypatch, capsys):
    """A benchmark scored by macro-F1 (iWildCam) is reported by macro-F1, as finetune does."""
    import flyp.experiment

    build = flyp.experiment.build_benchmark
    monkeypatch.setattr(
        flyp.experiment, "build_benchmark", lambda cfg: dataclasses.replace(build(cfg), metric="macro_f1")
    )
    run, out = tmp_path / "run", tmp_path / "eval.json"
    sets = _sets(*tiny_overrides(fake_pacs, "train.method=zeroshot"))
    assert main(["finetune", str(RECIPE), "--out", str(run), *sets]) == 0
    assert main(["evaluate", str(run), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["metric"] == "macro_f1"
    assert metrics["id"] == metrics["sets"]["photo"]["macro_f1"]
    ood = [metrics["sets"][d]["macro_f1"] for d in ("art", "sketch")]
    assert metrics["ood_mean"] == sum(ood) / 2
    assert metrics["id"] != metrics["sets"]["photo"]["accuracy"]  # the two differ on this run
    assert "(macro_f1)" in capsys.readouterr().out


def test_cli_resume_applies_settable_overrides_and_refuses_the_rest(fake_pacs, tmp_path, capsys):
    run = tmp_path / "run"
    sets = _sets(*tiny_overrides(fake_pacs, "train.stop_after_steps=2", "train.epochs=1"))
    assert main(["finetune", str(RECIPE), "--out", str(run), *sets]) == 0
    saved = (run / "recipe.yaml").read_text()
    assert main(["finetune", "--resume", str(run), *_sets("train.lr=0.5")]) == 2
    err = capsys.readouterr().err
    assert "cannot change train.lr (0.003 -> 0.5)" in err and "eval.batch_size" in err
    assert (run / "recipe.yaml").read_text() == saved and (run / "state.pt").exists()
    assert main(["finetune", "--resume", str(run), *_sets("eval.batch_size=5", "train.lr=3e-3")]) == 0
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["eval"]["batch_size"] == 5 and recipe["train"]["lr"] == 0.003
    assert json.loads((run / "metrics.json").read_text())["selected_epoch"] == 1
