"""Evaluation: predictions over each evaluation set, and the metrics a report needs.

The metrics of a set of predictions come first (each as its benchmark defines it, calibration
with them); then :func:`evaluate_sets` over loaders; then a classifier on an experiment's sets
(:func:`evaluate_classifier`): the decoded sets cached, the pretrained image tower's features
reused, and :func:`validation_score`, the number every choice is made on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from flyp import progress
from flyp.data.loader import ImageDataset, eval_loader, materialize
from flyp.models.base import keep_freed_memory, prefers_channels_last, tune_cpu_bf16
from flyp.precision import autocast, resolve
from flyp.tracking import bar, note

if TYPE_CHECKING:
    from flyp.experiment import Experiment
    from flyp.methods import Classifier


def metrics_from_predictions(
    predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None
) -> dict[str, float]:
    """The metrics of one evaluation set, each as its benchmark defines it.

    - ``accuracy`` over every sample.
    - ``macro_f1``: the mean F1 over the classes present in ``labels`` (WILDS's definition,
      iWildCam's headline metric: sklearn's ``f1_score(..., labels=np.unique(labels))``). A
      class that is only predicted lowers the precision of the classes it was predicted for,
      but adds no F1 of 0 of its own.
    - ``balanced_accuracy`` and ``worst_class_accuracy`` over the classes present in the set.
    - ``worst_group_accuracy`` when ``groups`` (one group id per sample) is given: the lowest
      accuracy over the groups with an id >= 0. A negative id (-1) marks a sample that belongs
      to no group: it counts in every other metric, in no group. This is how FMoW's "Other"
      region is scored (WILDS: average accuracy over every image, worst-region accuracy over
      the five real regions). NaN when no sample has a group.
    - ``n``, the number of samples.
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    correct = predictions == labels
    present = np.unique(labels)
    per_class = np.array([correct[labels == c].mean() for c in present])
    out = {
        "accuracy": float(correct.mean()),
        "macro_f1": float(
            f1_score(labels, predictions, average="macro", labels=present, zero_division=0)
        ),
        "balanced_accuracy": float(per_class.mean()),
        "worst_class_accuracy": float(per_class.min()),
        "n": int(len(labels)),
    }
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(
                f"{len(groups)} group ids for {len(labels)} samples; give one per sample"
            )
        counted = np.unique(groups[groups >= 0])
        out["worst_group_accuracy"] = (
            float(min(correct[groups == g].mean() for g in counted))
            if len(counted)
            else float("nan")
        )
    return out


def to_groups(
    classes: np.ndarray, label_groups: Sequence[Sequence[int]], num_classes: int
) -> np.ndarray:
    """Model classes to group ids (-1 for a class in no group)."""
    lookup = np.full(num_classes, -1)
    for g, members in enumerate(label_groups):
        lookup[list(members)] = g
    return lookup[classes]


def group_logits(logits: Tensor, label_groups: Sequence[Sequence[int]]) -> Tensor:
    """Class logits to group logits: each group scores its best class (ObjectNet's protocol: an
    ObjectNet class takes the max over the ImageNet classes it covers). Predictions, confidence
    (the softmax over groups) and likelihood are then all judged per group, as correctness is:
    a softmax over the classes would split one group's probability among its members."""
    return torch.stack([logits[:, list(g)].max(dim=1).values for g in label_groups], dim=1)


def restrict(logits: Tensor, subset: Sequence[int] | None) -> Tensor:
    """Logits of classes outside ``subset`` set to -inf (for sets covering only some classes)."""
    if subset is None:
        return logits
    keep = torch.full_like(logits, float("-inf"))
    index = torch.as_tensor(list(subset), device=logits.device)
    keep[:, index] = logits[:, index]
    return keep


@torch.no_grad()
def collect_logits(
    logits_fn: Callable[[Tensor], Tensor],
    loader: DataLoader,
    subset: Sequence[int] | None = None,
    desc: str = "eval",
) -> tuple[Tensor, np.ndarray]:
    """The logits (fp32, on the CPU; classes outside ``subset`` at -inf) and labels of a set."""
    logits, labels = [], []
    total = len(loader.dataset) if hasattr(loader, "dataset") else None
    seen = 0
    progress.begin()
    for images, batch_labels, _ in bar(loader, desc, leave=False):
        logits.append(restrict(logits_fn(images).float(), subset).cpu())
        labels.append(batch_labels)
        seen += len(batch_labels)
        progress.images(desc.removeprefix("eval "), seen, total, len(batch_labels))
    progress.idle()
    return torch.cat(logits), torch.cat(labels).numpy()


