"""Evaluation: predictions over each evaluation set, and the metrics a report needs.

The metrics of a set of predictions come first (each as its benchmark defines it, calibration
with them); then :func:`evaluate_sets` over loaders; then a classifier on an experiment's sets
(:func:`evaluate_classifier`): the decoded sets cached, the pretrained image tower's features
reused, and :func:`validation_score`, the number every choice is made on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sklearn.metrics import f1_score
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from flyp import progress
from flyp.data.loader import ImageDataset, OnDevice, eval_loader, materialize, uint8_transform
from flyp.distributed import eval_shard, gather_in_rank_order, shard_bounds
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


def _records(logits: Tensor, labels: np.ndarray, temperature: float | None) -> dict[str, np.ndarray]:
    """What the metrics need of each example, so that ranks send a few numbers per example
    rather than its logits: the prediction, the label, the top-1 confidence and the example's
    NLL (and both again after temperature scaling)."""
    if not len(labels):  # an empty shard: nothing of this set on this rank
        empty = np.zeros(0)
        keys = ["confidence", "nll"] + (["confidence_ts", "nll_ts"] if temperature else [])
        return {"pred": np.zeros(0, np.int64), "label": np.asarray(labels), **{k: empty for k in keys}}
    out = {"pred": logits.argmax(dim=1).numpy(), "label": np.asarray(labels)}
    scales = {"": 1.0} if temperature is None else {"": 1.0, "_ts": temperature}
    index = torch.arange(len(labels)), torch.as_tensor(labels, dtype=torch.long)
    for suffix, t in scales.items():
        log_probs = torch.log_softmax(logits / t, dim=1)
        out[f"confidence{suffix}"] = log_probs.max(dim=1).values.exp().numpy()
        out[f"nll{suffix}"] = (-log_probs[index]).numpy()
    return out


def _metrics(records: dict[str, np.ndarray], groups, temperature: float | None) -> dict[str, float]:
    preds, labels = records["pred"], records["label"]
    out = metrics_from_predictions(preds, labels, None if groups is None else np.asarray(groups))
    correct = preds == labels
    out["ece"] = expected_calibration_error(records["confidence"], correct)
    out["nll"] = float(torch.as_tensor(records["nll"]).mean())
    if temperature is not None:
        out["temperature"] = temperature
        out["ece_ts"] = expected_calibration_error(records["confidence_ts"], correct)
        out["nll_ts"] = float(torch.as_tensor(records["nll_ts"]).mean())
    return out


def _joined(pieces: list) -> Any:
    """Every rank's piece of a set, in rank order, as one (an empty shard's pieces dropped)."""
    if isinstance(pieces[0], dict):
        return {key: _joined([p[key] for p in pieces]) for key in pieces[0]}
    if isinstance(pieces[0], tuple):
        return tuple(_joined([p[i] for p in pieces]) for i in range(len(pieces[0])))
    kept = [p for p in pieces if len(p)] or pieces[:1]
    return torch.cat(kept) if isinstance(kept[0], Tensor) else np.concatenate(kept)


def score_sets(
    outputs: Mapping[str, tuple[Tensor, np.ndarray]],
    num_classes: int,
    groups: Mapping[str, Sequence[int]] | None = None,
    label_groups: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> dict[str, dict[str, float]]:
    """The metrics of every set from this rank's (logits, labels) of it, with calibration: ECE
    and NLL as they are, and after temperature scaling fitted on the ``val`` set (when it is
    among them): ``temperature``, ``ece_ts``, ``nll_ts``.

    Under torchrun each rank holds its contiguous block of every set
    (flyp.distributed.eval_shard): the validation logits are gathered for the temperature fit,
    then a few numbers per example (:func:`_records`), so every rank computes the metrics of
    the whole set, in the order one process has it, and gets the same numbers."""
    groups, label_groups = groups or {}, label_groups or {}
    grouped = {}
    for name, (logits, labels) in outputs.items():
        if name in label_groups and len(labels):  # a label stands for a group of classes (ObjectNet)
            logits = group_logits(logits, label_groups[name])
            labels = to_groups(labels, label_groups[name], num_classes)
        grouped[name] = (logits, np.asarray(labels))
    temperature = None
    if "val" in grouped and "val" not in label_groups:
        temperature = fit_temperature(*_joined(gather_in_rank_order(grouped["val"])))
    mine = {name: _records(logits, labels, temperature) for name, (logits, labels) in grouped.items()}
    everyone = gather_in_rank_order(mine)
    return {
        name: _metrics(_joined([r[name] for r in everyone]), groups.get(name), temperature)
        for name in grouped
    }


def evaluate_sets(
    classifier: nn.Module,
    loaders: Mapping[str, DataLoader],
    num_classes: int,
    class_subsets: Mapping[str, Sequence[int]] | None = None,
    groups: Mapping[str, Sequence[int]] | None = None,
    label_groups: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of ``classifier`` (images -> class logits) on every loader (:func:`score_sets`)."""
    return evaluate_many([classifier], loaders, num_classes, class_subsets, groups, label_groups)[0]


