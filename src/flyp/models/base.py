"""What every model in flyp is: a two-tower module plus the tokenizer and transforms that fit it.

A model is any ``nn.Module`` with ``encode_image(images)``, ``encode_text(tokens)`` and a
``logit_scale`` parameter holding log(1 / temperature), the interface open_clip's CLIP has.
SigLIP-style models also carry ``logit_bias``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn


class ModelSpecError(ValueError):
    """A model spec that cannot be loaded; the message says what to pass instead."""


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: Callable[[list[str]], Tensor]
    train_transform: Callable
    eval_transform: Callable
    spec: str
    image_size: int
    loss: str = "clip"  # the contrastive loss the model was pretrained with: "clip" or "siglip"


def trim_padding(tokens: Tensor, pad_id: int = 0, min_length: int = 1) -> Tensor:
    """Drop trailing columns that are padding in every row (text cost grows with length)."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    length = int(used.max()) + 1 if len(used) else min_length
    return tokens[:, : max(length, min_length)]


def prefers_channels_last(model: nn.Module) -> bool:
    """Convolutional towers (those with BatchNorm2d) run 1.3-2.2x faster channels_last on CPU;
    a ViT ran ~1.3x slower, so it keeps the default layout (docs/scale_and_speed.md)."""
    return any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def to_model_layout(images: Tensor, channels_last: bool) -> Tensor:
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def image_transforms(size: int, mean, std, crop_scale: tuple[float, float] = (0.5, 1.0)):
    """(train, eval) transforms: random resized crop + flip for training; resize + centre crop
    for evaluation; both end in the normalisation the image tower's weights expect."""
    from torchvision import transforms as T

    normalize = T.Normalize(mean, std)
    train = T.Compose(
        [
            T.RandomResizedCrop(size, scale=crop_scale),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            normalize,
        ]
    )
    evaluation = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), normalize])
    return train, evaluation


# CPU bf16 autocast, tuned per operator (benchmarks/profile_step.py): oneDNN's bf16 depthwise
# convolution backward is ~2.7x slower than its fp32 one, while 1x1 convolutions and matmuls
# gain from bf16; and for short sequences the math attention beats the flash kernel.
SHORT_SEQUENCE = 160  # image tokens up to which the math attention is faster in bf16 on CPU


class _Fp32Forward:
    """A module's own forward, run in fp32 while CPU autocast is on (output back in the input's
    dtype). A class rather than a closure so that a deep copy of the model calls the copy."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, x: Tensor) -> Tensor:
        forward = type(self.module).forward
        if not torch.is_autocast_enabled("cpu"):
            return forward(self.module, x)
        with torch.autocast("cpu", enabled=False):
            return forward(self.module, x.float()).to(x.dtype)


class _MathAttention:
    """``encode_image`` with the math attention kernel while CPU autocast is on."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, images: Tensor) -> Tensor:
        encode = type(self.model).encode_image
        if not torch.is_autocast_enabled("cpu"):
            return encode(self.model, images)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return encode(self.model, images)


def tune_cpu_bf16(model: nn.Module) -> list[str]:
    """Make CPU bf16 autocast fast for ``model`` (idempotent; no effect without autocast):
    depthwise convolutions run in fp32, and a ViT image tower of at most ``SHORT_SEQUENCE``
    tokens uses the math attention. Returns what was changed."""
    changed = []
    for name, m in model.named_modules():
        depthwise = isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
        if depthwise and not isinstance(m.__dict__.get("forward"), _Fp32Forward):
            m.forward = _Fp32Forward(m)
            changed.append(name)
    grid = getattr(getattr(model, "visual", None), "grid_size", None)
    short = grid is not None and int(torch.tensor(grid).prod()) + 1 <= SHORT_SEQUENCE
    if short and not isinstance(model.__dict__.get("encode_image"), _MathAttention):
        model.encode_image = _MathAttention(model)
        changed.append("encode_image: math attention")
    return changed


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of returning it to the system: a training
    step frees and re-allocates the same large buffers (activations, a 50 MB embedding gradient),
    and every fresh mapping costs page faults (1.3x on this machine's FLYP step,
    docs/scale_and_speed.md). Resident memory then stays at its peak. Process-wide; off with
    FLYP_KEEP_FREED_MEMORY=0; does nothing where glibc's mallopt is missing."""
    import ctypes
    import os

    if os.environ.get("FLYP_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
