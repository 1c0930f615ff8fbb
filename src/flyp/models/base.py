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
