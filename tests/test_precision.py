"""Precision chosen by the hardware (flyp.precision): ``auto``, the default, is bf16 where the
device computes it natively and fp32 elsewhere, for training, evaluation and ``flyp predict``
alike; an explicit bf16 without native support runs with a warning; CUDA runs get TF32 and cuDNN
autotuning. Every hardware branch is driven by mocking torch's own capability queries, so all of
them run on any CPU. (The other test files pin ``auto`` to fp32: tests/conftest.py.)"""

from __future__ import annotations

import csv
import json
import platform
import sys
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import flyp.evaluate
import flyp.predict
import flyp.train
from fakes import tiny_overrides
from flyp.checkpoint import METADATA_KEY, read_metadata
from flyp.cli import main
from flyp.precision import AUTO_ENV, autocast, configure_device, resolve
from flyp.recipe import load_recipe, save_recipe
from flyp.train import prepare

ROOT = Path(__file__).resolve().parents[1]
TORCH_CUDA_QUERY = torch.cuda.is_bf16_supported  # the installed torch's, before any mock
CLASSES = ["dog", "horse", "house"]


def hardware(
    monkeypatch: pytest.MonkeyPatch,
    *,
    cuda: bool = False,
    amx: bool = False,
    avx512_bf16: bool = False,
    arm_bf16: bool = False,
    machine: str = "x86_64",
) -> None:
    """This machine, as torch's capability queries report it; the tests' pin of ``auto`` to
    fp32 (conftest) is lifted. The CUDA query answers True with emulation included, as torch's
    does on older GPUs: only the native answer may count."""
    monkeypatch.delenv(AUTO_ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: arm_bf16)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    # The mock has the installed torch's signature (autospec): a call it would refuse, such as a
    # keyword an older torch lacks, raises here as there, instead of passing on a lambda.
    answer = mock.create_autospec(
        TORCH_CUDA_QUERY, side_effect=lambda including_emulation=True: cuda or including_emulation
    )
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", answer)


def finetune_args(tree: Path, out: Path, *extra: str) -> list[str]:
    """``flyp finetune`` of a recipe that sets nothing (the defaults), on the tiny model."""
    recipe = out.parent / "defaults.yaml"
    recipe.write_text("name: defaults\n")
    sets = tiny_overrides(tree, "train.epochs=1", *extra)
    return ["finetune", str(recipe), "--out", str(out), *[a for s in sets for a in ("--set", s)]]


# --- the rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "machine, device, expected, why",
    [
        ({"cuda": True}, "cuda", "bf16", "supports bf16"),
        ({"cuda": False}, "cuda", "fp32", "has no native bf16"),
        ({"amx": True}, "cpu", "bf16", "this CPU has native bf16 (AMX)"),
        ({"avx512_bf16": True}, "cpu", "bf16", "this CPU has native bf16 (AVX512-BF16)"),
        ({"arm_bf16": True, "machine": "aarch64"}, "cpu", "bf16", "native bf16 (Arm BF16)"),
        # oneDNN's bf16 check also says yes on x86 AVX512 without BF16: emulated, not native
        ({"arm_bf16": True}, "cpu", "fp32", "this CPU has no native bf16"),
        ({}, "cpu", "fp32", "this CPU has no native bf16 (neither AMX nor AVX512-BF16)"),
        ({"cuda": True, "avx512_bf16": True}, "mps", "fp32", "not used on mps"),
    ],
    ids=["cuda-bf16", "cuda-no-bf16", "cpu-amx", "cpu-avx512-bf16", "arm-bf16", "x86-avx512",
         "cpu-avx2", "mps"],  # fmt: skip
)
def test_auto_is_bf16_exactly_where_the_hardware_has_native_bf16(
    machine, device, expected, why, monkeypatch
):
    hardware(monkeypatch, **machine)
    chosen = resolve("auto", device)
    assert chosen.name == expected
    assert chosen.why.startswith("auto: ") and why in chosen.why
    assert not chosen.emulated


def test_explicit_fp32_and_bf16_are_kept_whatever_the_hardware(monkeypatch):
    hardware(monkeypatch, avx512_bf16=True, cuda=True)
    assert resolve("fp32", "cpu").name == resolve("fp32", "cuda").name == "fp32"
    hardware(monkeypatch)  # neither AMX nor AVX512-BF16, no bf16 GPU
    for device in ("cpu", "cuda"):
        chosen = resolve("bf16", device)
        assert chosen.name == "bf16" and chosen.emulated
        assert chosen.why.startswith("asked for, though ")