def evaluate_many(
    scorers: Sequence[nn.Module],
    loaders: Mapping[str, DataLoader],
    num_classes: int,
    class_subsets: Mapping[str, Sequence[int]] | None = None,
    groups: Mapping[str, Sequence[int]] | None = None,
    label_groups: Mapping[str, Sequence[Sequence[int]]] | None = None,
) -> list[dict[str, dict[str, float]]]:
    """:func:`evaluate_sets` for several models at once, from one pass over each loader: each
    batch is read (decoded) once and forwarded through every model."""
    for scorer in scorers:
        scorer.eval()
    class_subsets = class_subsets or {}
    outputs: list[dict] = [{} for _ in scorers]
    for name, loader in loaders.items():
        images = getattr(loader, "dataset", None)
        note(f"evaluating {name}" + (f" ({len(images)} images)" if images is not None else ""))
        logits = collect_many(scorers, loader, class_subsets.get(name), f"eval {name}")
        for out, one in zip(outputs, logits, strict=True):
            out[name] = one
    results = [score_sets(out, num_classes, groups, label_groups) for out in outputs]
    for sets in results:
        for name in sets.keys() & class_subsets.keys():  # on its own classes: "k of n"
            sets[name].update(classes=len(class_subsets[name]), of_classes=num_classes)
    return results


@torch.no_grad()
def collect_many(
    scorers: Sequence[Callable[[Tensor], Tensor]],
    loader: DataLoader,
    subset: Sequence[int] | None = None,
    desc: str = "eval",
) -> list[tuple[Tensor, np.ndarray]]:
    """:func:`collect_logits` of several models from one pass over ``loader``."""
    logits: list[list[Tensor]] = [[] for _ in scorers]
    labels = []
    total = len(loader.dataset) if getattr(loader, "dataset", None) is not None else None
    seen = 0
    progress.begin()
    for images, batch_labels, _ in bar(loader, desc, leave=False):
        for mine, scorer in zip(logits, scorers, strict=True):
            mine.append(restrict(scorer(images).float(), subset).cpu())
        labels.append(batch_labels)
        seen += len(batch_labels)
        progress.images(desc.removeprefix("eval "), seen, total, len(batch_labels))
    progress.idle()
    if not labels:  # an empty shard
        return [(torch.zeros(0, 0), np.zeros(0, dtype=np.int64)) for _ in scorers]
    return [(torch.cat(mine), torch.cat(labels).numpy()) for mine in logits]


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
    """This rank's block of a set (flyp.distributed.eval_shard), decoded once and kept in
    memory while ``eval.cache_gb`` allows, as uint8 where the transform ends in ToTensor and
    Normalize (those run on the device: flyp.data.loader.OnDevice)."""
    rank, world = eval_shard()
    lo, hi = shard_bounds(len(samples), rank, world)
    key = name if world == 1 else f"{name} rank {rank}/{world}"
    if key in exp.eval_cache:
        return exp.eval_cache[key]
    split = uint8_transform(exp.bundle.eval_transform)
    transform = split[0] if split else exp.bundle.eval_transform
    dataset = ImageDataset(samples[lo:hi], transform, exp.benchmark.preprocess.get(name))
    used = sum(d.tensors[0].numel() * d.tensors[0].element_size() for d in exp.eval_cache.values())
    needed = (hi - lo) * 3 * exp.bundle.image_size**2 * (1 if split else 4)
    if used + needed <= exp.recipe.eval.cache_gb * 2**30:
        dataset = exp.eval_cache[key] = materialize(
            dataset,
            exp.recipe.eval.batch_size,
            exp.recipe.data.num_workers,
            channels_last=prefers_channels_last(exp.bundle.model),
            device=exp.bundle.model.logit_scale.device,  # pinned for a GPU
        )
    return dataset


