"""What runs of one experiment share: decoded training images and the pretrained image
tower's features. Both must be invisible in the numbers: bitwise what a run gives without."""

from __future__ import annotations

import copy
import json
import shutil

import torch
from safetensors.torch import load_file

from fakes import tiny_overrides
from flyp.compare import compare
from flyp.methods import Classifier, image_tower_names
from flyp.recipe import load_recipe
from flyp.reuse import FrozenFeatures, decode_images
from flyp.train import evaluate_classifier, finetune, prepare


def tiny_recipe(root, *overrides):
    return load_recipe(None, tiny_overrides(root, *overrides))


def counting_image_calls(model) -> list[int]:
    calls = []
    original = model.encode_image

    def counted(images):
        calls.append(len(images))
        return original(images)

    model.encode_image = counted
    return calls


def test_pretrained_tower_features_are_computed_once_and_give_the_same_metrics(fake_pacs):
    exp = prepare(tiny_recipe(fake_pacs))
    model = exp.bundle.model
    pretrained = copy.deepcopy(model.state_dict())
    expected = evaluate_classifier(Classifier(model), exp)  # no feature cache: the full pass

    exp.frozen = FrozenFeatures.of(pretrained, model, image_tower_names(model, exp.bundle.image_size))
    calls = counting_image_calls(model)
    assert evaluate_classifier(Classifier(model), exp) == expected
    first = len(calls)
    assert first > 0
    assert evaluate_classifier(Classifier(model), exp) == expected  # from the cached features
    assert len(calls) == first

    with torch.no_grad():  # a finetuned image tower is not the pretrained one: a full pass
        next(p for n, p in model.named_parameters() if n in exp.frozen.reference).add_(0.5)
    assert not exp.frozen.matches(model)
    changed = evaluate_classifier(Classifier(model), exp)
    assert len(calls) > first
    assert changed != expected


