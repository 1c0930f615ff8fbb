"""Seeded, stratified splits and subsamples."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from flyp.data.folders import Sample


def _by_class(samples: Sequence[Sample]) -> dict[int, list[Sample]]:
    groups: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.label].append(s)
    return dict(sorted(groups.items()))


def stratified_split(
    samples: Sequence[Sample], fractions: Sequence[float], seed: int
) -> list[list[Sample]]:
    """Split each class by ``fractions`` (the remainder is the first part), seeded.

    Returns ``len(fractions) + 1`` parts: [rest, fractions[0], fractions[1], ...].
    """
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"split fractions {list(fractions)} must be >= 0 and sum to less than 1")
    rng = random.Random(seed)
    parts: list[list[Sample]] = [[] for _ in range(len(fractions) + 1)]
    for _, group in _by_class(samples).items():
        group = sorted(group)
        rng.shuffle(group)
        start = 0
        sizes = [round(f * len(group)) for f in fractions]
        for i, size in enumerate(sizes, start=1):
            parts[i].extend(group[start : start + size])
            start += size
        parts[0].extend(group[start:])
    return [sorted(p) for p in parts]


def stratified_subsample(samples: Sequence[Sample], limit: int | None, seed: int) -> list[Sample]:
    """At most ``limit`` samples keeping class proportions (each class keeps at least one)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    rng = random.Random(seed)
    out: list[Sample] = []
    for _, group in _by_class(samples).items():
        group = sorted(group)
        rng.shuffle(group)
        out.extend(group[: max(1, round(limit * len(group) / len(samples)))])
    return sorted(out)
