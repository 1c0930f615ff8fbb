"""Metrics as the benchmarks define them, on hand-built cases where the definitions differ."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flyp.evaluate import evaluate_sets, metrics_from_predictions, summarise


def test_macro_f1_averages_over_the_classes_present_in_the_labels():
    # Class 0: 2 right, nothing else predicted as 0 -> F1 1. Class 1: 1 of 2 found, precision 1
    # -> F1 2/3. Class 2 is only predicted: WILDS leaves it out -> (1 + 2/3) / 2 = 5/6.
    # Counting it as an F1 of 0 would give (1 + 2/3 + 0) / 3 = 5/9.
    m = metrics_from_predictions(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1]))
    assert m["macro_f1"] == pytest.approx(5 / 6)
    assert m["accuracy"] == 0.75 and m["n"] == 4


def test_macro_f1_keeps_present_classes_that_are_never_predicted():
    # Class 0: precision 1/3, recall 1 -> F1 1/2; classes 1 and 2 never predicted -> 0 each.
    m = metrics_from_predictions(np.array([0, 0, 0]), np.array([0, 1, 2]))
    assert m["macro_f1"] == pytest.approx(1 / 6)
    assert m["balanced_accuracy"] == pytest.approx(1 / 3) and m["worst_class_accuracy"] == 0.0


def test_worst_group_leaves_out_group_minus_one_but_accuracy_counts_it():
    # FMoW: groups 0 and 1 are regions, -1 is "Other" (all wrong here).
    labels = np.zeros(6, dtype=int)
    preds = np.array([0, 0, 1, 0, 1, 1])
    groups = np.array([0, 0, 1, 1, -1, -1])
    m = metrics_from_predictions(preds, labels, groups)
    assert m["accuracy"] == 0.5  # 3 of 6: the Other images count (0.75 without them)
    assert m["worst_group_accuracy"] == 0.5  # group 1; Other's 0.0 is not a region
    assert m["n"] == 6


def test_worst_group_is_nan_when_no_sample_has_a_group():
    m = metrics_from_predictions(np.array([0, 1]), np.array([0, 0]), np.array([-1, -1]))
    assert m["accuracy"] == 0.5 and math.isnan(m["worst_group_accuracy"])


def test_groups_must_match_the_samples():
    with pytest.raises(ValueError, match="2 group ids for 3 samples"):
        metrics_from_predictions(np.array([0, 1, 1]), np.array([0, 1, 1]), np.array([0, 1]))


def test_no_groups_no_worst_group_key():
    m = metrics_from_predictions(np.array([0, 1]), np.array([0, 1]))
    assert set(m) == {"accuracy", "macro_f1", "balanced_accuracy", "worst_class_accuracy", "n"}


class _Logits(nn.Module):
    """The 'images' are the logits themselves."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images


def test_evaluate_sets_scores_every_set_with_its_groups():
    logits = torch.eye(3)[[0, 1, 2, 2]]  # predictions 0, 1, 2, 2
    labels = torch.tensor([0, 1, 1, 2])
    loader = DataLoader(TensorDataset(logits, labels, torch.arange(4)), batch_size=3)
    out = evaluate_sets(_Logits(), {"id_test": loader}, 3, groups={"id_test": [0, 1, -1, 1]})
    m = out["id_test"]
    assert m["accuracy"] == 0.75 and m["worst_group_accuracy"] == 1.0  # the miss is in Other
    # Class 1: precision 1, recall 1/2 -> 2/3; class 2: precision 1/2, recall 1 -> 2/3.
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)


def test_summarise_uses_the_headline_metric():
    sets = {
        "val": {"macro_f1": 0.5},
        "id_test": {"macro_f1": 0.75},
        "ood_a": {"macro_f1": 0.25},
        "ood_b": {"macro_f1": 0.5},
    }
    s = summarise(sets, "id_test", ["ood_a", "ood_b", "absent"], metric="macro_f1")
    assert (s["id"], s["ood_mean"], s["val"], s["metric"]) == (0.75, 0.375, 0.5, "macro_f1")
