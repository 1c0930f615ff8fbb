"""What this machine computes natively, as torch reports it, and what precision ``auto`` is
on it: below flyp.precision (which adds the run's line, warnings and autocast) and below
flyp.recipe, whose run settings hold the precision ``auto`` resolved to (flyp.recipe imports
this module only when it resolves, and no flyp module but flyp.errors is imported here).
"""

from __future__ import annotations

import os
import platform

import torch

from flyp.errors import RecipeError

AUTO_ENV = "FLYP_AUTO_PRECISION"


def _cpu_query(name: str) -> bool:
    query = getattr(torch.cpu, name, None)  # private in torch; absent in some versions
    return bool(query()) if query is not None else False


def cpu_bf16_feature() -> str | None:
    """The CPU feature that computes bf16 natively, as torch sees it ("AMX", "AVX512-BF16",
    "Arm BF16"), or None: oneDNN then emulates bf16, far slower than fp32."""
    if _cpu_query("_is_amx_tile_supported"):
        return "AMX"
    if _cpu_query("_is_avx512_bf16_supported"):
        return "AVX512-BF16"
    arm = platform.machine().lower() in ("arm64", "aarch64")
    if arm and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "Arm BF16"
    return None


def _cuda_name(device: torch.device) -> str:
    try:
        return f"CUDA device {torch.cuda.get_device_name(device)!r}"
    except (AssertionError, RuntimeError):  # no CUDA here (tests mock the capability query)
        return f"CUDA device {device}"


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and a phrase saying why (for the run's line)."""
    if device.type == "cuda":
        name = _cuda_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} supports bf16"
        return False, f"{name} has no native bf16"
    if device.type == "cpu":
        feature = cpu_bf16_feature()
        if feature:
            return True, f"this CPU has native bf16 ({feature})"
        return False, "this CPU has no native bf16 (neither AMX nor AVX512-BF16)"
    return False, f"bf16 autocast is not used on {device.type}"


def auto_name(native: bool) -> tuple[str, bool]:
    """What ``auto`` is where the device does (``native``) or does not compute bf16 natively,
    and whether FLYP_AUTO_PRECISION chose it instead of the hardware."""
    override = os.environ.get(AUTO_ENV)
    if override:
        if override not in ("fp32", "bf16"):
            raise RecipeError(f"{AUTO_ENV}={override!r} is not fp32 or bf16; unset it or fix it")
        return override, True
    return ("bf16" if native else "fp32"), False


def resolved_settings(train_precision: str, eval_precision: str, device: str) -> dict[str, str]:
    """``train.precision`` and ``eval.precision`` as run settings: what each means on the device
    ``device`` (train.device; "auto" is this process's GPU, else the CPU) is here, so that a
    run's stored settings say fp32 or bf16, never ``auto`` (which resolves per machine). A
    device this machine does not have (a recipe.yaml read away from its GPU) leaves the asked
    names, which differ from any resolved run's."""
    asked = (train_precision, eval_precision)
    if "auto" not in asked:
        return {"train.precision": asked[0], "eval.precision": asked[1]}
    try:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        native = native_bf16(torch.device(device))[0]
    except (RuntimeError, AssertionError, ValueError):  # no such device here
        return {"train.precision": asked[0], "eval.precision": asked[1]}
    names = [auto_name(native)[0] if name == "auto" else name for name in asked]
    return {"train.precision": names[0], "eval.precision": names[1]}
