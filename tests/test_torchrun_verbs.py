"""`flyp compare` and `flyp sweep` under torchrun (gloo on the CPU) equal one process; the
process group's timeout and device binding; rank 0's answers shared with every rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from fakes import error_lines, leave_process_group, tiny_overrides
from flyp import distributed
from flyp.cli import main
from flyp.distributed import init_distributed, on_main
from flyp.recipe import RecipeError, load_recipe, run_settings

ROOT = Path(__file__).resolve().parents[1]


# --- the process group: timeout (train.dist_timeout_s) and device_id ----------------------------


@pytest.fixture
def group_calls(monkeypatch) -> list[tuple[tuple, dict]]:
    """init_process_group recorded instead of run, as torchrun's rank 1 of 2 would call it."""
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    return calls


def test_init_binds_the_local_gpu_and_passes_the_timeout_on_cuda(group_calls, monkeypatch):
    bound = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", bound.append)
    env = init_distributed("auto", 600)
    assert env.device == torch.device("cuda", 1) and (env.rank, env.world) == (1, 2)
    assert bound == [torch.device("cuda", 1)]
    assert group_calls == [
        (("nccl",), {"timeout": timedelta(seconds=600), "device_id": torch.device("cuda", 1)})
    ]


def test_init_on_the_cpu_is_gloo_with_the_timeout_and_no_device_id(group_calls):
    init_distributed("cpu", 42.5)
    assert group_calls == [(("gloo",), {"timeout": timedelta(seconds=42.5)})]


def test_init_default_timeout_is_the_recipe_default_1800_s(group_calls):
    init_distributed("cpu")
    assert group_calls[0][1]["timeout"] == timedelta(seconds=1800)
    assert load_recipe(None, []).train.dist_timeout_s == 1800


