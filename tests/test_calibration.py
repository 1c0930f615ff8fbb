"""Calibration in every evaluation: ECE (15 equal-width bins), NLL, temperature scaling fitted
on ID validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flyp.evaluate import calibration, evaluate_sets, expected_calibration_error, fit_temperature


def test_ece_by_hand():
    # bins of width 1/15: 0.95 and 0.97 share the last bin, 0.5 and 0.52 share bin 7 (0.4667, 0.5333]
    confidence = np.array([0.95, 0.97, 0.5, 0.52])
    correct = np.array([1, 0, 1, 1])
    last = 0.5 * abs(0.5 - 0.96)  # 2 of 4 samples: accuracy 0.5, mean confidence 0.96
    middle = 0.5 * abs(1.0 - 0.51)
    assert expected_calibration_error(confidence, correct) == pytest.approx(last + middle)
    # perfectly calibrated: confidence equals accuracy in every bin
    assert expected_calibration_error(np.array([1.0, 1.0]), np.array([1, 1])) == 0.0
    # a confidence on a bin edge opens the bin above it, [lower, upper): 2/15 and 0.14 share one
    assert expected_calibration_error(np.array([2 / 15, 0.14]), np.array([1, 0])) == pytest.approx(
        abs(0.5 - (2 / 15 + 0.14) / 2), abs=1e-7
    )
    # exactly 1.0 is a bin of its own: not averaged with 0.95 (that would give |0.5 - 0.975|)
    assert expected_calibration_error(np.array([1.0, 0.95]), np.array([1, 0])) == pytest.approx(
        0.5 * abs(1 - 1.0) + 0.5 * abs(0 - 0.95), abs=1e-7
    )


def test_nll_and_confidence_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 0])
    p = [math.exp(2) / (math.exp(2) + 1), 1 / (1 + math.e)]  # p(label) per sample
    out = calibration(logits, labels, np.array([1, 0]))
    assert out["nll"] == pytest.approx(-(math.log(p[0]) + math.log(p[1])) / 2)
    # confidences 0.881 (bin 14) and 0.731 (bin 11): |1 - 0.881| and |0 - 0.731|, half each
    conf = [p[0], math.e / (1 + math.e)]
    assert out["ece"] == pytest.approx(0.5 * (1 - conf[0]) + 0.5 * conf[1])
    # at temperature 2 the logits halve
    half = calibration(logits, labels, np.array([1, 0]), temperature=2.0)
    assert half["nll"] == pytest.approx(calibration(logits / 2, labels, np.array([1, 0]))["nll"])


def test_temperature_scaling_lowers_validation_nll():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (400,), generator=g)
    # overconfident logits: right 70% of the time, at a huge scale
    logits = torch.randn(400, 5, generator=g)
    right = torch.rand(400, generator=g) < 0.7
    winners = torch.where(right, labels, (labels + 1) % 5)
    logits[torch.arange(400), winners] += 3.0
    logits *= 8.0
    t = fit_temperature(logits, labels.numpy())
    assert t > 2.0  # overconfident: cooled down
    correct = (logits.argmax(1) == labels).numpy()
    before = calibration(logits, labels.numpy(), correct)
    after = calibration(logits, labels.numpy(), correct, t)
    assert after["nll"] < before["nll"] - 0.5 and after["ece"] < before["ece"]
    for other in (t / 1.5, t * 1.5):  # a minimum
        assert calibration(logits, labels.numpy(), correct, other)["nll"] > after["nll"]


class Fixed(torch.nn.Module):
    """A 'classifier' returning stored logits batch by batch."""

    def __init__(self, logits):
        super().__init__()
        self.logits, self.at = logits, 0

    def forward(self, images):
        out = self.logits[self.at : self.at + len(images)]
        self.at += len(images)
        return out


def test_every_set_reports_calibration_with_the_validation_temperature():
    g = torch.Generator().manual_seed(1)
    val_logits, test_logits = 6 * torch.randn(60, 3, generator=g), 6 * torch.randn(30, 3, generator=g)
    val_labels, test_labels = torch.randint(0, 3, (60,), generator=g), torch.randint(0, 3, (30,), generator=g)
    logits = torch.cat([val_logits, test_logits])
    loaders = {
        "val": [(torch.zeros(60, 1), val_labels, None)],
        "test": [(torch.zeros(30, 1), test_labels, None)],
    }
    sets = evaluate_sets(Fixed(logits), loaders, 3)
    t = fit_temperature(val_logits, val_labels.numpy())
    for name, lg, lb in (("val", val_logits, val_labels), ("test", test_logits, test_labels)):
        correct = (lg.argmax(1) == lb).numpy()
        assert sets[name]["temperature"] == pytest.approx(t)
        assert sets[name]["ece"] == pytest.approx(calibration(lg, lb.numpy(), correct)["ece"])
        assert sets[name]["nll_ts"] == pytest.approx(calibration(lg, lb.numpy(), correct, t)["nll"])
    assert sets["val"]["nll_ts"] <= sets["val"]["nll"]


def _torchmetrics_ece(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """torchmetrics' multiclass ECE (l1, 15 bins) of two-class probabilities whose top-1
    confidence is ``confidence`` (class 0), right where ``correct``."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = torch.stack([confidence, 1 - confidence], dim=1)
    target = torch.where(correct, 0, 1)
    return float(multiclass_calibration_error(probs, target, num_classes=2, n_bins=15, norm="l1"))


def test_ece_bins_confidences_on_the_edges_and_at_one_as_torchmetrics_does():
    """Confidences exactly on a bin edge (k/15 as float32) open the bin above; exactly 1.0 is
    a bin of its own (bf16 gives many). Where the edges differ, (lower, upper] bins give
    another number: this case tells the two apart."""
    edges = torch.linspace(0, 1, 16, dtype=torch.float32)
    on_edges = edges[8:]  # 8/15 ... 14/15 and 1.0: every top-1 confidence of two classes
    confidence = torch.cat([on_edges, on_edges, torch.ones(5), on_edges[:-1] + 1e-3])
    correct = torch.arange(len(confidence)) % 3 != 0
    ours = expected_calibration_error(confidence.numpy(), correct.numpy())
    assert ours == pytest.approx(_torchmetrics_ece(confidence, correct), abs=1e-6)
    # (lower, upper]: each edge joins the bin below, 1.0 joins (14/15, 1]
    below = np.clip(np.searchsorted(edges.numpy(), confidence.numpy(), side="left") - 1, 0, 14)
    other = sum(
        (below == b).mean() * abs(correct.numpy()[below == b].mean() - confidence.numpy()[below == b].mean())
        for b in np.unique(below)
    )
    assert abs(ours - other) > 1e-3


@pytest.mark.parametrize("seed", range(5))
def test_ece_equals_torchmetrics_on_bf16_confidences(seed):
    """bf16 logits: coarse confidences, many on edges or at 1.0."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(400, 5, generator=g) * 4).to(torch.bfloat16).float()
    labels = torch.randint(0, 5, (400,), generator=g)
    probs = logits.softmax(1).to(torch.bfloat16).float()
    confidence, predicted = probs.max(1)
    correct = predicted == labels
    from torchmetrics.functional.classification import multiclass_calibration_error

    theirs = float(multiclass_calibration_error(probs, labels, num_classes=5, n_bins=15, norm="l1"))
    ours = expected_calibration_error(confidence.numpy(), correct.numpy())
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert (confidence == 1).any()  # the case that needs the convention
