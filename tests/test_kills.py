"""A run killed at any instant resumes to the run that was never killed.

A kill is stood in for at every point where a run changes its directory: before and after each
atomic rename (the temporary file written, the target not yet replaced; the target replaced)
and around each line appended to the step log (one cut in half too). At each point the run
directory is copied as the kill would leave it, the run is stopped, the copy put back, and the
user's next command run on it: ``--resume``, or the same command again where there is nothing
to resume. No timing luck: every point of the run is visited. ``benchmarks/kill_resume.py``
sends real SIGKILLs at random instants.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flyp.train as train_mod
from fakes import checkpoint_weights, error_lines, tiny_overrides
from flyp.checkpoint import CheckpointError, load_checkpoint, save_state
from flyp.cli import main
from flyp.recipe import load_recipe, save_recipe
from flyp.rundir import LOCK_NAME
from flyp.train import RunError, finetune

ROOT = Path(__file__).resolve().parents[1]
# two epochs of 3 steps, a checkpoint every 2 steps and at each epoch's end, the best epoch
# kept on validation, text dropout (a resume must replay the random stream)
ARGS = ("train.epochs=2", "train.checkpoint_every=2", "model.spec=tiny:0.5")


class Killed(BaseException):
    """Stands in for SIGKILL: nothing catches it (finetune's cleanup runs, but the directory
    is then put back as it was at the kill)."""


def _recipe(root: Path, *extra: str):
    return load_recipe(None, tiny_overrides(root, *ARGS, *extra))


def _recipe_file(root: Path, folder: Path) -> str:
    path = folder / "kills.yaml"
    save_recipe(_recipe(root), path)
    return str(path)


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def _run_killed_at(point: int | None, recipe, run_dir: Path, monkeypatch) -> list[str]:
    """Run ``recipe`` into ``run_dir``, killed at its ``point``-th change of the directory
    (None: not killed). Returns the names of the points the run went through."""
    seen: list[str] = []
    snapshot = run_dir.parent / f"{run_dir.name}.at-kill"
    real_replace, real_append = os.replace, train_mod.append_log

    def reached(name: str) -> None:
        seen.append(name)
        if len(seen) - 1 == point:
            shutil.copytree(run_dir, snapshot, symlinks=True)
            raise Killed(name)

    def replace(src, dst, *args, **kwargs):
        inside = Path(dst).parent == run_dir
        if inside:
            reached(f"before rename {Path(dst).name}")
        real_replace(src, dst, *args, **kwargs)
        if inside:
            reached(f"after rename {Path(dst).name}")

    def append_log(path, record):
        reached("before log line")
        if len(seen) == point:  # the next point: the line cut in half by the kill
            with open(path, "a") as f:
                f.write(json.dumps(record)[:9])
            reached("half a log line")
        real_append(path, record)
        reached("after log line")

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        patch.setattr(train_mod, "append_log", append_log)
        try:
            finetune(recipe, run_dir)
        except Killed:
            shutil.rmtree(run_dir, ignore_errors=True)
            if snapshot.exists():
                shutil.move(snapshot, run_dir)
    return seen


def _go_on(recipe, run_dir: Path) -> dict:
    """What a user does after the kill: --resume, or the same command when nothing was kept."""
    try:
        return finetune(recipe, run_dir, resume=True)
    except RunError as err:
        assert "nothing to resume" in str(err)
        return finetune(recipe, run_dir)


@pytest.mark.slow
def test_a_kill_at_any_change_of_the_run_directory_resumes_to_the_uninterrupted_run(
    fake_pacs, tmp_path, monkeypatch
):
    recipe = _recipe(fake_pacs)
    reference = tmp_path / "reference"
    points = _run_killed_at(None, recipe, reference, monkeypatch)
    full = json.loads((reference / "metrics.json").read_text())
    weights = load_file(str(reference / "model.safetensors"))
    # the run went through its checkpoints, the best weights and the results
    assert points.count("after rename state.pt") == 4  # steps 2, 3 (epoch end), 4, 6
    assert "after rename model.safetensors" in points and points[-1] == "after rename metrics.json"
    for point, name in enumerate(points):
        run_dir = tmp_path / f"killed-{point}"
        _run_killed_at(point, _recipe(fake_pacs), run_dir, monkeypatch)
        result = _go_on(_recipe(fake_pacs), run_dir)
        where = f"killed {name} (point {point})"
        assert result["sets"] == full["sets"], where
        again = load_file(str(run_dir / "model.safetensors"))
        assert again.keys() == weights.keys(), where
        assert all(torch.equal(again[k], weights[k]) for k in weights), where
        assert _losses(run_dir) == _losses(reference), where
        # nothing of the kill is left: no temporary file, no lock, no checkpoint
        left = sorted(p.name for p in run_dir.iterdir())
        assert left == sorted(p.name for p in reference.iterdir()), where


@pytest.mark.slow
def test_a_sigkill_while_the_first_recipe_is_written_leaves_a_folder_the_same_command_takes(
    fake_pacs, tmp_path
):
    """A real SIGKILL (the lock really held by a dead process, the temporary file really
    there): the folder is taken by the same command, and --resume says to run it."""
    run = tmp_path / "run"
    argv = ["finetune", _recipe_file(fake_pacs, tmp_path), "--out", str(run)]
    script = textwrap.dedent(f"""
        import os, signal, sys
        real = os.replace
        def replace(src, dst, *a, **k):  # die with the recipe's temporary file written
            if os.path.dirname(dst) == {str(run)!r}:
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst, *a, **k)
        os.replace = replace
        from flyp.cli import main
        sys.exit(main({argv!r}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()[-2000:]
    left = sorted(p.name for p in run.iterdir())
    assert left[0] == LOCK_NAME and left[1].startswith(".recipe.yaml.") and len(left) == 2
    with pytest.raises(RunError, match="nothing to resume.*start it without --resume"):
        finetune(_recipe(fake_pacs), run, resume=True)
    assert main(argv) == 0
    assert (run / "metrics.json").is_file()
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_sigterm_says_what_ctrl_c_says_and_the_run_resumes(fake_pacs, tmp_path, monkeypatch, capsys):
    """SIGTERM during the 5th step: exit 143, the line Ctrl-C gives, and the printed command
    finishes the run."""
    run = tmp_path / "run"
    argv = ["finetune", _recipe_file(fake_pacs, tmp_path), "--out", str(run)]
    real, calls = train_mod.forward_backward, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, here
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "forward_backward", step)
    before = signal.getsignal(signal.SIGTERM)
    assert main(argv) == 143
    assert signal.getsignal(signal.SIGTERM) is before  # put back after the verb
    err = error_lines(capsys.readouterr().err)
    resume = f"flyp finetune --resume {run}"
    assert err == [
        "interrupted: stopped by SIGTERM; kept "
        f"{run} at its last checkpoint (step 4); resume with: {resume}"
    ]
    assert main(resume.split()[1:]) == 0
    assert json.loads((run / "metrics.json").read_text())["sets"]


def _checkpoint_of(fake_pacs, run: Path) -> dict:
    finetune(_recipe(fake_pacs, "train.stop_after_steps=2"), run)
    return load_checkpoint(run / "state.pt")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("rng"), "'rng' is missing"),
        (lambda s: s.update(step="2"), "'step' is a str, not an int"),
        (lambda s: s.update(step=True), "'step' is a bool, not an int"),
        (lambda s: s.update(weights=[1]), "'weights' is a list, not a dict"),
        (lambda s: s["weights"].update(x="y"), "'weights' holds 'x': str, not a tensor"),
        (lambda s: s["rng"].pop("numpy"), "'rng.numpy' is not a list"),
        (lambda s: s["best"].pop("epoch"), "'best' lacks its epoch"),
        (lambda s: s["optimizer"].pop("param_groups"), "'optimizer.param_groups' is missing"),
        (lambda s: s.update(images_seen=-1), "'step' or a counter is negative"),
    ],
)
def test_a_checkpoint_that_flyp_did_not_write_is_refused_naming_the_field(
    change, message, fake_pacs, tmp_path
):
    run = tmp_path / "run"
    state = _checkpoint_of(fake_pacs, run)
    change(state)
    save_state(state, run / "state.pt")
    with pytest.raises(CheckpointError, match=f"state.pt: {message}"):
        finetune(_recipe(fake_pacs), run, resume=True)
    assert not (run / "metrics.json").exists() and (run / "state.pt").exists()


