"""flyp: finetune CLIP-like models the way they were pretrained (Goyal et al., CVPR 2023)."""

from __future__ import annotations

import importlib

# The public names, imported when first used (PEP 562): `flyp --help` and `flyp --version`
# import this package too, and must not wait seconds for torch.
_PUBLIC = {
    "FlypClassifier": "flyp.predict",
    "load_classifier": "flyp.predict",
    "ModelBundle": "flyp.models",
    "load_model": "flyp.models",
    "Recipe": "flyp.recipe",
    "load_recipe": "flyp.recipe",
}

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'flyp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = [
    "FlypClassifier",
    "ModelBundle",
    "Recipe",
    "__version__",
    "load_classifier",
    "load_model",
    "load_recipe",
]
