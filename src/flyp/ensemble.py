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
        shared = first.device.type != "meta" and all(torch.equal(s[key], first) for s in states[1:])
        if not first.is_floating_point() or shared:
            # one value (a frozen tower): kept bit for bit, so its cached features still apply
            out[key] = first.clone()
        else:
            out[key] = torch.stack([s[key].float() for s in states]).mean(0).to(first.dtype)
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


def stock_ratio(cos: float, n: int = 2) -> float:
    """Model Stock's interpolation ratio t = n·cosθ / (1 + (n − 1)·cosθ) (Jang et al., ECCV 2024;
    2·cosθ / (1 + cosθ) for two models). A negative cosine is taken as 0: no extrapolation
    beyond the pretrained weights."""
    cos = min(max(cos, 0.0), 1.0)
    return n * cos / (1 + (n - 1) * cos)


def model_stock(
    pretrained: State, finetuned: Sequence[State]
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Model Stock: per tensor (a layer's weight or bias), the mean of the finetuned weights
    pulled toward the pretrained ones, w = t·mean(w_i) + (1 − t)·w0, with
    t = N·cosθ / (1 + (N − 1)·cosθ) for N runs and cosθ the mean pairwise cosine between
    their task vectors w_i − w0. Returns the merged weights and the t of each tensor that moved.

    A tensor that moved in no run (a frozen tower, frozen BatchNorm statistics) has no angle
    and no t: it is kept bit for bit, so its cached features still apply, and it is left out of
    the ratios (a t of 0 there would dilute any mean of them). A run in which a tensor did not
    move counts as orthogonal to the others (cosine 0). Integer buffers come from the first run.
    """
    if len(finetuned) < 2:
        raise ValueError("Model Stock needs at least two finetuned runs of one method (--seeds 0 1)")
    out, ratios = {}, {}
    n = len(finetuned)
    for key, w0 in pretrained.items():
        if not w0.is_floating_point():
            out[key] = finetuned[0][key].clone()
            continue
        tasks = [(state[key].float() - w0.float()).flatten() for state in finetuned]
        norms = [float(t.norm()) for t in tasks]
        if max(norms) == 0.0:  # never moved: nothing to merge
            out[key] = w0.clone()
            continue
        pairs = [
            float(tasks[i] @ tasks[j]) / (norms[i] * norms[j]) if norms[i] and norms[j] else 0.0
            for i in range(n)
            for j in range(i + 1, n)
        ]
        t = stock_ratio(sum(pairs) / len(pairs), n)
        mean = torch.stack([state[key].float() for state in finetuned]).mean(0)
        out[key] = torch.lerp(w0.float(), mean, t).to(w0.dtype)
        ratios[key] = t
    return out, ratios