def test_a_checkpoint_whose_weights_do_not_fit_is_refused_about_resuming(fake_pacs, tmp_path):
    run = tmp_path / "run"
    state = _checkpoint_of(fake_pacs, run)
    state["weights"].pop(next(iter(state["weights"])))
    save_state(state, run / "state.pt")
    with pytest.raises(CheckpointError, match="state.pt does not fit .*the run cannot be resumed"):
        finetune(_recipe(fake_pacs), run, resume=True)


def test_a_two_file_checkpoint_of_an_older_flyp_is_not_resumed(fake_pacs, tmp_path):
    """Before: last.safetensors beside a state.pt without weights; a kill between the two
    writes paired one step's weights with another's optimizer, which nothing can tell."""
    run = tmp_path / "run"
    state = _checkpoint_of(fake_pacs, run)
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in state.pop("weights").items()}
    save_file(weights, str(run / "last.safetensors"))
    save_state(state, run / "state.pt")
    with pytest.raises(CheckpointError, match="older flyp .*last.safetensors.*not resumed"):
        finetune(_recipe(fake_pacs), run, resume=True)


def test_the_checkpoint_holds_the_weights_of_its_own_step(fake_pacs, tmp_path):
    """One file: the weights at step 2 and the step beside them; a run stopped at step 4
    holds other weights."""
    at_2 = _checkpoint_of(fake_pacs, tmp_path / "a")
    finetune(_recipe(fake_pacs, "train.stop_after_steps=4"), tmp_path / "b")
    at_4 = load_checkpoint(tmp_path / "b" / "state.pt")
    assert (at_2["step"], at_4["step"]) == (2, 4)
    key = "model.visual.0.weight"
    assert not torch.equal(at_2["weights"][key], at_4["weights"][key])
    assert torch.equal(checkpoint_weights(tmp_path / "a")[key], at_2["weights"][key])
    assert not (tmp_path / "a" / "last.safetensors").exists()