def test_one_process_never_creates_a_group(group_calls, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert init_distributed("cpu").world == 1 and group_calls == []


class Joined(Exception):
    """Stops a verb right after it joined the process group."""


@pytest.mark.parametrize("verb", ["finetune", "compare", "sweep"])
def test_every_torchrun_verb_joins_with_train_dist_timeout_s(verb, fake_pacs, tmp_path, monkeypatch):
    """finetune, compare and sweep pass the recipe's train.dist_timeout_s to the group."""
    timeouts = []

    def record(*args, timeout=None, **kwargs):
        timeouts.append(timeout)
        raise Joined

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", record)
    monkeypatch.setenv("WORLD_SIZE", "2")
    argv = [verb, "--out", str(tmp_path / "out")]
    argv += [f"--set={o}" for o in tiny_overrides(fake_pacs, "train.dist_timeout_s=120")]
    argv += {"finetune": [], "compare": ["--methods", "ft"], "sweep": ["--grid", "train.lr=1e-3,1e-2"]}[verb]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    with pytest.raises(Joined):
        main([argv[0], str(recipe), *argv[1:]])
    assert timeouts == [timedelta(seconds=120)]


@pytest.mark.parametrize("value", ["0", "-5"])
def test_a_dist_timeout_that_is_not_positive_is_refused(value, fake_pacs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    argv = ["finetune", str(recipe), "--out", str(tmp_path / "run")]
    argv += [f"--set={o}" for o in tiny_overrides(fake_pacs, f"train.dist_timeout_s={value}")]
    assert main(argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert err == [f"error: train.dist_timeout_s: {float(value)} is out of range; it must be > 0"]
    assert not (tmp_path / "run").exists()


def test_the_dist_timeout_is_not_a_run_setting():
    """Resume may change it: how long ranks wait decides no number."""
    recipe = load_recipe(None, ["train.dist_timeout_s=60"])
    assert run_settings(recipe) == run_settings(load_recipe(None, []))


# --- on_main: rank 0 works, every rank gets its answer (or its error) ----------------------------


def _on_main_worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ran = []
    try:
        value = on_main(lambda: ran.append(rank) or {"decided_by": rank})
        try:
            on_main(lambda: (_ for _ in ()).throw(RecipeError(f"bad on rank {rank}")))
            error = None
        except RecipeError as err:
            error = str(err)
        main_flags = [distributed.is_main()]
        Path(out, f"rank{rank}.json").write_text(json.dumps([value, ran, error, main_flags]))
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_process_group()


def test_on_main_runs_once_and_gives_every_rank_rank0s_result_and_error(tmp_path):
    mp.spawn(_on_main_worker, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    zero = json.loads((tmp_path / "rank0.json").read_text())
    one = json.loads((tmp_path / "rank1.json").read_text())
    assert zero == [{"decided_by": 0}, [0], "bad on rank 0", [True]]
    assert one == [{"decided_by": 0}, [], "bad on rank 0", [False]]


def test_on_main_in_one_process_just_runs():
    assert on_main(lambda: 7) == 7 and distributed.is_main()


# --- the group flyp starts, flyp ends ------------------------------------------------------------


def _exit_worker(rank: int, port: int, out: str, callers: bool) -> None:
    """A rank as torchrun starts it (flyp joins the group from the environment), or with a group
    its caller started; then the exit functions run as at a normal exit."""
    import atexit

    torch.set_num_threads(1)
    os.environ.update(
        WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    if callers:
        dist.init_process_group("gloo", rank=rank, world_size=2)
    distributed.init_distributed("cpu", 60)
    dist.barrier()
    atexit._run_exitfuncs()  # what the interpreter runs at a normal exit
    Path(out, f"rank{rank}.json").write_text(json.dumps(dist.is_initialized()))
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("callers", [False, True], ids=["flyps", "callers"])
def test_the_group_flyp_started_is_ended_at_exit_and_a_callers_is_left(callers, tmp_path):
    """A rank that leaves its group alive aborted at exit (SIGABRT) in 7 of 30 two-rank gloo
    runs, after its work was done, and NCCL warns: flyp ends the group it started. A group the
    caller started (a script, a test) stays the caller's."""
    mp.spawn(_exit_worker, args=(_free_port(), str(tmp_path), callers), nprocs=2, join=True)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) is callers


def test_a_finished_verb_ends_flyps_group_together_and_a_failed_one_does_not_wait(
    fake_pacs, monkeypatch, capsys
):
    """A verb that finished ends the group flyp started with a barrier first, so no rank tears
    its connections down while another still works (with gloo a rank leaving alone aborted in
    3 of 16 two-node sweeps; 0 of 38 with it); a failed verb does not wait at a barrier the other ranks may
    never reach; a caller's own group is left alone."""
    ended: list[bool] = []
    monkeypatch.setattr(distributed, "end_distributed", lambda together=False: ended.append(together))
    data = ["data", "--data", str(fake_pacs), "--id-domain", "photo", "--model", "tiny"]
    assert main(data) == 0 and ended == [True]
    assert main(["data", "--data", str(fake_pacs / "nowhere")]) == 2 and ended == [True]
    capsys.readouterr()
    monkeypatch.undo()
    calls: list[str] = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed, "_started", True)
    distributed.end_distributed(together=True)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    distributed.end_distributed()  # at exit after a failure: no barrier
    assert calls == ["destroy"]
    calls.clear()
    monkeypatch.setattr(distributed, "_started", False)  # a group the caller started
    distributed.end_distributed(together=True)
    assert calls == []


# --- the verbs under torchrun equal one process -------------------------------------------------

# Run as each rank: every write under the output folder by a rank other than 0 is recorded
# (flyp writes through os.replace, os.rename, open and copytree), then flyp's CLI runs.
GUARD = """
import builtins, io, os, shutil, sys
log, out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
if os.environ["RANK"] != "0":
    real_open = builtins.open
    def record(what, path):
        if str(path).startswith(out):
            with real_open(log, "a") as f:
                f.write(f"{what} {path}\\n")
    def wrap(what, call, path_arg=0):
        def guarded(*a, **k):
            record(what, a[path_arg])
            return call(*a, **k)
        return guarded
    def opened(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            record("open", file)
        return real_open(file, mode, *a, **k)
    builtins.open = io.open = opened
    os.replace = wrap("replace", os.replace, 1)
    os.rename = wrap("rename", os.rename, 1)
    shutil.copytree = wrap("copytree", shutil.copytree, 1)
from flyp.cli import main
sys.exit(main(args))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flyp_args(data: Path, recipe: Path, out: Path, verb: list[str]) -> list[str]:
    sets = tiny_overrides(
        data, "data.ood_domains=[art]", "train.epochs=1", "train.device=cpu",
        "eval.wise_alphas=[0,0.5,1]", "data.num_workers=0",
    )  # fmt: skip
    return [verb[0], str(recipe), *[f"--set={s}" for s in sets], "--out", str(out), *verb[1:]]


def _launch(tmp_path: Path, args: list[str], out: Path, nodes: int) -> list[str]:
    """torchrun with 2 processes: one node of 2, or 2 "nodes" of 1 on localhost. Returns each
    node's output."""
    guard = tmp_path / "guard.py"
    guard.write_text(GUARD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = [sys.executable, "-m", "torch.distributed.run"]
    script = [str(guard), str(tmp_path / "rank_writes.log"), str(out), *args]
    if nodes == 1:
        commands = [[*run, "--standalone", "--nproc_per_node=2", *script]]
    else:
        port = _free_port()
        commands = [
            [*run, "--nnodes=2", f"--node_rank={r}", "--nproc_per_node=1",
             "--master_addr=127.0.0.1", f"--master_port={port}", *script]
            for r in range(2)
        ]  # fmt: skip
    logs = [tmp_path / f"node{i}.log" for i in range(len(commands))]
    procs = [
        subprocess.Popen(c, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
        for c, log in zip(commands, logs, strict=True)
    ]
    # A node that fails leaves the other waiting in the rendezvous: stop it and show both.
    deadline = time.monotonic() + 600
    while any(p.poll() is None for p in procs):
        if any(p.poll() for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    outputs = [log.read_text(errors="replace") for log in logs]
    shown = "\n".join(f"--- node {i} (exit {p.returncode}):\n{text[-3000:]}"
                       for i, (p, text) in enumerate(zip(procs, outputs, strict=True)))  # fmt: skip
    assert all(p.returncode == 0 for p in procs), shown
    writes = tmp_path / "rank_writes.log"
    assert not writes.exists(), f"ranks other than 0 wrote: {writes.read_text()}"
    return outputs


# Numbers that depend on the clock: everything else must agree.
TIMING = ("train_seconds", "eval_seconds", "train_images_per_second", "seconds",
          "sources")  # a merge's sources: its runs' weights files by size and time  # fmt: skip
# Temperature scaling's T, fitted by scipy's bounded minimiser on the NLL of 9 validation images:
# where that NLL is flat, logits equal to 1e-7 give a T that differs in the 4th digit (measured:
# 1.00512 against 1.00463, 0.39495 against 0.39520), and the ECE and NLL after scaling move with
# it (measured: by 1.5e-4 at most).
FITTED = ("temperature", "_ts")


def assert_same_numbers(a, b, where: str, one: str, two: str) -> None:
    """Equal structure, equal strings (paths with the out folder swapped), numbers equal within
    1e-6 (FITTED ones within 1e-3): the weights agree to float rounding, since the
    global batch, its order and the averaged gradient are the same, and accuracies are counts
    of argmaxes that such rounding does not flip (measured: equal; ECE and NLL within 3e-8)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            if not key.endswith(TIMING):
                assert_same_numbers(a[key], b[key], f"{where}.{key}", one, two)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_numbers(x, y, f"{where}[{i}]", one, two)
    elif isinstance(a, float) and isinstance(b, float) and where.endswith(FITTED):
        assert a == pytest.approx(b, rel=1e-3, abs=1e-3, nan_ok=True), where
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=0, abs=1e-6, nan_ok=True), where
    elif isinstance(a, str) and isinstance(b, str):
        assert a.replace(one, two) == b, where
    else:
        assert a == b, where


def assert_same_outputs(one: Path, two: Path, names: tuple[str, ...]) -> None:
    """Every JSON file named ``names`` under ``one`` exists under ``two`` with the same numbers;
    every other file too (less the images), and nothing more."""
    files_one = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    files_two = sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert files_one == files_two
    compared = 0
    for rel in files_one:
        if rel.suffix == ".safetensors":  # the weights: to float rounding
            a, b = (load_file(str(root / rel)) for root in (one, two))
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=f"{rel} {key}")
        if rel.name in names:
            a, b = (json.loads((root / rel).read_text()) for root in (one, two))
            assert_same_numbers(a, b, str(rel), str(one), str(two))
            compared += 1
    assert compared >= len(names)


@pytest.mark.slow
def test_compare_with_sweep_under_two_processes_equals_one_process(fake_pacs, tmp_path):
    """`flyp compare --sweep` (sweep of 2 points, then zeroshot + ft on 2 seeds with WiSE-FT
    and soups) under torchrun on one node of 2 processes, each rank evaluating its block of
    every set (9 validation and ID test images: 4 and 5): the same files and numbers as 1
    process (sweep choice, every run's metrics, WiSE alpha, soups, report), written by rank 0
    alone."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    verb = ["compare", "--methods", "zeroshot", "ft", "--sweep", "train.lr=1e-3,3e-2",
            "--seeds", "0", "1", "--soups"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_flyp_args(fake_pacs, recipe, one, verb)) == 0
    _launch(tmp_path, _flyp_args(fake_pacs, recipe, two, verb), two, nodes=1)
    names = ("metrics.json", "wise.json", "sweep.json", "sweeps.json", "results.json")
    assert_same_outputs(one, two, names)
    assert (two / "report.md").read_text().replace(str(two), str(one)) == (
        one / "report.md"
    ).read_text()


@pytest.mark.slow
def test_sweep_on_two_nodes_equals_one_process(fake_pacs, tmp_path):
    """`flyp sweep` (2 grid points) on 2 "nodes" of 1 process each (torchrun --nnodes 2,
    rendezvous on 127.0.0.1): the same choice and numbers as 1 process, written by rank 0."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    verb = ["sweep", "--grid", "train.lr=1e-3,3e-2"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_flyp_args(fake_pacs, recipe, one, verb)) == 0
    node0, node1 = _launch(tmp_path, _flyp_args(fake_pacs, recipe, two, verb), two, nodes=2)
    assert_same_outputs(one, two, ("metrics.json", "sweep.json"))
    chosen = json.loads((two / "sweep.json").read_text())["chosen"]["name"]
    assert chosen == json.loads((one / "sweep.json").read_text())["chosen"]["name"]
    # rank 0 prints the table and the choice; rank 1, with the same results, prints nothing
    assert "chosen on ID validation" in node0 and "chosen on ID validation" not in node1
