"""Evaluation at scale: every rank scores its block of each set and the metrics are those of one
process; several models (WiSE-FT's alphas, the soups) are scored from one read of each set; the
images cross to the device as uint8 and are finished there bitwise as torchvision does."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

import flyp.data.loader as loader_mod
import flyp.evaluate as evaluate_mod
from fakes import tiny_overrides
from flyp.compare import compare
from flyp.data.loader import finish_pixels, uint8_transform
from flyp.distributed import shard_bounds
from flyp.evaluate import evaluate_classifier, evaluate_states, score_sets
from flyp.experiment import prepare
from flyp.methods import Classifier
from flyp.recipe import load_recipe

# --- sharded scoring ------------------------------------------------------------------------

NUM_CLASSES = 6
OBJECTNET_GROUPS = [[0, 1], [2], [4, 5]]  # class 3 is in no group (ObjectNet leaves some out)


def _sets() -> dict:
    """(logits, labels) of sets of awkward sizes: 11 (3 ranks: 3, 4, 4), val of 7 (temperature
    fit), an ObjectNet-like set of 5, a set of 1 (every rank but one holds nothing)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, n in (("val", 7), ("test", 11), ("objectnet", 5), ("one", 1)):
        logits = torch.randn(n, NUM_CLASSES, generator=g) * 3
        labels = torch.randint(0, NUM_CLASSES, (n,), generator=g).numpy()
        out[name] = (logits, labels)
    out["objectnet"][1][:] = [0, 2, 5, 1, 4]  # labels inside the groups
    return out


GROUPS = {"test": [0, 1, 2, -1, 0, 1, 2, 0, 1, 2, 1]}  # worst-group; -1: in no group


def _score(sets: dict) -> dict:
    return score_sets(sets, NUM_CLASSES, GROUPS, {"objectnet": OBJECTNET_GROUPS})


