"""Runs, reuse and recipes that must not give a silently wrong number (issue 16).

A rerun into the same --out, a resume after its recipe.yaml was edited, a report over unlike
runs, an empty or hostile recipe, an impossible seed or device, a truncated JSON file: each is
refused with one line that names the problem and the fix, before any work. Each test drives
``flyp.cli.main`` (exit status 2, the stderr line) or the public API, on the tiny model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flyp.compare
import flyp.rundir as rundir
import flyp.train as train_mod
from fakes import tiny_overrides
from flyp.cli import main
from flyp.recipe import load_recipe
from flyp.rundir import LOCK_NAME
from flyp.train import finetune


def sets(root: Path, *extra: str) -> list[str]:
    return [f"--set={o}" for o in tiny_overrides(root, "train.epochs=1", *extra)]


def recipe_file(tmp_path: Path) -> str:
    path = tmp_path / "r.yaml"
    path.write_text("name: r\n")
    return str(path)


def one_error(capsys) -> str:
    """The single stderr line of a refused command, without its 'error: ' prefix."""
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # progress lines may come first
    assert not any("Traceback" in line for line in lines), lines
    return errors[0].removeprefix("error: ")


def compare_args(tmp_path, root, out, *extra, seeds=("0",), methods=("flyp",)):
    return [
        "compare",
        recipe_file(tmp_path),
        *sets(root, "eval.wise_alphas=[0, 1]"),
        "--methods",
        *methods,
        "--seeds",
        *seeds,
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def finished_compare(tmp_path_factory):
    """One finished comparison (lp and flyp, seeds 0 and 1, WiSE-FT over [0, 1]); each test
    works on its own copy."""
    from fakes import make_domains

    base = tmp_path_factory.mktemp("finished")
    root = make_domains(base / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], 12)
    out = base / "cmp"
    args = compare_args(base, root, out, seeds=("0", "1"), methods=("lp", "flyp"))
    assert main(args) == 0
    return root, out


@pytest.fixture
def compared(finished_compare, tmp_path):
    root, out = finished_compare
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    return root, copy


def mtimes(folder: Path) -> dict[str, int]:
    return {
        str(p): p.stat().st_mtime_ns for p in folder.rglob("*.json") if p.parent.name != "soups"
    }


# --- 1. reusing work that no longer matches -------------------------------------------------


def test_compare_rerun_with_other_settings_is_refused_naming_the_keys(compared, tmp_path, capsys):
    """flyp compare into an --out holding runs made with other settings refuses them, naming
    each differing key (old -> new), before anything is trained or rewritten."""
    root, out = compared
    before = mtimes(out)
    args = compare_args(
        tmp_path, root, out, "--set", "train.lr=0.01", seeds=("0", "1"), methods=("lp", "flyp")
    )
    assert main(args) == 2
    line = one_error(capsys)
    assert "holds a run made with other settings (train.lr 0.003 -> 0.01" in line
    assert "pass a new --out" in line
    assert mtimes(out) == before
    # what a resume may change (speed, paths, device) reuses every run as it is
    args = compare_args(
        tmp_path, root, out, "--set", "eval.batch_size=7", seeds=("0", "1"), methods=("lp", "flyp")
    )
    assert main(args) == 0
    after = mtimes(out)
    assert all(after[p] == t for p, t in before.items() if "/results" not in p)


def test_compare_refuses_a_killed_run_of_other_settings(compared, tmp_path, capsys):
    """A killed run (recipe.yaml and state, no metrics.json) made with other settings is refused
    too, not resumed with the new ones."""
    root, out = compared
    for name in ("zeroshot", "lp-s0", "lp-s1", "flyp-s0"):
        shutil.rmtree(out / name)
    killed = out / "flyp-s1"
    (killed / "metrics.json").unlink()
    args = compare_args(tmp_path, root, out, "--set", "train.epochs=2", seeds=("1",))
    assert main(args) == 2
    line = one_error(capsys)
    assert f"{killed} holds a run made with other settings (train.epochs 1 -> 2" in line
    assert "from its recipe.yaml" in line and not (out / "zeroshot").exists()


def test_compare_redoes_a_wise_sweep_made_with_other_alphas(compared, tmp_path):
    """A wise.json of other alphas (or of another run) is swept again, not reported as the
    recipe's; the finished runs themselves are reused."""
    root, out = compared
    metrics = (out / "flyp-s0" / "metrics.json").read_text()
    args = compare_args(tmp_path, root, out, seeds=("0", "1"), methods=("lp", "flyp"))
    args += ["--set", "eval.wise_alphas=[0, 0.5, 1]"]
    assert main(args) == 0
    for run in ("flyp-s0", "flyp-s1", "lp-s0", "lp-s1"):
        wise = json.loads((out / run / "wise.json").read_text())
        assert [p["alpha"] for p in wise["points"]] == [0, 0.5, 1], run
    assert (out / "flyp-s0" / "metrics.json").read_text() == metrics
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["flyp"]["wise"]["alphas"] == [0, 0.5, 1]