def predict(
    logits_fn: Callable[[Tensor], Tensor],
    loader: DataLoader,
    subset: Sequence[int] | None = None,
    desc: str = "eval",
) -> tuple[np.ndarray, np.ndarray]:
    logits, labels = collect_logits(logits_fn, loader, subset, desc)
    return logits.argmax(dim=1).numpy(), labels


ECE_BINS = 15


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE (Guo et al., 2017): the sample-weighted mean gap between each confidence bin's
    accuracy and its mean confidence.

    The bins are torchmetrics' (``multiclass_calibration_error``, l1): ``bins`` equal-width
    bins [lower, upper) with float32 edges (``torch.linspace(0, 1, bins + 1)``), so a
    confidence on an edge opens the bin above it, and a confidence of exactly 1.0 (bf16 logits
    give many) makes a bin of its own rather than joining (14/15, 1)."""
    confidence = torch.as_tensor(np.asarray(confidence), dtype=torch.float32)
    correct = np.asarray(correct, float)
    edges = torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float32)
    which = (torch.bucketize(confidence, edges, right=True) - 1).numpy()
    confidence = confidence.double().numpy()
    ece = 0.0
    for b in np.unique(which):
        members = which == b
        ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def calibration(
    logits: Tensor, labels: np.ndarray, correct: np.ndarray, temperature: float = 1.0
) -> dict[str, float]:
    """ECE of the top-1 confidence and the negative log-likelihood of the labels, with the
    logits divided by ``temperature``."""
    log_probs = torch.log_softmax(logits / temperature, dim=1)
    confidence = log_probs.max(dim=1).values.exp().numpy()
    nll = -log_probs[torch.arange(len(labels)), torch.as_tensor(labels)].mean()
    return {"ece": expected_calibration_error(confidence, correct), "nll": float(nll)}


def fit_temperature(logits: Tensor, labels: np.ndarray) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising the NLL of logits / T."""
    from scipy.optimize import minimize_scalar

    target = torch.as_tensor(labels)

    def nll(log_t: float) -> float:
        scaled = logits / float(np.exp(log_t))
        return float(torch.nn.functional.cross_entropy(scaled, target))

    best = minimize_scalar(nll, bounds=(np.log(0.01), np.log(100.0)), method="bounded")
    return float(np.exp(best.x))


