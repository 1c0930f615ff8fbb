"""Builders registered by name but imported on first use.

The paper's benchmark modules import :mod:`flyp.data.benchmarks` (for ``Benchmark``), so
that module registers them through :func:`lazy_builder` instead of importing them.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_builder(module: str, name: str) -> Callable[[Any], Any]:
    """A builder that imports ``module`` and calls its ``name`` when first used."""

    def build(cfg: Any) -> Any:
        return getattr(import_module(module), name)(cfg)

    build.__name__ = name
    build.__qualname__ = name
    return build