def test_resume_after_the_recipe_was_edited_is_refused(fake_pacs, tmp_path, capsys):
    """--resume of a killed run whose recipe.yaml was edited (epochs, lr) is refused with the
    keys that differ; its checkpoint stays; a setting a resume may change still resumes."""
    run = tmp_path / "run"
    base = tiny_overrides(fake_pacs, "train.epochs=2", "train.stop_after_steps=2")
    assert (
        main(["finetune", recipe_file(tmp_path), *[f"--set={o}" for o in base], "--out", str(run)])
        == 0
    )
    capsys.readouterr()
    recipe_yaml = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(recipe_yaml.replace("epochs: 2", "epochs: 1"))
    assert main(["finetune", "--resume", str(run)]) == 2
    line = one_error(capsys)
    assert "started with other settings than it is resumed with (train.epochs 2 -> 1)" in line
    assert "start a new run with --out" in line and "train.checkpoint_every" in line
    assert (run / "state.pt").exists() and not (run / "metrics.json").exists()
    assert not (run / LOCK_NAME).exists()
    edited = recipe_yaml.replace("checkpoint_every: 0", "checkpoint_every: 1")
    (run / "recipe.yaml").write_text(edited)
    assert main(["finetune", "--resume", str(run)]) == 0
    assert json.loads((run / "metrics.json").read_text())["settings"]["train.epochs"] == 2


def test_resume_of_a_finished_run_with_an_edited_recipe_is_refused(fake_pacs, tmp_path, capsys):
    """--resume of a finished run returns its results only while recipe.yaml still describes it."""
    run = tmp_path / "run"
    assert main(["finetune", recipe_file(tmp_path), *sets(fake_pacs), "--out", str(run)]) == 0
    capsys.readouterr()
    text = (run / "recipe.yaml").read_text()
    (run / "recipe.yaml").write_text(text.replace("lr: 0.003", "lr: 0.5"))
    assert main(["finetune", "--resume", str(run)]) == 2
    assert "train.lr 0.003 -> 0.5" in one_error(capsys)


