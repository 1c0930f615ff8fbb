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


def allocate(counts: dict[int, int], limit: int, rng: random.Random) -> dict[int, int]:
    """How many samples of each class (``counts``: class -> size) a cap of ``limit`` keeps, in
    all exactly ``min(limit, total)``.

    Each class gets its share ``limit * size / total`` rounded down, and the seats left go to
    the largest remainders (largest-remainder allocation). Every class then keeps at least one,
    taken from the class furthest above its share. A cap below the number of classes keeps one
    sample of as many classes as fit, the largest classes first. Ties go by a shuffle of
    ``rng``, so the allocation is the same for the same seed.
    """
    total = sum(counts.values())
    if limit >= total:
        return dict(counts)
    order = sorted(counts)
    rng.shuffle(order)  # the tie-break: sorts below are stable
    if limit <= len(order):
        chosen = set(sorted(order, key=lambda c: -counts[c])[:limit])
        return {c: int(c in chosen) for c in counts}
    take = {c: limit * counts[c] // total for c in order}
    remainder = {c: limit * counts[c] % total for c in order}
    for c in sorted(order, key=lambda c: -remainder[c])[: limit - sum(take.values())]:
        take[c] += 1
    for c in order:
        if take[c] == 0:  # from the class furthest above its share (in units of 1/total)
            donor = max(
                (d for d in order if take[d] > 1), key=lambda d: take[d] * total - limit * counts[d]
            )
            take[donor] -= 1
            take[c] = 1
    return take


def stratified_subsample(samples: Sequence[Sample], limit: int | None, seed: int) -> list[Sample]:
    """At most ``limit`` samples (exactly ``limit`` when there are more), seeded, keeping class
    proportions as :func:`allocate` shares them out (each class keeps one when the cap allows)."""
    if limit is None or limit >= len(samples):
        return list(samples)
    rng = random.Random(seed)
    groups = {}
    for label, group in _by_class(samples).items():
        group = sorted(group)
        rng.shuffle(group)
        groups[label] = group
    take = allocate({label: len(g) for label, g in groups.items()}, limit, rng)
    return sorted(s for label, group in groups.items() for s in group[: take[label]])
