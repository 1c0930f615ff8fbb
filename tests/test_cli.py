import json
from pathlib import Path

import yaml

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
    assert metrics["id_name"] == "photo" and metrics["selected_epoch"] in (1, 2)
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
    assert json.loads((run / "metrics.json").read_text())["selected_epoch"] in (1, 2)


def test_cli_unknown_method_is_named(tmp_path, capsys):
    assert main(["finetune", str(RECIPE), "--set", "model.spec=tiny", "--set", "train.method=flip", "--out", str(tmp_path / "r")]) == 2
    assert "unknown method 'flip'" in capsys.readouterr().err
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