def test_run_state_and_metrics_hold_the_run_settings(fake_pacs, tmp_path):
    """state.pt and metrics.json store the run's settings and fingerprint (what the checks read)."""
    recipe = load_recipe(None, tiny_overrides(fake_pacs, "train.stop_after_steps=2"))
    finetune(recipe, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    settings = state["settings"]
    # the values the run was made with, written out (not recomputed by the function under test)
    expected = {"model.spec": "tiny", "train.method": "flyp", "train.lr": 0.003,
                "train.batch_size": 6, "train.epochs": 3, "data.id_domain": "photo",
                "data.ood_domains": ["art", "sketch"], "data.split_seed": 0}  # fmt: skip
    assert {k: settings[k] for k in expected} == expected
    # what a resume may change is no part of them: where the data is, when to stop, the device
    assert not {"data.root", "train.stop_after_steps", "train.device"} & settings.keys()
    recipe.train.stop_after_steps = None  # a setting a resume may change
    metrics = finetune(recipe, tmp_path / "run", resume=True)
    assert metrics["settings"] == settings
    text = json.dumps(settings, sort_keys=True, default=str)  # the fingerprint, by hand
    assert metrics["fingerprint"] == hashlib.sha256(text.encode()).hexdigest()[:16]


# --- 2. flyp report over different experiments ----------------------------------------------


def zeroshot_run(root, tmp_path, name, *extra):
    run = tmp_path / name
    args = ["finetune", recipe_file(tmp_path), *sets(root, "train.method=zeroshot", *extra)]
    assert main([*args, "--out", str(run)]) == 0
    return run


def test_report_refuses_runs_that_differ_in_more_than_the_seed(fake_pacs, tmp_path, capsys):
    """flyp report refuses to average runs of one method that differ in anything but the seed,
    and to compare runs of another model, data or evaluation, naming the keys."""
    a = zeroshot_run(fake_pacs, tmp_path, "a", "train.seed=0")
    b = zeroshot_run(fake_pacs, tmp_path, "b", "train.seed=1", "train.lr=0.5")
    c = zeroshot_run(fake_pacs, tmp_path, "c", "train.seed=2", "data.max_eval=4")
    d = zeroshot_run(fake_pacs, tmp_path, "d", "train.seed=3")
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 2
    line = one_error(capsys)
    assert "are both zeroshot but differ in more than the seed (train.lr 0.003 -> 0.5)" in line
    assert main(["report", str(a), str(c), "--out", str(tmp_path / "rep")]) == 2
    assert "differ in data.max_eval None -> 4" in one_error(capsys)
    assert not (tmp_path / "rep").exists()
    assert main(["report", str(a), str(d), "--out", str(tmp_path / "rep")]) == 0
    results = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert results["methods"]["zeroshot"]["seeds"] == [0, 3]


def test_report_refuses_duplicate_seeds(fake_pacs, tmp_path, capsys):
    """Two runs of one method and seed are not two seeds: flyp report refuses them."""
    a = zeroshot_run(fake_pacs, tmp_path, "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    capsys.readouterr()
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "rep")]) == 2
    assert "are both zeroshot seed 0: a report averages distinct seeds" in one_error(capsys)


# --- 3. merges with nothing to merge --------------------------------------------------------


@pytest.mark.parametrize(
    "flag, seeds, methods, fragment",
    [
        ("--soups", ("0",), ("flyp",), "one seed leaves nothing to merge; give --seeds 0 1"),
        ("--stock", ("0",), ("flyp",), "one seed leaves nothing to merge; give --seeds 0 1"),
        ("--soups", ("0", "1"), ("zeroshot", "lp"), "none of --methods zeroshot lp does"),
    ],
)
def test_soups_with_nothing_to_merge_are_refused(
    fake_pacs, tmp_path, capsys, flag, seeds, methods, fragment
):
    """--soups (or --stock) with one seed, or with no method that trains, is refused up front."""
    out = tmp_path / "cmp"
    assert main(compare_args(tmp_path, fake_pacs, out, flag, seeds=seeds, methods=methods)) == 2
    assert fragment in one_error(capsys)
    assert not out.exists()


# --- 4-6. recipe files ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "null\n", "~\n", "{}\n"])
def test_an_empty_recipe_is_refused(tmp_path, capsys, text):
    """A recipe file with no settings (empty, comments, null) would run every default silently."""
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert main(["finetune", str(path), "--out", str(tmp_path / "run")]) == 2
    assert f"{path} holds no settings" in one_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("3\n", "int"), ("hello\n", "str")])
def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path, capsys, text, kind):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert main(["finetune", str(path), "--out", str(tmp_path / "run")]) == 2
    assert f"a recipe is a mapping of sections, got {kind}" in one_error(capsys)


