"""The weights file's description of itself: what training writes into a ``model.safetensors``
header (safetensors metadata, key ``"flyp"``) and the schema it must hold when read back.

    {"format": 1, "model_spec": "default", "image_size": 224, "context_length": null,
     "mean": [...], "std": [...], "class_names": [...], "templates": [...],
     "head": "zeroshot-text" | "linear", "method": "flyp", "metric": "accuracy",
     "tensors": "full" | "changed", "eval_precision": "auto", "eval_precision_used": "fp32"}

Written by training, soups and WiSE-FT (:func:`weights_metadata`), read by
:func:`flyp.predict.load_classifier` and export (:func:`check_metadata`: the metadata is plain
JSON anyone can edit). Weights written before the metadata existed get it rebuilt from their run
directory (:func:`metadata_from_run`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flyp.checkpoint import CheckpointError
from flyp.data.templates import check_templates
from flyp.precision import resolve

if TYPE_CHECKING:  # annotations only: the metadata module sits below the models and methods
    from flyp.methods import Classifier
    from flyp.models import ModelBundle

FORMAT = 1


def _normalisation(transform: Any) -> tuple[list[float] | None, list[float] | None]:
    """The mean and std of the Normalize step of an eval transform (None if it has none)."""
    from torchvision import transforms as T

    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, T.Normalize):
            return [float(x) for x in step.mean], [float(x) for x in step.std]
    return None, None


def weights_metadata(
    bundle: ModelBundle, recipe: Any, benchmark: Any, classifier: Classifier, tensors: str
) -> dict[str, Any]:
    """What a run's weights file says about itself (see the module docstring)."""
    mean, std = _normalisation(bundle.eval_transform)
    return {
        "format": FORMAT,
        "model_spec": recipe.model.spec,
        "image_size": bundle.image_size,
        "context_length": recipe.model.context_length,
        "mean": mean,
        "std": std,
        "class_names": list(benchmark.class_names),
        "templates": list(benchmark.templates),
        "head": "linear" if classifier.head is not None else "zeroshot-text",
        "method": recipe.train.method,
        "metric": benchmark.metric,
        "tensors": tensors,
        # how its evaluation ran: asked (auto, fp32, bf16) and chosen there; predict asks the same
        "eval_precision": recipe.eval.precision,
        "eval_precision_used": resolve(recipe.eval.precision, classifier.model.logit_scale.device).name,
    }


def metadata_from_run(run_dir: Path) -> dict[str, Any]:
    """The metadata of weights written without any, rebuilt from the run's recipe.yaml (the
    class names and templates come from its benchmark, so the data must be where it was)."""
    from flyp.data import build_benchmark
    from flyp.methods import get_method
    from flyp.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    bench = build_benchmark(recipe.data)
    return {
        "format": FORMAT,
        "model_spec": recipe.model.spec,
        "image_size": recipe.model.image_size,
        "context_length": recipe.model.context_length,
        "class_names": bench.class_names,
        "templates": bench.templates,
        "head": "linear" if get_method(recipe.train.method).linear_head else "zeroshot-text",
        "method": recipe.train.method,
        "metric": bench.metric,
        "tensors": "full",
        "eval_precision": recipe.eval.precision,
    }


def check_metadata(meta: Any, path: Path) -> dict[str, Any]:
    """The flyp metadata of ``path`` if its schema holds, else a CheckpointError listing each
    problem with its field (weights metadata is plain JSON that anyone can edit)."""
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path}: its flyp metadata is a {type(meta).__name__}, not a mapping; pass the "
            "run directory instead (its recipe.yaml gives the model spec)"
        )
    problems = []

    def positive_int(key: str) -> None:
        value = meta.get(key)
        if value is not None and (type(value) is not int or value < 1):
            problems.append(f"{key} is {value!r}, not a positive whole number or null")

    if meta.get("format") != FORMAT:
        problems.append(f"format is {meta.get('format')!r}; this flyp reads format {FORMAT}")
    if not isinstance(meta.get("model_spec"), str) or not meta["model_spec"]:
        problems.append(f"model_spec is {meta.get('model_spec')!r}, not a model spec")
    positive_int("image_size")
    positive_int("context_length")
    for key in ("mean", "std"):
        value = meta.get(key)
        numbers = isinstance(value, list) and all(
            type(v) in (int, float) and math.isfinite(v) for v in value
        )
        if value is not None and not (numbers and len(value) == 3):
            problems.append(f"{key} is {value!r}, not three numbers or null")
        elif key == "std" and value is not None and min(value) <= 0:
            problems.append(f"std is {value!r}; every value must be positive")
    names = meta.get("class_names")
    if not isinstance(names, list) or not all(isinstance(n, str) and n.strip() for n in names):
        problems.append("class_names is not a list of non-empty names")
    elif len(names) < 2:
        problems.append(f"class_names has {len(names)} names; a classifier needs at least two")
    elif len(set(names)) < len(names):
        twice = next(n for n in names if names.count(n) > 1)
        problems.append(f"class_names lists {twice!r} twice")
    if "templates" not in meta:
        problems.append("templates is missing")
    elif not isinstance(meta["templates"], list):
        problems.append(f"templates is {meta['templates']!r}, not a list")
    else:
        try:
            check_templates(meta["templates"], "templates")
        except ValueError as err:
            problems.append(str(err))
    if meta.get("head") not in ("linear", "zeroshot-text"):
        problems.append(f"head is {meta.get('head')!r}, not 'linear' or 'zeroshot-text'")
    if meta.get("tensors", "full") not in ("full", "changed"):
        problems.append(f"tensors is {meta.get('tensors')!r}, not 'full' or 'changed'")
    if problems:
        raise CheckpointError(
            f"{path} has tampered or broken flyp metadata: {'; '.join(problems)}; use the "
            "model.safetensors a run wrote, or pass its run directory"
        )
    return meta
