"""flyp: finetune CLIP-like models the way they were pretrained (Goyal et al., CVPR 2023)."""

from flyp.models import ModelBundle, load_model
from flyp.predict import FlypClassifier, load_classifier
from flyp.recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = [
    "FlypClassifier",
    "ModelBundle",
    "Recipe",
    "__version__",
    "load_classifier",
    "load_model",
    "load_recipe",
]