BOMB = (
    "\n".join(
        ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        + [
            f"{c}: &{c} [{', '.join(['*' + p] * 9)}]"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)
        ]
    )
    + "\n"
)


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path, capsys):
    """A "billion laughs" recipe (nested aliases) is refused within a second, not expanded."""
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    started = time.perf_counter()
    assert main(["finetune", str(path), "--out", str(tmp_path / "run")]) == 2
    assert time.perf_counter() - started < 1.0
    line = one_error(capsys)
    assert "bomb.yaml line 2: alias *a is not allowed in a recipe" in line
    assert "write the value out in full" in line
    started = time.perf_counter()  # the same through --set
    bomb = "data.roots=" + BOMB.replace("\n", ", ").join("{}")
    assert main(["finetune", recipe_file(tmp_path), "--set", bomb]) == 2
    assert time.perf_counter() - started < 1.0
    assert "alias *a is not allowed" in one_error(capsys)


def test_a_recipe_path_that_is_not_a_file_says_what_it_is(tmp_path, capsys):
    """/dev/null, a named pipe or a folder as the recipe: the message says what it is."""
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    for path in ("/dev/null", str(fifo)):
        assert main(["finetune", path, "--out", str(tmp_path / "run")]) == 2
        assert f"recipe file {path} is not a regular file (a device, pipe or socket)" in one_error(
            capsys
        )
    assert main(["finetune", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    assert "is a folder; pass a YAML file" in one_error(capsys)
    assert main(["finetune", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "run")]) == 2
    assert "nope.yaml does not exist" in one_error(capsys)


# --- 7. seeds -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (
            ["--seeds", "0", "-1"],
            "--seeds: -1 is out of range; a seed must be between 0 and 4294967295",
        ),
        (["--seeds", "4294967296"], "--seeds: 4294967296 is out of range"),
        (["--seed", "-3"], "--seeds: -3 is out of range"),
        (["--set", "train.seed=-1"], "train.seed: -1 is out of range"),
        (["--set", "data.split_seed=4294967296"], "data.split_seed: 4294967296 is out of range"),
    ],
)
def test_seeds_outside_numpys_range_are_refused_before_any_work(
    fake_pacs, tmp_path, capsys, extra, fragment
):
    """A seed numpy cannot take (negative, >= 2**32) is refused before anything is built."""
    out = tmp_path / "cmp"
    args = compare_args(tmp_path, fake_pacs, out, seeds=("0",))
    args = args[: args.index("--seeds")] + args[args.index("--out") :]  # the case's own seeds
    assert main([*args, *extra]) == 2
    assert fragment in one_error(capsys)
    assert not out.exists()


def test_the_largest_seed_is_accepted():
    recipe = load_recipe(None, ["train.seed=4294967295", "data.split_seed=4294967295"])
    assert recipe.train.seed == recipe.data.split_seed == 2**32 - 1


# --- 8. devices -----------------------------------------------------------------------------


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_a_cuda_device_where_there_is_none_is_refused(fake_pacs, tmp_path, capsys, monkeypatch):
    """train.device=cuda (or cuda:N) on a machine without that GPU: one line with the valid
    forms and what this machine has, before any work."""
    no_gpu(monkeypatch)
    out = tmp_path / "run"
    for device in ("cuda", "cuda:1"):
        args = ["finetune", recipe_file(tmp_path), *sets(fake_pacs, f"train.device={device}")]
        assert main([*args, "--out", str(out)]) == 2
        line = one_error(capsys)
        assert f"train.device: '{device}' is not available on this machine (here: cpu)" in line
        assert "use auto" in line and not out.exists()
    assert main(compare_args(tmp_path, fake_pacs, out, "--set", "train.device=cuda")) == 2
    assert "is not available on this machine" in one_error(capsys) and not out.exists()


