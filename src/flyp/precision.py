"""Precision and device settings in one place: the precision a run computes in, chosen by the
hardware, and the backend switches a CUDA device wants.

``train.precision`` and ``eval.precision`` are ``auto`` (the default), ``fp32`` or ``bf16``.
``auto`` is bf16 where the hardware computes it natively, fp32 elsewhere:

- a CUDA device that supports bf16 (``torch.cuda.is_bf16_supported``: Ampere and later);
- a CPU with AMX or AVX512-BF16 (x86) or Arm's BF16 extension, as torch reports them;
- anything else (an AVX2-only CPU, an older GPU, MPS): fp32.

bf16 means autocast of the towers; weights, optimizer, logits and losses stay fp32. Without
native support bf16 is emulated and slow: on an AVX2-only EPYC a 1024² bf16 matmul ran at
0.9 GFLOP/s against 134 in fp32, and a CIFAR finetune took 814 s in bf16 against 78 s in fp32.
An explicit ``bf16`` there still runs, with a warning naming the slowdown.

Evaluation, ``flyp evaluate`` and ``flyp predict`` resolve ``eval.precision`` by this one rule,
so on one machine a run's reported accuracy and ``predict`` on the same images agree.
``FLYP_AUTO_PRECISION=fp32`` (or ``bf16``) makes ``auto`` choose that on any hardware: the test
suite sets it, so that its pinned numbers are the same on every machine.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

import flyp.hardware as hw
from flyp.hardware import AUTO_ENV, cpu_bf16_feature, native_bf16  # noqa: F401 - as before
from flyp.recipe import PRECISIONS  # the recipe's choices; resolved here
from flyp.tracking import say

# What bf16 costs where it is emulated (measured on an AVX2-only AMD EPYC): in the warning.
SLOWDOWN = (
    "expect it to run about 10x slower than fp32 (on an AVX2-only EPYC a 1024² bf16 matmul ran "
    "at 0.9 GFLOP/s against 134 in fp32, and a CIFAR finetune took 814 s against 78 s)"
)


@dataclass(frozen=True)
class Precision:
    """What was asked for (auto, fp32, bf16), what runs (``name``: fp32 or bf16), and why."""

    asked: str
    name: str
    device: str  # the device type it was resolved for
    native: bool  # whether the device computes bf16 natively
    hardware: str  # that, in words ("this CPU has native bf16 (AVX512-BF16)")
    forced: bool = False  # auto chose by FLYP_AUTO_PRECISION, not by the hardware

    @property
    def emulated(self) -> bool:
        """bf16 on hardware without native bf16: it runs, slowly."""
        return self.name == "bf16" and not self.native

    @property
    def why(self) -> str:
        if self.forced:
            return f"auto: {AUTO_ENV}={self.name}"
        if self.asked == "auto":
            return f"auto: {self.hardware}"
        return f"asked for, though {self.hardware}" if self.emulated else "asked for"

    def __str__(self) -> str:
        return f"{self.name} ({self.why})"


def resolve(asked: str, device: torch.device | str) -> Precision:
    """The precision ``asked`` (auto, fp32, bf16) means on ``device``."""
    if asked not in PRECISIONS:
        raise ValueError(f"unknown precision '{asked}'; choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    native, hardware = hw.native_bf16(device)
    name, forced = hw.auto_name(native) if asked == "auto" else (asked, False)
    return Precision(asked, name, device.type, native, hardware, forced)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for the towers (weights and optimizer stay fp32), or nothing; ``auto`` is
    resolved for ``device`` first (callers in a loop pass the name they resolved once)."""
    if precision not in ("fp32", "bf16"):
        precision = resolve(precision, device).name
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def run_line(train: Precision | None, evaluation: Precision) -> str:
    """The one line a run starts with: which precision was chosen, and why."""
    if train is None:  # nothing trains (zeroshot, lp)
        return f"precision: eval {evaluation}"
    if train == evaluation:
        return f"precision: train and eval {train}"
    return f"precision: train {train}, eval {evaluation}"


def warning(key: str, chosen: Precision) -> str | None:
    """The warning line for ``key`` (e.g. train.precision) when it asked for bf16 on hardware
    without native bf16, else None."""
    if not chosen.emulated:
        return None
    cost = SLOWDOWN if chosen.device == "cpu" else "expect it to run slower than fp32"
    return (
        f"warning: {key} bf16, but {chosen.hardware}: bf16 is emulated there, {cost}; "
        f"use {key} auto (or fp32)"
    )


def announce(train: Precision | None, evaluation: Precision) -> None:
    """Say on stderr which precision a run chose and why, with a warning for emulated bf16."""
    say(run_line(train, evaluation))
    for key, chosen in (("train.precision", train), ("eval.precision", evaluation)):
        line = warning(key, chosen) if chosen is not None else None
        if line:
            say(line)


def announce_predict(chosen: Precision, given: bool, run_used: str | None) -> None:
    """Say on stderr which precision ``flyp predict`` chose (from ``--precision`` when
    ``given``, else the run's eval.precision), and when it is not what the run's evaluation
    computed in (``run_used``, from the weights' metadata: another machine), that it differs."""
    key = "--precision" if given else "the run's eval.precision"
    line = f"precision: {chosen}, from {key}"
    if run_used and run_used != chosen.name:
        line += (
            f"; the run's evaluation computed in {run_used}, so probabilities may differ slightly "
            f"from its metrics.json (--precision {run_used} to match)"
        )
    say(line)
    alarm = warning("--precision" if given else "eval.precision", chosen)
    if alarm:
        say(alarm)


def configure_device(device: torch.device | str) -> list[str]:
    """The backend settings of a run on ``device``, set once where a run starts (training,
    ``flyp evaluate``, ``flyp predict``). On CUDA: TF32 for float32 matmuls and convolutions
    (10-bit mantissa products, fp32 accumulation: what bf16 autocast leaves in fp32 runs on the
    tensor cores) and cuDNN autotuning (fixed image sizes: the fastest convolution algorithm is
    chosen once per shape). Nothing elsewhere. Returns what was set."""
    if torch.device(device).type != "cuda":
        return []
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    return ["tf32 matmul", "tf32 cudnn", "cudnn benchmark"]
