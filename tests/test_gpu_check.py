"""The one-call GPU check (issue 15, part 5): benchmarks/gpu_check.sh's stages are independent
and its summary always prints, its wheels are pinned to what the tests pass with, MFU is taken
against the card's datasheet peak, and the suite's runs train on FLYP_TEST_DEVICE."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flyp.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STAGES = ["versions", "speed (gpu_check.py)", "compare + bf16 run", "test suite"]


def gpu_check(tmp_path: Path, python: str, **env: str) -> subprocess.Popen:
    """gpu_check.sh's CPU dry run with ``python`` as its interpreter (a stub that fails or
    hangs), its summary under tmp_path; stdout and stderr together."""
    settings = {**os.environ, "PYTHON": python, "WORK": str(tmp_path / "work"), **env}
    settings["WHEELS"] = str(tmp_path / "no-wheels")  # no install stage: versions comes first
    settings.pop("OUT", None)
    return subprocess.Popen(
        ["bash", str(SCRIPT), "--device", "cpu"],
        cwd=tmp_path,
        env=settings,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def stub(tmp_path: Path, body: str) -> str:
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def summary(out: str) -> dict[str, str]:
    """Each stage's verdict in the summary block at the end of the output."""
    block = out.split("##### summary")[-1]
    return {s: re.search(rf"^{re.escape(s)}\s+(\S+(?: run)?)", block, re.M)[1] for s in STAGES}


def test_gpu_check_stages_are_independent_and_the_summary_lists_every_one(tmp_path):
    """Every stage fails (an interpreter that always fails): each still runs, the summary lists
    each with its status, and the exit status is 1."""
    done = gpu_check(tmp_path, stub(tmp_path, "exit 3"))
    out, _ = done.communicate(timeout=120)
    assert done.returncode == 1, out
    assert summary(out) == dict.fromkeys(STAGES, "rc=3")
    assert all(f"##### {s} (cap" in out for s in STAGES)  # each one ran
    assert out.rstrip().endswith("gpu_check: FAILED (see above)")


def test_gpu_check_stopped_by_a_signal_still_prints_the_summary(tmp_path):
    """TERM while a stage hangs (what the device tool's time limit sends): the stage is
    stopped, the summary still prints with the rest 'not run', on stdout and on disk, exit 143."""
    done = gpu_check(tmp_path, stub(tmp_path, "exec sleep 60"))
    time.sleep(3)  # the versions stage is running its stub
    os.killpg(done.pid, signal.SIGTERM)  # the whole call, as a time limit does
    out, _ = done.communicate(timeout=60)
    assert done.returncode == 143, out
    assert summary(out) == {
        "versions": "stopped",
        **dict.fromkeys(STAGES[1:], "not run"),
    }
    assert "versions" in (tmp_path / "work-summary.txt.final").read_text()


def test_gpu_check_budget_caps_each_stage_and_leaves_time_for_the_summary(tmp_path):
    """BUDGET=25: the hanging first stage is stopped at its cap (25 - 15 s kept for the
    summary), the stages after it are not run, and the call ends within the budget."""
    tick = time.time()
    done = gpu_check(tmp_path, stub(tmp_path, "exec sleep 60"), BUDGET="25")
    out, _ = done.communicate(timeout=120)
    assert time.time() - tick < 25 + 5, out
    assert done.returncode == 1 and "##### versions: stopped at its 10 s cap" in out
    assert summary(out) == {"versions": "timeout", **dict.fromkeys(STAGES[1:], "not run")}


def test_gpu_check_wheels_are_pinned_to_the_versions_the_tests_pass_with():
    """gpu_fetch_wheels.sh fetches exact versions, the ones this environment runs."""
    text = (ROOT / "benchmarks" / "gpu_fetch_wheels.sh").read_text()
    pins = dict(re.findall(r"\[(\w+)\]=([\w.]+)", re.search(r"PINS=\((.*)\)", text)[1]))
    assert set(pins) == {"open_clip_torch", "ftfy", "wcwidth", "timm"}
    assert '"$name==${PINS[$name]}"' in text  # what pip download is asked for
    assert {name: importlib.metadata.version(name) for name in pins} == pins


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),  # SXM
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA H200 NVL", 835.5),
        ("NVIDIA GH200 480GB", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100-PCIE-40GB", 312.0),
        ("NVIDIA GeForce RTX 4090", None),  # not listed: no MFU rather than a guessed one
    ],
)
def test_gpu_check_mfu_peak_is_the_cards_datasheet_bf16_peak(name, tflops):
    assert load_gpu_check().card_peak_tflops(name) == tflops


def test_test_device_is_the_default_train_device_and_a_named_device_stays(test_device):
    """Recipes that leave train.device out train on FLYP_TEST_DEVICE (cpu unless set), so the
    suite under FLYP_TEST_DEVICE=cuda trains on the GPU; a device a test names is kept."""
    assert test_device == (os.environ.get("FLYP_TEST_DEVICE") or "cpu")
    assert load_recipe(None).train.device == test_device
    assert load_recipe(None, ["train.epochs=2"]).train.device == test_device
    assert load_recipe(None, ["train.device=auto"]).train.device == "auto"


@pytest.mark.parametrize(
    "value, message",
    [
        ("gpu", "FLYP_TEST_DEVICE=gpu is not a device; use cpu, cuda, cuda:N or mps"),
        ("cuda", "FLYP_TEST_DEVICE=cuda but torch sees no GPU here; unset it to test on the CPU"),
    ],
)
def test_a_bad_test_device_stops_the_session_with_one_line(value, message, tmp_path):
    env = {**os.environ, "FLYP_TEST_DEVICE": value, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--co",
         str(ROOT / "tests" / "test_gpu_check.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 4  # pytest's usage error
    assert f"ERROR: {message}" in done.stderr


def test_tf32_tolerance_widens_only_where_cuda_runs_float32_as_tf32(monkeypatch):
    """Tests comparing a GPU run's values with CPU ones allow TF32's error there; on the CPU
    they check what they always checked."""
    from fakes import TF32_ATOL, tf32_atol

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tf32_atol(2e-6) == 2e-6
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:  # a torch flag, not an attribute monkeypatch can restore
        matmul.allow_tf32 = False
        assert tf32_atol(2e-6) == 2e-6
        matmul.allow_tf32 = True
        assert tf32_atol(2e-6) == TF32_ATOL and tf32_atol(0.1) == 0.1
    finally:
        matmul.allow_tf32 = before
