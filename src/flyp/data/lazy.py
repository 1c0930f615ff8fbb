"""Builders registered by name but imported on first use.

The paper's benchmark modules (ImageNet, WILDS, transfer) pull in their metadata tables and
readers; :mod:`flyp.data.benchmarks` registers them through :func:`lazy_builder` so that a run
on PACS or a folder never imports them. They sit above it in no way: both import
:mod:`flyp.data.sets`.
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
