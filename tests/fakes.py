"""Fake datasets written by tests: tiny images in the layouts flyp reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [
    (220, 40, 40),
    (40, 200, 40),
    (40, 40, 220),
    (220, 220, 40),
    (200, 40, 200),
    (40, 200, 200),
]


def make_domains(
    root: Path,
    domains: list[str],
    classes: list[str],
    per_class: int = 6,
    size: int = 24,
    seed: int = 0,
) -> Path:
    """A fake <root>/<domain>/<class>/<image>.png tree; each class has its own colour, each
    domain a different brightness, so a tiny model can learn it and OOD differs from ID."""
    rng = np.random.default_rng(seed)
    for d, domain in enumerate(domains):
        for c, name in enumerate(classes):
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.array(COLOURS[c % len(COLOURS)], dtype=float) * (1 - 0.25 * d)
                pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def tiny_overrides(root: Path, *extra: str) -> list[str]:
    """Recipe overrides for the tiny model on a fake tree made by make_domains (photo ID)."""
    return [
        "model.spec=tiny",
        "data.benchmark=folders",
        f"data.root={root}",
        "data.id_domain=photo",
        "data.ood_domains=[art, sketch]",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "train.batch_size=6",
        "train.epochs=3",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        *extra,
    ]