def test_flyp_auto_precision_overrides_the_hardware_and_a_bad_value_is_one_line(
    monkeypatch, fake_pacs, tmp_path, capsys
):
    hardware(monkeypatch)
    monkeypatch.setenv(AUTO_ENV, "bf16")
    chosen = resolve("auto", "cpu")
    assert chosen.name == "bf16" and chosen.why == f"auto: {AUTO_ENV}=bf16"
    monkeypatch.setenv(AUTO_ENV, "fp16")
    assert main(finetune_args(fake_pacs, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {AUTO_ENV}='fp16' is not fp32 or bf16; unset it or fix it"]
    assert not (tmp_path / "run").exists()


def test_auto_autocasts_cuda_towers_to_bf16_and_fp32_is_no_autocast(monkeypatch):
    hardware(monkeypatch, cuda=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available ... Disabling autocast"
        context = autocast(torch.device("cuda"), "auto")
    assert isinstance(context, torch.autocast)
    assert context.device == "cuda" and context.fast_dtype == torch.bfloat16
    assert not isinstance(autocast(torch.device("cuda"), "fp32"), torch.autocast)


# --- a run: its line, what it computes in, what it records ------------------------------------


@pytest.mark.parametrize(
    "machine, chosen, why",
    [
        ({"avx512_bf16": True}, "bf16", "auto: this CPU has native bf16 (AVX512-BF16)"),
        ({}, "fp32", "auto: this CPU has no native bf16 (neither AMX nor AVX512-BF16)"),
    ],
    ids=["native", "avx2-only"],
)
def test_a_run_says_which_precision_auto_chose_and_why_and_computes_in_it(
    machine, chosen, why, monkeypatch, fake_pacs, tmp_path, capsys
):
    """The default recipe's run on a CPU with and without native bf16: one line at its start,
    training and evaluation in that precision, recorded in metrics.json and the weights."""
    hardware(monkeypatch, **machine)
    used = {"train": set(), "eval": set(), "device": []}
    forward_backward, evaluate_autocast = flyp.train.forward_backward, flyp.evaluate.autocast
    configure = flyp.train.configure_device

    def train_step(*args, **kwargs):
        used["train"].add(kwargs["precision"])
        return forward_backward(*args, **kwargs)

    def eval_autocast(device, precision):
        used["eval"].add(resolve(precision, device).name)
        return evaluate_autocast(device, precision)

    def device_setup(device):
        used["device"].append(torch.device(device))
        return configure(device)

    monkeypatch.setattr(flyp.train, "forward_backward", train_step)
    monkeypatch.setattr(flyp.evaluate, "autocast", eval_autocast)
    monkeypatch.setattr(flyp.train, "configure_device", device_setup)
    run = tmp_path / "run"
    assert main(finetune_args(fake_pacs, run)) == 0
    err = capsys.readouterr().err
    assert f"precision: train and eval {chosen} ({why})" in err
    assert "warning" not in err
    assert used == {"train": {chosen}, "eval": {chosen}, "device": [torch.device("cpu")]}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["precision"] == {"train": chosen, "eval": chosen}
    saved = load_recipe(run / "recipe.yaml")
    assert (saved.train.precision, saved.eval.precision) == ("auto", "auto")
    meta = read_metadata(run / "model.safetensors")
    assert (meta["eval_precision"], meta["eval_precision_used"]) == ("auto", chosen)


def test_explicit_bf16_without_native_bf16_runs_with_a_warning_naming_the_slowdown(
    monkeypatch, fake_pacs, tmp_path, capsys
):
    hardware(monkeypatch)  # an AVX2-only CPU, as torch sees it
    run = tmp_path / "run"
    args = finetune_args(fake_pacs, run, "train.precision=bf16", "eval.precision=bf16")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "precision: train and eval bf16 (asked for, though this CPU has no native bf16" in err
    for key in ("train.precision", "eval.precision"):
        warning = next(line for line in err.splitlines() if f"warning: {key} bf16" in line)
        assert "about 10x slower than fp32" in warning and "0.9 GFLOP/s against 134" in warning
        assert "814 s against 78 s" in warning and f"use {key} auto (or fp32)" in warning
    assert json.loads((run / "metrics.json").read_text())["precision"] == {
        "train": "bf16",
        "eval": "bf16",
    }


def test_data_runs_and_the_pacs_recipes_leave_precision_to_the_hardware(
    monkeypatch, fake_pacs, tmp_path, capsys
):
    """``--data DIR`` (no recipe) and the shipped PACS recipes, whose bf16 was a speed guess
    for this machine, all say auto."""
    hardware(monkeypatch)
    run = tmp_path / "run"
    args = ["finetune", "--data", str(fake_pacs), "--id-domain", "photo", "--model", "tiny",
            "--out", str(run), "--set", "train.epochs=1", "--set", "train.batch_size=6",
            "--set", "data.val_fraction=0.25", "--set", "data.test_fraction=0.25"]  # fmt: skip
    assert main(args) == 0
    assert "precision: train and eval fp32 (auto: this CPU has no native bf16" in capsys.readouterr().err
    saved = load_recipe(run / "recipe.yaml")
    assert (saved.train.precision, saved.eval.precision) == ("auto", "auto")
    for name in ("pacs", "pacs_demo"):
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        assert (recipe.train.precision, recipe.eval.precision) == ("auto", "auto"), name


# --- evaluation and predict agree --------------------------------------------------------------


def _rows(path: Path) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["path"], {})[row["class"]] = float(row["probability"])
    return rows


def test_predict_gives_the_logits_of_the_runs_evaluation_in_its_precision(
    monkeypatch, fake_pacs, tmp_path, capsys
):
    """On a machine where auto is bf16, `flyp evaluate` (the run's evaluation path) and `flyp
    predict` on the same images give the same probabilities, and so the same top-1 and the
    run's reported accuracy; predict in fp32 would not (the check can fail)."""
    hardware(monkeypatch, avx512_bf16=True)
    run = tmp_path / "run"
    assert main(finetune_args(fake_pacs, run)) == 0
    evaluated = {}
    evaluate_many = flyp.evaluate.evaluate_many

    def spy(scorers, loaders, *args, **kwargs):  # inside evaluate_classifier's autocast
        metrics = evaluate_many(scorers, loaders, *args, **kwargs)  # puts them in eval mode
        with torch.no_grad():
            evaluated["photo"] = torch.cat([scorers[0](x).float() for x, _, _ in loaders["photo"]])
        return metrics

    monkeypatch.setattr(flyp.evaluate, "evaluate_many", spy)
    assert main(["evaluate", str(run)]) == 0
    assert "precision: eval bf16 (auto: this CPU has native bf16" in capsys.readouterr().err
    expected = F.softmax(evaluated["photo"], dim=-1)
    samples = prepare(load_recipe(run / "recipe.yaml")).benchmark.tests["photo"]
    paths = [s.path for s in samples]
    tuned = []  # the CPU bf16 tuning (depthwise convs in fp32) that the run's evaluation had
    tune = flyp.predict.tune_cpu_bf16
    monkeypatch.setattr(flyp.predict, "tune_cpu_bf16", lambda model: tuned.append(model) or tune(model))

    def predicted(*extra: str) -> torch.Tensor:
        out = tmp_path / f"predict{len(extra)}.csv"
        assert main(["predict", str(run), *paths, "--top-k", "3", "--out", str(out), *extra]) == 0
        rows = _rows(out)
        return torch.tensor([[rows[p][c] for c in CLASSES] for p in paths])

    same = predicted()
    assert len(tuned) == 1
    err = capsys.readouterr().err
    assert "precision: bf16 (auto: this CPU has native bf16 (AVX512-BF16)), from the run's " \
        "eval.precision" in err  # fmt: skip
    torch.testing.assert_close(same, expected, atol=2e-6, rtol=0)
    assert torch.equal(same.argmax(1), expected.argmax(1))
    labels = np.array([CLASSES.index(s.label) if isinstance(s.label, str) else s.label
                       for s in samples])  # fmt: skip
    accuracy = float(np.mean(same.argmax(1).numpy() == labels))
    assert accuracy == json.loads((run / "metrics.json").read_text())["sets"]["photo"]["accuracy"]

    fp32 = predicted("--precision", "fp32")
    assert len(tuned) == 1  # not tuned again: fp32 needs none
    assert (fp32 - expected).abs().max() > 1e-4  # bf16 and fp32 differ: the check above can fail
    assert "the run's evaluation computed in bf16, so probabilities may differ slightly" in (
        capsys.readouterr().err
    )


def test_predict_takes_old_weights_precision_from_their_recipe_and_refuses_bad_ones(
    monkeypatch, fake_pacs, tmp_path, capsys
):
    """Weights from before the metadata named eval.precision take it from the recipe.yaml beside
    them; a tampered value, or a bad --precision, is one line and exit status 2."""
    hardware(monkeypatch)
    run = tmp_path / "run"
    assert main(finetune_args(fake_pacs, run, "train.method=zeroshot")) == 0
    tensors = load_file(str(run / "model.safetensors"))
    meta = read_metadata(run / "model.safetensors")
    image = str(next((fake_pacs / "photo" / "dog").iterdir()))

    old = tmp_path / "old"
    old.mkdir()
    older = {k: v for k, v in meta.items() if not k.startswith("eval_precision")}
    save_file(tensors, str(old / "model.safetensors"), {METADATA_KEY: json.dumps(older)})
    save_recipe(load_recipe(run / "recipe.yaml", ["eval.precision=bf16"]), old / "recipe.yaml")
    capsys.readouterr()
    assert main(["predict", str(old / "model.safetensors"), image]) == 0
    err = capsys.readouterr().err
    assert "precision: bf16 (asked for, though this CPU has no native bf16" in err
    assert "warning: eval.precision bf16" in err

    tampered = tmp_path / "tampered.safetensors"
    bad = {**meta, "eval_precision": "fp16"}
    save_file(tensors, str(tampered), {METADATA_KEY: json.dumps(bad)})
    assert main(["predict", str(tampered), image]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tampered}: its metadata's eval_precision")
    assert "'fp16', not one of auto, fp32, bf16" in err[0]
    with pytest.raises(SystemExit) as exit_status:
        main(["predict", str(run), image, "--precision", "fp16"])
    assert exit_status.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--precision: invalid choice: 'fp16'" in err[0]


# --- CUDA settings -----------------------------------------------------------------------------


CUDA_FLAGS = [
    (torch.backends.cuda.matmul, "allow_tf32"),
    (torch.backends.cudnn, "allow_tf32"),
    (torch.backends.cudnn, "benchmark"),
]


def test_cuda_runs_get_tf32_and_cudnn_autotuning_and_cpu_runs_do_not():
    saved = [getattr(owner, name) for owner, name in CUDA_FLAGS]
    try:
        for owner, name in CUDA_FLAGS:
            setattr(owner, name, False)
        assert configure_device("cpu") == []
        assert [getattr(owner, name) for owner, name in CUDA_FLAGS] == [False, False, False]
        configure_device(torch.device("cuda", 0))
        assert [getattr(owner, name) for owner, name in CUDA_FLAGS] == [True, True, True]
    finally:  # process-wide switches: put back what the other tests had
        for (owner, name), value in zip(CUDA_FLAGS, saved, strict=True):
            setattr(owner, name, value)


# --- benchmarks/profile_step.py: no MFU over 100% ----------------------------------------------


def test_profile_step_counts_flops_by_dtype_at_each_dtypes_peak_and_flags_the_impossible():
    """The 270% came from one bf16 "peak" (1 GFLOP/s: a 1024² matmul in torch's emulated bf16)
    set against all of a step's FLOPs, some of them fp32, the rest emulated bf16 convolutions
    that ran faster than that square matmul. Each dtype's FLOPs now count at the machine's peak
    for them, never below the fp32 one (emulated bf16 runs on the fp32 units)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import profile_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with profile_step.by_dtype_counter(display=False) as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a @ b
        a @ b
        a @ b
    assert counter.by_dtype == {"bf16": 2 * 8 * 16 * 4, "fp32": 2 * 2 * 8 * 16 * 4}
    native = {"fp32": 100.0, "bf16": 400.0}
    # 50 GFLOP in fp32 and 200 in bf16 take 0.5 s each at their peaks: all of one second
    assert profile_step.mfu({"fp32": 50e9, "bf16": 200e9}, 1.0, native) == pytest.approx(1.0)
    emulated = {"fp32": 134.0, "bf16": 1.0}  # the AVX2-only EPYC
    assert profile_step.mfu({"bf16": 2.7e9}, 1.0, emulated) == pytest.approx(2.7 / 134)
    assert profile_step.shown(0.129) == "12.9%"
    impossible = profile_step.mfu({"fp32": 270e9}, 1.0, native)  # e.g. a peak timed while busy
    assert impossible == pytest.approx(2.7) and profile_step.shown(impossible) == ">100%?"


def test_the_torch_flyp_allows_has_the_cuda_query_flyp_calls():
    """precision asks torch.cuda.is_bf16_supported(including_emulation=False), a keyword
    torch 2.4 added: pyproject.toml must not allow a torch without it (every CUDA run there
    would crash), and the installed torch takes it (the mocks above copy its signature)."""
    import inspect
    import re

    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    bound = re.search(r'"torch>=(\d+)\.(\d+)', text)
    assert bound and (int(bound[1]), int(bound[2])) >= (2, 4), "torch's lower bound must be >= 2.4"
    assert "including_emulation" in inspect.signature(torch.cuda.is_bf16_supported).parameters
