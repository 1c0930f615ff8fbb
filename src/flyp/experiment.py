"""An experiment: what every run of a recipe is built from (model, data, caches), built once.

``flyp compare`` and ``flyp sweep`` share one :class:`Experiment` across their runs; each run
takes it with its own recipe (:meth:`Experiment.for_run`). :func:`loss_context` is what the
recipe and the data tell a method's loss (captions, templates, the contrastive loss to use).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch.utils.data import TensorDataset

from flyp.data.benchmarks import Benchmark, build_benchmark
from flyp.errors import RunError
from flyp.methods import LossContext
from flyp.models import ModelBundle, load_model
from flyp.recipe import Recipe
from flyp.reuse import DecodedImages, FrozenFeatures


@dataclass
class Experiment:
    """Everything a run needs that is built from a recipe (built once, shareable across runs)."""

    recipe: Recipe
    bundle: ModelBundle
    benchmark: Benchmark
    # Evaluation sets decoded and transformed once (the eval transform is deterministic), kept
    # within eval.cache_gb: a comparison evaluates the same images dozens of times.
    eval_cache: dict[str, TensorDataset] = field(default_factory=dict)
    # Training images decoded once, within data.cache_gb (flyp.reuse).
    train_images: DecodedImages = field(default_factory=DecodedImages)
    # The pretrained image tower's features, when the caller keeps the pretrained weights
    # (flyp compare): evaluations of models whose image tower is unchanged reuse them.
    frozen: FrozenFeatures | None = None

    def for_run(self, recipe: Recipe) -> Experiment:
        """The same model, data and caches for a run with its own recipe (method, seed)."""
        return replace(self, recipe=recipe)


def prepare(
    recipe: Recipe, bundle: ModelBundle | None = None, benchmark: Benchmark | None = None
) -> Experiment:
    bundle = bundle or load_model(
        recipe.model.spec, recipe.model.image_size, recipe.model.context_length
    )
    benchmark = benchmark or build_benchmark(recipe.data)
    return Experiment(recipe, bundle, benchmark)


def _loss_kind(exp: Experiment) -> str:
    """The contrastive loss to finetune with: by default the one the model was pretrained with."""
    choice = exp.recipe.train.contrastive_loss  # a valid choice: checked when the recipe loaded
    if choice == "auto":
        return exp.bundle.loss
    if choice == "siglip" and getattr(exp.bundle.model, "logit_bias", None) is None:
        raise RunError(f"train.contrastive_loss=siglip needs a model with a logit_bias (a SigLIP model); {exp.bundle.spec} has none")
    return choice


def loss_context(exp: Experiment) -> LossContext:
    train = exp.recipe.train
    return LossContext(
        tokenizer=exp.bundle.tokenizer,
        class_names=exp.benchmark.class_names,
        templates=exp.benchmark.templates,
        loss_kind=_loss_kind(exp),
        collisions=train.collisions,
        l2sp_weight=train.l2sp_weight,
        unique_captions=train.unique_captions,
    )