def test_a_gpu_index_beyond_the_gpus_is_refused(fake_pacs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = ["finetune", recipe_file(tmp_path), *sets(fake_pacs, "train.device=cuda:2")]
    assert main([*args, "--out", str(tmp_path / "run")]) == 2
    assert "'cuda:2' is not available on this machine (here: cpu, cuda:0, cuda:1)" in one_error(
        capsys
    )


def test_predict_device_is_checked(fake_pacs, tmp_path, capsys, monkeypatch):
    """flyp predict --device: a name that is no device (gpu) and a GPU that is not there."""
    no_gpu(monkeypatch)
    image = next(fake_pacs.rglob("*.png"))
    assert main(["predict", str(tmp_path), str(image), "--device", "gpu"]) == 2
    line = one_error(capsys)
    assert "--device: 'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps" in line
    assert "(did you mean 'cuda'?)" in line and "here: cpu" in line
    assert main(["predict", str(tmp_path), str(image), "--device", "cuda:0"]) == 2
    assert "--device: 'cuda:0' is not available on this machine (here: cpu)" in one_error(capsys)


# --- 9. truncated JSON ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["metrics.json", "wise.json"])
def test_a_truncated_json_file_is_named_with_the_fix(compared, tmp_path, capsys, name):
    """compare (and wise) rereading a metrics.json or wise.json cut short: one line naming the
    file and the fix, no traceback."""
    root, out = compared
    path = out / "flyp-s0" / name
    path.write_text(path.read_text()[:40])
    args = compare_args(tmp_path, root, out, seeds=("0", "1"), methods=("lp", "flyp"))
    assert main(args) == 2
    line = one_error(capsys)
    assert f"{path} is not valid JSON" in line and "delete it and rerun" in line
    if name == "metrics.json":
        assert main(["wise", str(out / "flyp-s0")]) == 2
        assert f"{path} is not valid JSON" in one_error(capsys)


def test_a_json_file_that_is_not_flyps_is_named(compared, tmp_path, capsys):
    root, out = compared
    (out / "flyp-s1" / "wise.json").write_text("[1, 2]\n")
    assert main(compare_args(tmp_path, root, out, seeds=("0", "1"), methods=("lp", "flyp"))) == 2
    assert "wise.json holds a list, so flyp did not write it; delete it" in one_error(capsys)


# --- 10. waste and leftovers ----------------------------------------------------------------


def test_lp_does_not_depend_on_the_seed(fake_pacs, tmp_path):
    """The probe's fit is seed-free: two seeds give the same weights and numbers (what lets
    compare train lp once)."""
    runs = []
    for seed in (0, 7):
        recipe = load_recipe(
            None, tiny_overrides(fake_pacs, "train.method=lp", f"train.seed={seed}")
        )
        runs.append(
            (
                finetune(recipe, tmp_path / f"s{seed}"),
                load_file(str(tmp_path / f"s{seed}" / "model.safetensors")),
            )
        )
    (m0, w0), (m7, w7) = runs
    assert m0["sets"] == m7["sets"]
    assert w0.keys() == w7.keys() and all(torch.equal(w0[k], w7[k]) for k in w0)


def test_compare_trains_lp_once_and_reports_it_for_each_seed(fake_pacs, tmp_path, monkeypatch):
    """lp is trained on the first seed only; the other seeds get a relabelled copy, the report
    shows std 0 over the seeds and says why."""
    calls = []
    real = flyp.compare.finetune
    monkeypatch.setattr(
        flyp.compare, "finetune", lambda r, d, **kw: calls.append(d.name) or real(r, d, **kw)
    )
    out = tmp_path / "cmp"
    assert main(compare_args(tmp_path, fake_pacs, out, seeds=("0", "1", "2"), methods=("lp",))) == 0
    assert calls == ["zeroshot", "lp-s0"]
    for seed in (1, 2):
        metrics = json.loads((out / f"lp-s{seed}" / "metrics.json").read_text())
        assert metrics["seed"] == seed and metrics["settings"]["train.seed"] == seed
        assert metrics["same_as"] == str(out / "lp-s0")
        assert load_recipe(out / f"lp-s{seed}" / "recipe.yaml").train.seed == seed
        assert json.loads((out / f"lp-s{seed}" / "wise.json").read_text())["seed"] == seed
    lp = json.loads((out / "results.json").read_text())["methods"]["lp"]
    assert lp["seeds"] == [0, 1, 2] and lp["ood_mean"]["std"] == 0
    assert "lp does not depend on the seed: trained once" in (out / "report.md").read_text()


def test_a_finished_or_failed_run_leaves_no_lock_file(fake_pacs, tmp_path):
    """The run directory's lock goes when the run ends: finished, stopped, or failed."""
    stopped = tmp_path / "stopped"
    finetune(load_recipe(None, tiny_overrides(fake_pacs, "train.stop_after_steps=2")), stopped)
    assert (stopped / "state.pt").exists() and not (stopped / LOCK_NAME).exists()
    finetune(load_recipe(None, tiny_overrides(fake_pacs)), stopped, resume=True)
    assert (stopped / "metrics.json").exists() and not (stopped / LOCK_NAME).exists()
    failed = tmp_path / "failed"
    failed.mkdir()
    with pytest.raises(train_mod.RunError, match="the loss is"):
        finetune(
            load_recipe(None, tiny_overrides(fake_pacs, "train.lr=1e12", "train.grad_clip=null")),
            failed,
        )
    assert list(failed.iterdir()) == []


def test_a_lock_file_removed_by_the_run_that_held_it_is_not_trusted(tmp_path, monkeypatch):
    """A process that opened the lock file just before its holder removed it must not run on
    that removed file (a third process could lock a new one): it locks the file now there."""
    path = tmp_path / LOCK_NAME
    path.write_text("")
    stale = open(path, "a+")  # opened by us ...
    path.unlink()  # ... just before the holder finished and removed it
    opened = []

    def fake_open(file, mode="r", *args, **kwargs):
        handle = stale if not opened else open(file, mode, *args, **kwargs)
        opened.append(handle)
        return handle

    monkeypatch.setattr(rundir, "open", fake_open, raising=False)
    lock = rundir.lock_file(path)
    assert len(opened) == 2 and lock is opened[1]
    assert os.fstat(lock.fileno()).st_ino == os.stat(path).st_ino
    with open(path, "a+") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a second run is kept out
    lock.close()


def test_a_log_line_cut_short_by_a_kill_does_not_stop_the_resume(fake_pacs, tmp_path, capsys):
    """A kill while log.jsonl was appended leaves half a line: --resume drops it (it came
    after the checkpoint); a damaged line before the end is named, not a traceback."""
    run = tmp_path / "run"
    args = ["finetune", recipe_file(tmp_path), *sets(fake_pacs, "train.stop_after_steps=2")]
    assert main([*args, "--out", str(run)]) == 0
    log = run / "log.jsonl"
    good = log.read_text()
    log.write_text(good + '{"step": 3, "lo')
    assert main(["finetune", "--resume", str(run), "--set", "train.stop_after_steps=2"]) == 0
    assert log.read_text() == good  # stopped again at step 2: the half line is gone
    log.write_text("garbage\n" + good)
    capsys.readouterr()
    assert main(["finetune", "--resume", str(run)]) == 2
    assert f"{log} line 1 is not a log record" in one_error(capsys)
    log.write_text(good + '{"step": 3, "lo')
    assert main(["finetune", "--resume", str(run)]) == 0
    assert all(json.loads(line) for line in log.read_text().splitlines())
    assert (run / "metrics.json").exists()


def test_a_rerun_on_other_seeds_reuses_the_seed_free_zeroshot_run(compared, tmp_path):
    """out/zeroshot does not depend on the seed: a rerun on --seeds 1 reuses it (and every
    run of seed 1) instead of refusing it as another experiment."""
    root, out = compared
    before = mtimes(out)
    args = compare_args(tmp_path, root, out, seeds=("1",), methods=("lp", "flyp"))
    assert main(args) == 0
    after = mtimes(out)
    assert all(after[p] == t for p, t in before.items() if "/results" not in p)
    results = json.loads((out / "results.json").read_text())
    assert results["methods"]["flyp"]["seeds"] == [1]