def evaluate_sets(
    classifier: nn.Module,
    loaders: Mapping[str, DataLoader],
    num_classes: int,
    class_subsets: Mapping[str, Sequence[int]] | None = None,
    groups: Mapping[str, Sequence[int]] | None = None,
    label_groups: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of ``classifier`` (images -> class logits) on every loader, with calibration:
    ECE and NLL as they are, and after temperature scaling fitted on the ``val`` set (when it
    is among the loaders): ``temperature``, ``ece_ts``, ``nll_ts``."""
    classifier.eval()
    class_subsets, groups, label_groups = class_subsets or {}, groups or {}, label_groups or {}
    outputs = {}
    for name, loader in loaders.items():
        images = getattr(loader, "dataset", None)
        note(f"evaluating {name}" + (f" ({len(images)} images)" if images is not None else ""))
        outputs[name] = collect_logits(classifier, loader, class_subsets.get(name), f"eval {name}")
    temperature = None
    if "val" in outputs and "val" not in label_groups:
        temperature = fit_temperature(*outputs["val"])
    results = {}
    for name, (logits, labels) in outputs.items():
        if name in label_groups:  # a label stands for a group of classes (ObjectNet)
            logits = group_logits(logits, label_groups[name])
            labels = to_groups(labels, label_groups[name], num_classes)
        preds = logits.argmax(dim=1).numpy()
        group = np.asarray(groups[name]) if name in groups else None
        results[name] = metrics_from_predictions(preds, labels, group)
        correct = preds == labels
        results[name].update(calibration(logits, labels, correct))
        if temperature is not None:
            scaled = calibration(logits, labels, correct, temperature)
            results[name].update(temperature=temperature, ece_ts=scaled["ece"], nll_ts=scaled["nll"])
    return results


def summarise(
    sets: Mapping[str, Mapping[str, float]],
    id_name: str,
    ood_names: Sequence[str],
    metric: str = "accuracy",
) -> dict:
    """The numbers a comparison is about: the ID value and the mean over OOD sets."""
    ood = [sets[n][metric] for n in ood_names if n in sets]
    return {
        "metric": metric,
        "id_name": id_name,
        "id": sets[id_name][metric] if id_name in sets else None,
        "ood_names": list(ood_names),
        "ood_mean": float(np.mean(ood)) if ood else None,
        "val": sets["val"][metric] if "val" in sets else None,
    }


# A classifier on an experiment's sets.


def _eval_dataset(exp: Experiment, name: str, samples: list) -> torch.utils.data.Dataset:
    if name in exp.eval_cache:
        return exp.eval_cache[name]
    dataset = ImageDataset(samples, exp.bundle.eval_transform, exp.benchmark.preprocess.get(name))
    used = sum(d.tensors[0].numel() * 4 for d in exp.eval_cache.values())
    needed = len(samples) * 3 * exp.bundle.image_size**2 * 4
    if used + needed <= exp.recipe.eval.cache_gb * 2**30:
        dataset = exp.eval_cache[name] = materialize(
            dataset,
            exp.recipe.eval.batch_size,
            exp.recipe.data.num_workers,
            channels_last=prefers_channels_last(exp.bundle.model),
            device=exp.bundle.model.logit_scale.device,  # pinned for a GPU
        )
    return dataset


def _eval_loaders(
    exp: Experiment, names: list[str] | None = None
) -> dict[str, torch.utils.data.DataLoader]:
    return {
        name: eval_loader(
            _eval_dataset(exp, name, samples),
            exp.recipe.eval.batch_size,
            exp.recipe.data.num_workers,
            exp.bundle.model.logit_scale.device,
        )
        for name, samples in exp.benchmark.eval_sets().items()
        if names is None or name in names
    }


class _HeadOnly(nn.Module):
    """Features -> logits through a classifier's head (its image tower already applied)."""

    def __init__(self, classifier: Classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(features.to(self.classifier.model.logit_scale.device))


@torch.no_grad()
def _features(classifier: Classifier, loader) -> tuple[torch.Tensor, torch.Tensor]:
    classifier.eval()
    features, labels = [], []
    for images, batch_labels, _ in loader:
        features.append(classifier.image_features(images).cpu())
        labels.append(batch_labels)
        progress.working(f"image features {sum(map(len, labels))} images")
    return torch.cat(features), torch.cat(labels)


def pretrained_tower_features(
    classifier: Classifier, exp: Experiment, key: str, loader
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretrained image tower's (features, labels) of a set, computed once per evaluation
    precision (the caller has checked that the classifier's image tower is the pretrained one)."""
    precision = resolve(exp.recipe.eval.precision, classifier.model.logit_scale.device).name
    return exp.frozen.get(f"{key} {precision}", lambda: _features(classifier, loader))


def evaluate_classifier(
    classifier: Classifier, exp: Experiment, names: list[str] | None = None
) -> dict[str, dict[str, float]]:
    if classifier.head is None:
        classifier.refresh_text_head(
            exp.bundle.tokenizer, exp.benchmark.class_names, exp.benchmark.templates
        )
    loaders, scorer = _eval_loaders(exp, names), classifier
    precision = resolve(exp.recipe.eval.precision, classifier.model.logit_scale.device).name
    if classifier.channels_last:  # weights too, as training has them (a no-op when they are)
        classifier.model.to(memory_format=torch.channels_last)
    if classifier.model.logit_scale.device.type == "cpu":
        keep_freed_memory()  # evaluation batches are large: ~4x faster without fresh mappings
        if precision == "bf16":
            tune_cpu_bf16(classifier.model)
    with autocast(classifier.model.logit_scale.device, precision):
        # One bitwise check of the image tower per evaluation, not one per set.
        if exp.frozen is not None and exp.frozen.matches(classifier.model):
            cached = {
                name: pretrained_tower_features(classifier, exp, name, loader)
                for name, loader in loaders.items()
            }
            # The pretrained image tower: its features once per set, then only the head runs
            # (in the same batches, so the logits are the ones the full pass gives).
            loaders = {
                name: eval_loader(
                    TensorDataset(x, y, torch.full((len(y),), -1)), exp.recipe.eval.batch_size, 0
                )
                for name, (x, y) in cached.items()
            }
            scorer = _HeadOnly(classifier)
        return evaluate_sets(
            scorer,
            loaders,
            len(exp.benchmark.class_names),
            class_subsets=exp.benchmark.class_subsets,
            groups=exp.benchmark.groups,
            label_groups=exp.benchmark.label_groups,
        )


def validation_score(classifier: Classifier, exp: Experiment) -> float:
    """The benchmark's headline metric on ID validation: what every choice is made on (the
    epoch, the probe's C, WiSE-FT's alpha, the greedy soup)."""
    return evaluate_classifier(classifier, exp, ["val"])["val"][exp.benchmark.metric]
