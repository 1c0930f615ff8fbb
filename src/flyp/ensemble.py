"""Weight-space ensembles: WiSE-FT interpolation between the zero-shot and the finetuned
weights, and model soups over several finetuned runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

State = Mapping[str, Tensor]


def interpolate(zeroshot: State, finetuned: State, alpha: float) -> dict[str, Tensor]:
    """(1 - alpha) * zero-shot + alpha * finetuned for every floating-point tensor (both towers,
    temperature, head); integer buffers (BatchNorm counters) come from the finetuned side."""
    if zeroshot.keys() != finetuned.keys():
        missing = sorted(set(zeroshot) ^ set(finetuned))[:5]
        raise ValueError(f"the two models differ in their weights ({missing}); WiSE-FT needs one architecture")
    out = {}
    for key, ft in finetuned.items():
        zs = zeroshot[key]
        out[key] = torch.lerp(zs.float(), ft.float(), alpha).to(ft.dtype) if ft.is_floating_point() else ft.clone()
    return out


def uniform_soup(states: Sequence[State]) -> dict[str, Tensor]:
    """The plain average of several finetuned models' weights."""
    if not states:
        raise ValueError("a soup needs at least one model")
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(0).to(first.dtype)
        else:
            out[key] = first.clone()
    return out


def greedy_soup(states: Sequence[State], val_score: Callable[[State], float]) -> tuple[dict[str, Tensor], list[int]]:
    """Greedy soup: visit models from best to worst validation score; keep each one whose
    addition does not lower the soup's validation score. Returns the soup and the kept indices."""
    scores = [val_score(s) for s in states]
    order = sorted(range(len(states)), key=lambda i: -scores[i])
    kept = [order[0]]
    best = scores[order[0]]
    for i in order[1:]:
        candidate = uniform_soup([states[j] for j in [*kept, i]])
        score = val_score(candidate)
        if score >= best:
            kept.append(i)
            best = score
    return uniform_soup([states[j] for j in kept]), kept