def _score_worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        mine = {}
        for name, (logits, labels) in _sets().items():
            lo, hi = shard_bounds(len(labels), rank, world)
            mine[name] = (logits[lo:hi], labels[lo:hi])
        torch.save(_score(mine), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_scoring_their_blocks_give_one_process_metrics(world, tmp_path):
    """Accuracy, macro-F1, worst-group, ObjectNet's class-to-group mapping, ECE, NLL and the
    temperature fitted on the gathered validation logits: every rank gets exactly the numbers
    one process computes from the whole sets, each example counted once."""
    expected = _score(_sets())
    mp.spawn(_score_worker, args=(world, str(tmp_path / "pg"), str(tmp_path / "m")), nprocs=world)
    for rank in range(world):
        got = torch.load(tmp_path / f"m.{rank}", weights_only=False)
        assert got == expected
    assert [got[name]["n"] for name in ("val", "test", "objectnet", "one")] == [7, 11, 5, 1]
    assert "temperature" in got["test"] and "worst_group_accuracy" in got["test"]


def test_the_blocks_of_the_ranks_are_every_example_once_in_order():
    for n in (0, 1, 5, 9, 10):
        for world in (1, 2, 3, 8):
            blocks = [range(*shard_bounds(n, r, world)) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(n))


# --- several models from one read of each set -----------------------------------------------


def _recipe(root: Path, *extra: str):
    return load_recipe(None, tiny_overrides(root, "data.num_workers=0", *extra))


def _count_decodes(monkeypatch) -> Counter:
    decodes: Counter = Counter()
    real = loader_mod.load_rgb

    def counted(path):
        decodes[str(path)] += 1
        return real(path)

    monkeypatch.setattr(loader_mod, "load_rgb", counted)
    return decodes


def test_a_compare_decodes_each_test_image_once_per_evaluation_not_once_per_alpha(
    fake_pacs, tmp_path, monkeypatch
):
    """`compare` of ft over 3 seeds with 3 interpolated WiSE-FT alphas and soups, with no
    decoded-image cache: each test image is decoded once by zero-shot (the pretrained tower's
    features are then reused), once by each run's evaluation, once by each run's WiSE-FT sweep
    (all its alphas in one pass) and once by the soups (uniform and greedy together): 8 times.
    Scored one model at a time it was 1 + 3 + 3 x 3 + 2 = 15."""
    recipe = _recipe(
        fake_pacs, "eval.cache_gb=0", "train.epochs=1", "eval.wise_alphas=[0,0.25,0.5,0.75,1]"
    )
    tests = [s.path for name, samples in prepare(recipe).benchmark.eval_sets().items()
             if name != "val" for s in samples]  # fmt: skip
    decodes = _count_decodes(monkeypatch)
    compare(recipe, ["ft"], [0, 1, 2], tmp_path / "cmp", soups=True)
    assert {decodes[str(p)] for p in tests} == {8}


def test_several_states_in_one_pass_score_as_each_alone(fake_pacs, monkeypatch):
    """evaluate_states gives each state the metrics evaluate_classifier gives it loaded alone,
    reading each image once; past PASS_BYTES the states are split into passes (same numbers,
    one read per pass), and the classifier passed in keeps its own weights."""
    exp = prepare(_recipe(fake_pacs, "eval.cache_gb=0"))
    classifier = Classifier(exp.bundle.model)
    original = copy.deepcopy(classifier.state_dict())
    g = torch.Generator().manual_seed(1)
    states = [
        {k: v + 0.05 * i * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
         for k, v in original.items()}
        for i in range(3)
    ]  # fmt: skip
    alone = []
    for state in states:
        one = Classifier(copy.deepcopy(exp.bundle.model))
        one.load_state_dict(state)
        alone.append(evaluate_classifier(one, exp))
    assert alone[0] != alone[2]  # the states differ in their numbers
    images = sum(len(s) for s in exp.benchmark.eval_sets().values())
    decodes = _count_decodes(monkeypatch)
    assert evaluate_states(classifier, exp, states) == alone
    assert sum(decodes.values()) == images
    assert all(torch.equal(v, original[k]) for k, v in classifier.state_dict().items())
    decodes.clear()
    monkeypatch.setattr(evaluate_mod, "PASS_BYTES", 1)  # one model per pass
    assert evaluate_states(classifier, exp, [lambda s=s: s for s in states]) == alone
    assert sum(decodes.values()) == 3 * images


# --- uint8 to the device ----------------------------------------------------------------------


def test_uint8_images_finished_on_the_device_are_torchvisions_floats(fake_pacs):
    bundle = prepare(_recipe(fake_pacs)).bundle
    split = uint8_transform(bundle.eval_transform)
    assert split is not None
    to_uint8, mean, std = split
    rng = np.random.default_rng(0)
    for size in ((24, 24), (40, 17), (13, 31)):
        image = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
        pixels = to_uint8(image)
        assert pixels.dtype == torch.uint8
        assert torch.equal(finish_pixels(pixels[None], mean, std)[0], bundle.eval_transform(image))


def test_the_evaluation_cache_holds_uint8_and_scores_as_the_float_path(fake_pacs, monkeypatch):
    exp = prepare(_recipe(fake_pacs))
    classifier = Classifier(exp.bundle.model)
    uint8 = evaluate_classifier(classifier, exp)
    assert {d.tensors[0].dtype for d in exp.eval_cache.values()} == {torch.uint8}
    floats = prepare(_recipe(fake_pacs))
    monkeypatch.setattr(evaluate_mod, "uint8_transform", lambda transform: None)
    assert evaluate_classifier(Classifier(floats.bundle.model), floats) == uint8
    assert {d.tensors[0].dtype for d in floats.eval_cache.values()} == {torch.float32}


def test_a_transform_of_another_shape_runs_whole_in_the_workers():
    from torchvision import transforms as T

    assert uint8_transform(T.Compose([T.Resize(8), T.ToTensor()])) is None
    assert uint8_transform(lambda image: image) is None
    inplace = T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3, inplace=True)])
    assert uint8_transform(inplace) is None


def test_training_on_uint8_batches_gives_the_float_paths_weights(fake_pacs, tmp_path, monkeypatch):
    """The training loader's batches cross as uint8 and are finished on the device: the
    random crops draw what they drew, and the run ends with bitwise the weights of the fp32
    batches (seen failing with /254 for /255 in the finish)."""
    from safetensors.torch import load_file

    import flyp.train as train_mod
    from flyp.train import finetune

    recipe = _recipe(fake_pacs, "eval.every_epoch=false", "train.epochs=1")
    finetune(recipe, tmp_path / "uint8")
    monkeypatch.setattr(train_mod, "uint8_transform", lambda transform: None)
    finetune(copy.deepcopy(recipe), tmp_path / "float")
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("uint8", "float"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
