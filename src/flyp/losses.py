"""Losses: CLIP's symmetric InfoNCE (with class-collision variants), SigLIP's sigmoid loss, CE.

All take L2-normalised features. ``labels`` (class ids of the captions) are only needed by
the collision variants: in FLYP a batch often holds several captions of the same class,
which plain InfoNCE treats as negatives of each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

COLLISIONS = ("none", "mask", "soft")


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    labels: Tensor | None = None,
    collisions: str = "none",
) -> Tensor:
    """Symmetric InfoNCE over a batch of matched (image, caption) pairs.

    collisions:
      "none": the i-th caption is the only positive of the i-th image (CLIP, FLYP).
      "mask": captions of the same class as the positive are removed from the denominators.
      "soft": every same-class caption is a positive; targets spread uniformly over them.
    """
    logits = logit_scale * image_features @ text_features.t()
    n = logits.shape[0]
    if collisions == "none":
        target = torch.arange(n, device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    if labels is None:
        raise ValueError(f"collisions='{collisions}' needs the class labels of the batch")
    same = labels[:, None] == labels[None, :]
    if collisions == "mask":
        eye = torch.eye(n, dtype=torch.bool, device=logits.device)
        masked = logits.masked_fill(same & ~eye, float("-inf"))
        target = torch.arange(n, device=logits.device)
        return (F.cross_entropy(masked, target) + F.cross_entropy(masked.t(), target)) / 2
    if collisions == "soft":
        target = same.float() / same.float().sum(dim=1, keepdim=True)
        return (soft_cross_entropy(logits, target) + soft_cross_entropy(logits.t(), target)) / 2
    raise ValueError(f"unknown collisions option '{collisions}'; choose one of {COLLISIONS}")


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor | float,
    logit_bias: Tensor | float,
    labels: Tensor | None = None,
    collisions: str = "none",
) -> Tensor:
    """SigLIP's pairwise sigmoid loss: +1 on the diagonal, -1 elsewhere, summed over pairs / n.

    collisions (pairs of an image and a caption of its class that is not its own):
      "none": negatives, as in SigLIP;
      "mask": left out of the sum;
      "soft": positives (+1), like the diagonal.
    """
    logits = logit_scale * image_features @ text_features.t() + logit_bias
    n = logits.shape[0]
    eye = torch.eye(n, device=logits.device, dtype=torch.bool)
    if collisions == "none":
        positive, counted = eye, torch.ones_like(eye)
    elif collisions in ("mask", "soft"):
        if labels is None:
            raise ValueError(f"collisions='{collisions}' needs the class labels of the batch")
        same = labels[:, None] == labels[None, :]
        positive = eye | same if collisions == "soft" else eye
        counted = torch.ones_like(eye) if collisions == "soft" else eye | ~same
    else:
        raise ValueError(f"unknown collisions option '{collisions}'; choose one of {COLLISIONS}")
    signs = 2 * positive.to(logits.dtype) - 1
    return -(F.logsigmoid(signs * logits) * counted).sum() / n
