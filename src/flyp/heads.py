"""Classifier heads: the zero-shot head built from the text tower, and the logits it gives."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@torch.no_grad()
def zeroshot_weights(
    model: nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
) -> Tensor:
    """One unit vector per class: encode every template, normalise each, average, renormalise."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    captions = [t.format(c) for c in class_names for t in templates]
    chunks = []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(captions[start : start + batch_size]).to(device)
        chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_caption = torch.cat(chunks).view(len(class_names), len(templates), -1)
    weights = F.normalize(per_caption.mean(dim=1), dim=-1)
    model.train(was_training)
    return weights


def class_logits(
    image_features: Tensor, weights: Tensor, logit_scale: Tensor | float = 1.0
) -> Tensor:
    return logit_scale * F.normalize(image_features, dim=-1) @ weights.t()