def _eval_loaders(exp: Experiment, names: list[str] | None = None) -> dict[str, OnDevice]:
    device = exp.bundle.model.logit_scale.device
    split = uint8_transform(exp.bundle.eval_transform)
    mean, std = (split[1], split[2]) if split else ((), ())
    return {
        name: OnDevice(
            eval_loader(
                _eval_dataset(exp, name, samples),
                exp.recipe.eval.batch_size,
                exp.recipe.data.num_workers,
                device,
            ),
            device,
            mean,
            std,
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
    if not labels:  # an empty shard
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels)


def pretrained_tower_features(
    classifier: Classifier, exp: Experiment, key: str, loader
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pretrained image tower's (features, labels) of a set, computed once per evaluation
    precision and shard (the caller has checked that the classifier's image tower is the
    pretrained one)."""
    precision = resolve(exp.recipe.eval.precision, classifier.model.logit_scale.device).name
    rank, world = eval_shard()
    shard = f" rank {rank}/{world}" if world > 1 else ""
    return exp.frozen.get(f"{key} {precision}{shard}", lambda: _features(classifier, loader))


# The models of one evaluation pass live on the device together: up to this many bytes of
# weights (a ViT-L/14 in fp32 is 1.7 GB: 9 WiSE-FT points fit); more are scored in several
# passes, each reading the sets once.
PASS_BYTES = 16 * 2**30


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def evaluate_states(
    classifier: Classifier,
    exp: Experiment,
    states: Sequence[Mapping[str, Tensor] | Callable[[], Mapping[str, Tensor]] | None],
    names: list[str] | None = None,
) -> list[dict[str, dict[str, float]]]:
    """The metrics of ``classifier`` with each of ``states`` (its weights: a state dict, a
    function giving one, or None for the classifier as it is) on the experiment's evaluation
    sets (``names``: only those), in one read of each set: every batch is decoded once and
    scored by every model (copies of the classifier; ``classifier`` itself is left as it is).
    A model whose image tower is the pretrained one scores the pretrained tower's features,
    computed once (flyp.reuse.FrozenFeatures). Under torchrun every rank scores its block of
    each set and takes part (flyp.distributed.eval_shard)."""
    per_pass = max(1, PASS_BYTES // max(1, _weight_bytes(classifier)))
    results: list = [None] * len(states)
    for start in range(0, len(states), per_pass):
        group = list(enumerate(states))[start : start + per_pass]
        models = {}
        for i, state in group:
            model = classifier
            if state is not None:
                model = copy.deepcopy(classifier)
                model.load_state_dict(state() if callable(state) else state)
            models[i] = model
        for i, sets in _evaluate_models(models, exp, names).items():
            results[i] = sets
    return results


def _evaluate_models(
    models: dict[int, Classifier], exp: Experiment, names: list[str] | None
) -> dict[int, dict[str, dict[str, float]]]:
    bench = exp.benchmark
    scoring = dict(
        num_classes=len(bench.class_names),
        class_subsets=bench.class_subsets,
        groups=bench.groups,
        label_groups=bench.label_groups,
    )
    device = exp.bundle.model.logit_scale.device
    precision = resolve(exp.recipe.eval.precision, device).name
    for model in models.values():
        if model.head is None:
            model.refresh_text_head(exp.bundle.tokenizer, bench.class_names, bench.templates)
        if model.channels_last:  # weights too, as training has them (a no-op when they are)
            model.model.to(memory_format=torch.channels_last)
        if device.type == "cpu" and precision == "bf16":
            tune_cpu_bf16(model.model)
    if device.type == "cpu":
        keep_freed_memory()  # evaluation batches are large: ~4x faster without fresh mappings
    loaders = _eval_loaders(exp, names)
    results = {}
    with autocast(device, precision):
        # One bitwise check of each image tower per evaluation, not one per set.
        frozen = {i for i, m in models.items() if exp.frozen is not None and exp.frozen.matches(m.model)}
        for i in sorted(frozen):
            # The pretrained image tower: its features once per set, then only the head runs
            # (in the same batches, so the logits are the ones the full pass gives).
            cached = {
                name: pretrained_tower_features(models[i], exp, name, loader)
                for name, loader in loaders.items()
            }
            head_loaders = {
                name: eval_loader(
                    TensorDataset(x, y, torch.full((len(y),), -1)), exp.recipe.eval.batch_size, 0
                )
                for name, (x, y) in cached.items()
            }
            results[i] = evaluate_many([_HeadOnly(models[i])], head_loaders, **scoring)[0]
        full = [i for i in models if i not in frozen]
        if full:
            many = evaluate_many([models[i] for i in full], loaders, **scoring)
            results.update(zip(full, many, strict=True))
    return results


def evaluate_classifier(
    classifier: Classifier, exp: Experiment, names: list[str] | None = None
) -> dict[str, dict[str, float]]:
    return evaluate_states(classifier, exp, [None], names)[0]


def validation_score(classifier: Classifier, exp: Experiment) -> float:
    """The benchmark's headline metric on ID validation: what every choice is made on (the
    epoch, the probe's C, WiSE-FT's alpha, the greedy soup)."""
    return evaluate_classifier(classifier, exp, ["val"])["val"][exp.benchmark.metric]