def test_a_changed_buffer_also_breaks_the_match(fake_pacs):
    exp = prepare(tiny_recipe(fake_pacs))
    model = exp.bundle.model
    frozen = FrozenFeatures.of(model.state_dict(), model, image_tower_names(model, exp.bundle.image_size))
    frozen.reference = {k: v.clone() for k, v in frozen.reference.items()}
    assert frozen.matches(model)
    name, buffer = next((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    buffer.add_(1.0)
    assert not frozen.matches(model), name


def test_training_from_decoded_images_equals_training_from_disk(fake_pacs, tmp_path):
    finetune(tiny_recipe(fake_pacs, "data.cache_gb=0", "train.epochs=1"), tmp_path / "disk")
    exp = prepare(tiny_recipe(fake_pacs, "train.epochs=1"))
    finetune(exp.recipe, tmp_path / "memory", exp=exp)
    a = load_file(str(tmp_path / "disk" / "model.safetensors"))
    b = load_file(str(tmp_path / "memory" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the next run of the experiment trains from memory: the image files are not read again
    exp.bundle.model.load_state_dict(prepare(exp.recipe).bundle.model.state_dict())
    for domain in ("photo",):
        shutil.rmtree(fake_pacs / domain)
    finetune(exp.recipe, tmp_path / "again", exp=exp)
    c = load_file(str(tmp_path / "again" / "model.safetensors"))
    for key in a:
        assert torch.equal(a[key], c[key]), key


def test_decoding_stops_at_the_memory_budget(fake_pacs):
    exp = prepare(tiny_recipe(fake_pacs))
    samples = exp.benchmark.train
    one = 24 * 24 * 4  # the fake images are 24 x 24 RGB, which PIL holds in 4 bytes a pixel
    decoded = decode_images(samples, budget_bytes=2.5 * one)
    assert sorted(decoded) == [0, 1]
    assert decode_images(samples, budget_bytes=0) == {}
    assert len(decode_images(samples, budget_bytes=10**9)) == len(samples)


def test_compare_reuses_features_and_keeps_every_number(fake_pacs, tmp_path):
    """zeroshot and lp through flyp compare (feature cache) give the numbers they give alone."""
    recipe = tiny_recipe(fake_pacs, "train.epochs=1")
    compare(recipe, ["zeroshot", "lp"], [0], tmp_path / "cmp", wise=True)
    for method in ("zeroshot", "lp"):
        alone = copy.deepcopy(recipe)
        alone.train.method = method
        finetune(alone, tmp_path / method)
        got = json.loads((tmp_path / "cmp" / ("zeroshot" if method == "zeroshot" else "lp-s0") / "metrics.json").read_text())
        want = json.loads((tmp_path / method / "metrics.json").read_text())
        assert got["sets"] == want["sets"], method
    wise = json.loads((tmp_path / "cmp" / "lp-s0" / "wise.json").read_text())
    assert [p["alpha"] for p in wise["points"]] == recipe.eval.wise_alphas


def test_a_soup_keeps_a_tensor_all_runs_share_bit_for_bit():
    from flyp.ensemble import uniform_soup

    value = torch.tensor([0.9, 0.1, 0.7, 3.3])  # (a + a + a) / 3 is not a for 0.9
    assert not torch.equal(torch.stack([value] * 3).mean(0), value)
    moved = {"frozen": value, "trained": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    states = [dict(moved, trained=moved["trained"] + i) for i in range(3)]
    soup = uniform_soup(states)
    assert torch.equal(soup["frozen"], value)
    assert torch.equal(soup["trained"], torch.tensor([2.0, 3.0, 4.0, 5.0]))


def test_in_memory_evaluation_sets_are_batched_as_views_in_order():
    from torch.utils.data import DataLoader, TensorDataset

    from flyp.data.loader import eval_loader

    images = torch.arange(7 * 3 * 2 * 2, dtype=torch.float32).reshape(7, 3, 2, 2)
    images = images.contiguous(memory_format=torch.channels_last)
    dataset = TensorDataset(images, torch.arange(7), torch.full((7,), -1))
    batches = list(eval_loader(dataset, 3, 0))
    expected = list(DataLoader(dataset, batch_size=3))
    assert len(batches) == len(eval_loader(dataset, 3, 0)) == 3
    for got, want in zip(batches, expected, strict=True):
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b)
    assert batches[1][0].data_ptr() == images[3].data_ptr()  # a view, not a copy
    assert batches[1][0].is_contiguous(memory_format=torch.channels_last)


def test_bf16_evaluation_runs_the_tower_in_bf16_and_caches_apart(fake_pacs):
    exp = prepare(tiny_recipe(fake_pacs))
    model = exp.bundle.model
    exp.frozen = FrozenFeatures.of(
        copy.deepcopy(model.state_dict()), model, image_tower_names(model, exp.bundle.image_size)
    )
    dtypes = []
    model.visual.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    evaluate_classifier(Classifier(model), exp, ["val"])
    exp.recipe.eval.precision = "bf16"
    evaluate_classifier(Classifier(model), exp, ["val"])
    assert dtypes == [torch.float32, torch.bfloat16]
    fp32, bf16 = exp.frozen.features["val fp32"][0], exp.frozen.features["val bf16"][0]
    assert bf16.dtype == torch.float32  # features leave the tower in fp32
    assert not torch.equal(fp32, bf16)
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)


def test_runs_of_an_experiment_share_its_caches(fake_pacs):
    exp = prepare(tiny_recipe(fake_pacs))
    run = exp.for_run(tiny_recipe(fake_pacs, "train.seed=1"))
    assert run.recipe.train.seed == 1 and exp.recipe.train.seed == 0
    decoded = run.train_images.get(run.benchmark.train, 1.0)
    assert exp.train_images.images is decoded  # decoded by one run, there for the others
    evaluate_classifier(Classifier(run.bundle.model), run, ["val"])
    assert "val" in exp.eval_cache