def test_micro_batch_changes_at_resume_only_where_no_number_depends_on_it(fake_pacs, tmp_path):
    """The gradient cache gives the full batch's gradients, but with dropout each chunk draws
    its own masks: a resume that cuts the batch otherwise would train another run."""
    import dataclasses

    dropout = _recipe(fake_pacs, "train.stop_after_steps=2")  # tiny:0.5: text dropout
    finetune(dropout, tmp_path / "dropout")
    chunked = _recipe(fake_pacs, "train.micro_batch=2")
    with pytest.raises(RunError, match=r"cannot change train.micro_batch \(None -> 2\): "
                       r"dropout drops out at random \(Dropout, 0.5\).*train.micro_batch=null"):  # fmt: skip
        finetune(chunked, tmp_path / "dropout", resume=True)
    # no dropout (tiny, frozen BatchNorm): the cut changes nothing, and the resumed run is the run
    plain = [*ARGS[:-1], "model.spec=tiny"]
    full = finetune(load_recipe(None, tiny_overrides(fake_pacs, *plain)), tmp_path / "full")
    stopped = load_recipe(None, tiny_overrides(fake_pacs, *plain, "train.stop_after_steps=2"))
    finetune(stopped, tmp_path / "plain")
    again = dataclasses.replace(stopped, train=dataclasses.replace(stopped.train, micro_batch=2, stop_after_steps=None))
    resumed = finetune(again, tmp_path / "plain", resume=True)
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)
    assert resumed["selected_epoch"] == full["selected_epoch"]
