"""Linear probing: logistic regression (L-BFGS) on frozen, normalised image features, with the
regularisation strength chosen on the ID validation split (:func:`fit_probe`: a classifier's
head replaced by the probe, for the lp and lp-ft methods)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from flyp import progress
from flyp.checkpoint import atomic_write_json
from flyp.data.loader import ImageDataset, eval_loader
from flyp.distributed import is_main
from flyp.evaluate import metrics_from_predictions, pretrained_tower_features
from flyp.models.base import prefers_channels_last, to_model_layout
from flyp.precision import autocast
from flyp.tracking import named, note

if TYPE_CHECKING:
    from flyp.experiment import Experiment
    from flyp.methods import Classifier

C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


@torch.no_grad()
def image_features(model: nn.Module, loader: DataLoader, desc: str = "features") -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    channels_last = prefers_channels_last(model)
    device = next(model.parameters()).device
    feats, labels = [], []
    for images, batch_labels, _ in tqdm(loader, desc=desc, leave=False, disable=None):
        images = to_model_layout(images.to(device, non_blocking=True), channels_last)
        feats.append(F.normalize(model.encode_image(images).float(), dim=-1))
        labels.append(batch_labels)
        progress.working(f"{desc} {sum(map(len, labels))} images")
    # scikit-learn works on the CPU: features come back from whatever device the model is on
    return torch.cat(feats).cpu().numpy(), torch.cat(labels).cpu().numpy()


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float((predictions == labels).mean())


def choose_c(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    grid: Sequence[float] = C_GRID,
    score: Callable[[np.ndarray, np.ndarray], float] = accuracy,
) -> tuple[LogisticRegression, dict[float, float]]:
    """Fit one probe per C; keep the one with the best validation ``score`` (ties: smaller C)."""
    scores: dict[float, float] = {}
    best: LogisticRegression | None = None
    for c in grid:
        probe = LogisticRegression(C=c, max_iter=1000)
        probe.fit(train_x, train_y)
        scores[c] = float(score(probe.predict(val_x), val_y))
        if best is None or scores[c] > scores[best.C]:
            best = probe
    assert best is not None
    return best, scores


def probe_to_linear(probe: LogisticRegression, num_classes: int) -> nn.Linear:
    """The probe as a linear layer over all classes (a class absent from training gets -inf-ish bias)."""
    dim = probe.coef_.shape[1]
    weight = torch.zeros(num_classes, dim)
    bias = torch.full((num_classes,), -1e4)
    classes = torch.as_tensor(probe.classes_)
    coef, intercept = torch.as_tensor(probe.coef_, dtype=torch.float32), torch.as_tensor(probe.intercept_, dtype=torch.float32)
    if len(classes) == 2:  # sklearn keeps one row for two classes: logit(1) - logit(0)
        coef = torch.cat([torch.zeros_like(coef), coef])
        intercept = torch.cat([torch.zeros(1), intercept])
    weight[classes] = coef
    bias[classes] = intercept
    layer = nn.Linear(dim, num_classes)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def fit_probe(classifier: Classifier, exp: Experiment, run_dir: Path) -> None:
    """Replace the classifier's head by a logistic-regression probe, C chosen on ID validation
    with the benchmark's headline metric."""
    transform, bs, workers = (
        exp.bundle.eval_transform,
        exp.recipe.eval.batch_size,
        exp.recipe.data.num_workers,
    )
    decoded = exp.train_images.get(exp.benchmark.train, exp.recipe.data.cache_gb)
    pretrained_tower = exp.frozen is not None and exp.frozen.matches(classifier.model)

    def features(name: str, samples: list, decoded=None) -> tuple[np.ndarray, np.ndarray]:
        dataset = ImageDataset(samples, transform, decoded=decoded)
        loader = eval_loader(dataset, bs, workers, classifier.model.logit_scale.device)
        with autocast(classifier.model.logit_scale.device, exp.recipe.eval.precision):
            if pretrained_tower:
                cached = pretrained_tower_features(classifier, exp, f"probe {name}", loader)
                return cached[0].numpy(), cached[1].numpy()
            return image_features(classifier.model, loader, named(f"probe {name}"))

    note("fitting the linear probe (C chosen on ID validation)")
    train_x, train_y = features("train", exp.benchmark.train, decoded)
    val_x, val_y = features("val", exp.benchmark.val)
    metric, groups = exp.benchmark.metric, exp.benchmark.groups.get("val")

    def score(predictions, labels) -> float:
        group = None if groups is None else np.asarray(groups)
        return metrics_from_predictions(predictions, labels, group)[metric]

    probe, scores = choose_c(train_x, train_y, val_x, val_y, score=score)
    device = classifier.model.logit_scale.device
    classifier.head = probe_to_linear(probe, len(exp.benchmark.class_names)).to(device)
    if is_main():  # under torchrun every rank fits the same probe; rank 0 writes it
        atomic_write_json(
            run_dir / "probe.json",
            {"chosen_C": probe.C, "metric": metric, f"val_{metric}_by_C": {str(c): a for c, a in scores.items()}},
        )
