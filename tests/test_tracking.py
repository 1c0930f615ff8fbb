"""Experiment tracking (train.log_to): TensorBoard event files and W&B offline runs hold what
log.jsonl and metrics.json hold, step by step; flyp compare gives one tracker run per method
and seed."""

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from fakes import tiny_overrides
from flyp.compare import compare
from flyp.recipe import RecipeError, load_recipe
from flyp.tracking import check_trackers, open_tracker
from flyp.train import finetune


@pytest.fixture(autouse=True)
def wandb_sandbox(tmp_path, monkeypatch):
    """W&B's own files in this test's folder; WANDB_MODE unset, so flyp's default (offline)
    is what runs."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def needs_wandb() -> None:
    """Skips a test that writes W&B runs where wandb is not installed (the GPU machine of
    benchmarks/gpu_check.sh), with the reason in pytest -rs."""
    pytest.importorskip("wandb", reason="W&B tests need wandb: pip install 'flyp[wandb]'")


def tiny_recipe(root, *extra):
    return load_recipe(None, tiny_overrides(root, *extra))


def log_lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


def f32(value: float) -> float:
    """What a TensorBoard scalar holds: the value rounded to float32."""
    return float(np.float32(value))


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def final_expected(metrics: dict, step: int, cast=float) -> dict[str, list[tuple[int, float]]]:
    """metrics.json's numbers under the names the trackers give them."""
    expected = {
        f"final/{name}/{key}": [(step, cast(value))]
        for name, values in metrics["sets"].items()
        for key, value in values.items()
        if key != "n"
    }
    expected["final/id"] = [(step, cast(metrics["id"]))]
    expected["final/ood_mean"] = [(step, cast(metrics["ood_mean"]))]
    return expected


def wandb_run(run_dir: Path) -> dict:
    """The one W&B offline run under ``run_dir``, read back from its .wandb file (W&B's record
    log: a 7-byte file header, then records in 32 KiB blocks, each chunk with a 7-byte header
    of CRC, length and type; FULL=1 or FIRST, MIDDLE..., LAST=4)."""
    import wandb
    from wandb.proto import wandb_internal_pb2

    wandb.teardown()  # W&B's service writes the file behind run.finish(); this waits for it
    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    run: dict = {"history": {}, "summary": {}}
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):
            continue
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        pending = b""
        which = record.WhichOneof("record_type")
        if which == "run":
            run["name"], run["project"] = record.run.display_name, record.run.project
            run["config"] = {u.key: json.loads(u.value_json) for u in record.run.config.update}
        elif which == "history":
            items = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            run["history"][items["_step"]] = items
        elif which == "summary":
            for u in record.summary.update:
                run["summary"][u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
    return run


@pytest.mark.slow
def test_tensorboard_event_file_holds_the_logged_scalars(fake_pacs, tmp_path):
    run_dir = tmp_path / "run"
    finetune(tiny_recipe(fake_pacs, "train.log_to=[tensorboard]"), run_dir)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    scalars = tensorboard_scalars(run_dir)
    lines = log_lines(run_dir)
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 10))  # 18 train images / 6 x 3 epochs
    for key in ("loss", "lr", "temperature"):
        assert scalars[f"train/{key}"] == [(x["step"], f32(x[key])) for x in steps], key
    vals = [x for x in lines if "val" in x]
    assert [x["step"] for x in vals] == [3, 6, 9]
    assert scalars["val/accuracy"] == [(x["step"], f32(x["val"])) for x in vals]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = {tag: points for tag, points in scalars.items() if tag.startswith("final/")}
    assert final == final_expected(metrics, 9, f32)
    named = {"final/art/accuracy", "final/art/macro_f1", "final/sketch/worst_class_accuracy"}
    assert named <= set(final)


@pytest.mark.slow
def test_resumed_run_shows_each_step_once(fake_pacs, tmp_path):
    """Killed after step 6 with its last checkpoint at step 4: the resumed run logs steps 5 and
    6 again, and TensorBoard shows them once, as log.jsonl does."""
    needs_wandb()
    import wandb

    run_dir = tmp_path / "run"
    args = ("train.log_to=[tensorboard, wandb]",)
    assert finetune(tiny_recipe(fake_pacs, *args, "train.stop_after_steps=4"), run_dir) == {
        "stopped_at_step": 4
    }
    # the stopped run closed its trackers: its steps are on disk, its W&B run is finished
    assert [step for step, _ in tensorboard_scalars(run_dir)["train/loss"]] == [1, 2, 3, 4]
    assert wandb.run is None
    at_step_4 = (run_dir / "state.pt").read_bytes()
    recipe = tiny_recipe(fake_pacs, *args, "train.stop_after_steps=6")
    assert finetune(recipe, run_dir, resume=True) == {"stopped_at_step": 6}
    assert wandb.run is None  # stopped at an epoch's end this time
    (run_dir / "state.pt").write_bytes(at_step_4)  # as if killed before the step-6 checkpoint
    finetune(tiny_recipe(fake_pacs, *args), run_dir, resume=True)
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 3
    lines = log_lines(run_dir)
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 10))
    scalars = tensorboard_scalars(run_dir)
    assert scalars["train/loss"] == [(x["step"], f32(x["loss"])) for x in steps]
    assert [step for step, _ in scalars["val/accuracy"]] == [3, 6, 9]
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 3  # W&B: one offline run per start


