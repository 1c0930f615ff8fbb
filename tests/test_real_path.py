"""The path real users run (GPU, several processes), checked as far as a CPU allows."""

from __future__ import annotations

import copy

import torch

from fakes import tiny_overrides
from flyp.methods import Classifier, image_tower_names
from flyp.recipe import load_recipe
from flyp.reuse import FrozenFeatures
from flyp.train import evaluate_classifier, prepare


def test_the_pretrained_tower_is_checked_once_per_evaluation_not_once_per_set(fake_pacs, monkeypatch):
    exp = prepare(load_recipe(None, tiny_overrides(fake_pacs)))
    model = exp.bundle.model
    exp.frozen = FrozenFeatures.of(
        copy.deepcopy(model.state_dict()), model, image_tower_names(model, exp.bundle.image_size)
    )
    checks = []
    original = FrozenFeatures.matches
    monkeypatch.setattr(FrozenFeatures, "matches", lambda self, m: checks.append(1) or original(self, m))
    metrics = evaluate_classifier(Classifier(model), exp)
    assert len(metrics) >= 3  # val, the ID test and OOD sets
    assert len(checks) == 1


def test_the_tower_check_copies_no_tensor_when_devices_agree(fake_pacs, monkeypatch):
    exp = prepare(load_recipe(None, tiny_overrides(fake_pacs)))
    model = exp.bundle.model
    frozen = FrozenFeatures.of(
        copy.deepcopy(model.state_dict()), model, image_tower_names(model, exp.bundle.image_size)
    )
    copies = []
    original = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: copies.append(1) or original(self, *a, **k))
    assert frozen.matches(model)
    assert copies == []


def test_the_decoded_image_cache_counts_four_bytes_per_rgb_pixel(tmp_path):
    """cache_gb is a true bound: PIL holds an RGB pixel in 4 bytes, so a budget of exactly
    three 10x10 RGB images (1200 bytes) holds three, not four (four at 3 bytes a pixel)."""
    from PIL import Image

    from flyp.data.folders import Sample
    from flyp.reuse import decode_images, held_bytes

    samples = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (10, 10), (i, i, i)).save(path)
        samples.append(Sample(path, 0))
    assert held_bytes(Image.new("RGB", (10, 10))) == 400
    assert held_bytes(Image.new("L", (10, 10))) == 100
    assert len(decode_images(samples, budget_bytes=1200)) == 3