@pytest.mark.slow
def test_wandb_offline_run_holds_steps_config_and_summary(fake_pacs, tmp_path):
    needs_wandb()
    run_dir = tmp_path / "flyp-s0"
    recipe = tiny_recipe(fake_pacs, "train.log_to=[wandb]", "train.epochs=2")
    recipe.name = "trackme"
    finetune(recipe, run_dir)
    run = wandb_run(run_dir)  # offline: no network, no W&B account
    assert (run["name"], run["project"]) == ("flyp-s0", "trackme")
    assert run["config"]["train"]["log_to"] == ["wandb"] and run["config"]["train"]["lr"] == 3e-3
    lines = log_lines(run_dir)
    steps = {x["step"]: x for x in lines if "loss" in x}
    assert sorted(run["history"]) == sorted(steps) == list(range(1, 7))
    for step, x in steps.items():
        logged = run["history"][step]
        assert [logged[f"train/{k}"] for k in ("loss", "lr", "temperature")] == [
            x["loss"],
            x["lr"],
            x["temperature"],
        ], step
    assert [(x["step"], x["val"]) for x in lines if "val" in x] == [
        (step, run["history"][step]["val/accuracy"]) for step in (3, 6)
    ]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    final = {k: [(6, v)] for k, v in run["summary"].items() if k.startswith("final/")}
    assert final == final_expected(metrics, 6)


def test_wandb_mode_from_the_environment_wins(tmp_path, monkeypatch):
    needs_wandb()
    recipe = load_recipe(None, ["train.log_to=[wandb]"])
    tracker = open_tracker(recipe, tmp_path / "offline", is_main=True)
    tracker.close()
    assert len(list((tmp_path / "offline").glob("wandb/offline-run-*/run-*.wandb"))) == 1
    monkeypatch.setenv("WANDB_MODE", "disabled")
    (tmp_path / "disabled").mkdir()
    tracker = open_tracker(recipe, tmp_path / "disabled", is_main=True)
    tracker.log({"step": 1, "epoch": 1, "loss": 1.0, "lr": 0.1, "temperature": 0.01}, 1)
    tracker.close()
    assert list((tmp_path / "disabled").iterdir()) == []


def test_only_rank_0_tracks_and_only_when_asked(tmp_path):
    both = load_recipe(None, ["train.log_to=[tensorboard, wandb]"])
    assert open_tracker(both, tmp_path, is_main=False).writers == []
    assert open_tracker(load_recipe(None), tmp_path, is_main=True).writers == []
    assert list(tmp_path.iterdir()) == []


def test_log_to_refuses_unknown_and_repeated_trackers():
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["train.log_to=[wandb, tensorbord]"])
    assert str(err.value) == (
        "train.log_to[1]: 'tensorbord' is not one of tensorboard, wandb "
        "(did you mean 'tensorboard'?)"
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["train.log_to=[wandb, tensorboard, wandb]"])
    assert str(err.value) == "train.log_to lists 'wandb' twice; list each tracker once"
    assert load_recipe(None).train.log_to == []
    assert load_recipe(None, ["train.log_to=[wandb, tensorboard]"]).train.log_to == [
        "wandb",
        "tensorboard",
    ]


@pytest.mark.parametrize(
    "tracker, module", [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")]
)
def test_missing_tracker_package_refused_leaving_nothing(
    tracker, module, fake_pacs, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    recipe = tiny_recipe(fake_pacs, f"train.log_to=[{tracker}]")
    message = f"train.log_to={tracker} needs the {tracker} package: pip install 'flyp[{tracker}]'"
    with pytest.raises(RecipeError, match=f"^{re.escape(message)}$"):
        check_trackers(recipe)
    with pytest.raises(RecipeError, match=f"^{re.escape(message)}$"):
        finetune(recipe, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compare_logs_one_tracker_run_per_method_and_seed(fake_pacs, tmp_path):
    needs_wandb()
    recipe = tiny_recipe(fake_pacs, "train.log_to=[tensorboard, wandb]", "train.epochs=1")
    recipe.name = "cmp"
    out = tmp_path / "out"
    compare(recipe, ["zeroshot", "lp", "flyp"], [0, 1], out, wise=False)
    names = ["zeroshot", "lp-s0", "flyp-s0", "lp-s1", "flyp-s1"]
    assert sorted(p.parent.name for p in out.glob("*/metrics.json")) == sorted(names)
    # lp does not depend on the seed: lp-s1 is lp-s0 relabelled, and no tracker run claims it
    assert not (out / "lp-s1" / "wandb").exists() and not (out / "lp-s1" / "tensorboard").exists()
    names.remove("lp-s1")
    for name in names:
        run = wandb_run(out / name)
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert (run["name"], run["project"]) == (name, "cmp")
        assert run["config"]["train"]["method"] == name.split("-")[0]
        assert run["summary"]["final/ood_mean"] == metrics["ood_mean"]
        last = 3 if name.startswith("flyp") else 0  # lp and zeroshot train no steps
        scalars = tensorboard_scalars(out / name)
        assert scalars["final/ood_mean"] == [(last, f32(metrics["ood_mean"]))], name
        assert run["config"]["train"]["seed"] == (0 if name == "zeroshot" else int(name[-1]))
