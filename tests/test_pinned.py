
"""Behaviour pinned to exact values: each test here failed against a planted bug that the rest
of the suite let through (optimizer groups, schedule, clamp, selection, probe, L2-SP anchor,
captions, split seed, bf16). Tiny model, fake images, a few steps each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flyp.gradcache
import flyp.probe
import flyp.train
from fakes import checkpoint_weights, tf32_atol, tiny_overrides
from flyp.data import build_benchmark
from flyp.data.templates import PACS
from flyp.methods import (
    METHODS,
    LossContext,
    build_classifier,
    captions_for,
    image_tower_names,
    set_trainable,
    text_tower_names,
)
from flyp.models import load_model
from flyp.models.tiny import WordHashTokenizer
from flyp.recipe import load_recipe
from flyp.train import finetune, param_groups, prepare, warmup_cosine

# The tiny model's parameters by kind (visual: conv, BN, conv, BN, ..., linear at index 8).
TINY_MATRICES = {
    "model.visual.0.weight",
    "model.visual.3.weight",
    "model.visual.8.weight",
    "model.token_embedding.weight",
    "model.text_projection.weight",
}
TINY_VISUAL_VECTORS = {
    "model.visual.0.bias",
    "model.visual.1.weight",
    "model.visual.1.bias",
    "model.visual.3.bias",
    "model.visual.4.weight",
    "model.visual.4.bias",
    "model.visual.8.bias",
}
TINY_VECTORS = TINY_VISUAL_VECTORS | {"model.text_projection.bias"}


def recipe(root: Path, *extra: str):
    """3 epochs of 3 steps (18 training images, batch 6), warmup 2, lr 3e-3; one OOD set."""
    return load_recipe(None, tiny_overrides(root, "data.ood_domains=[art]", *extra))


def log_lines(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


def step_lines(run_dir: Path) -> list[dict]:
    return [x for x in log_lines(run_dir) if "loss" in x]


def classifier_for(method: str, cfg_overrides: tuple[str, ...] = ()):
    bundle = load_model("tiny")
    ctx = LossContext(bundle.tokenizer, ["dog", "horse", "house"], ["a photo of a {}."])
    method_ = METHODS[method]
    clf = build_classifier(method_, bundle.model, ctx)
    text_names = text_tower_names(bundle.model, bundle.tokenizer)
    set_trainable(method_, clf, image_tower_names(bundle.model, 32), text_names)
    cfg = load_recipe(None, ["train.weight_decay=0.2", "train.lr=1e-3", *cfg_overrides]).train
    return clf, cfg


def named_groups(clf, groups) -> dict[str, tuple[set[str], dict]]:
    names = {id(p): n for n, p in clf.named_parameters()}
    return {
        g["name"]: ({names[id(p)] for p in g["params"]}, {k: g[k] for k in g if k != "params"})
        for g in groups
    }


# --- optimizer groups -------------------------------------------------------------------


def test_param_groups_by_name_flyp():
    clf, cfg = classifier_for("flyp")
    groups = named_groups(clf, param_groups(clf, cfg))
    assert set(groups) == {"decay", "no_decay", "scale"}
    assert groups["decay"][0] == TINY_MATRICES
    assert groups["no_decay"][0] == TINY_VECTORS
    assert groups["scale"][0] == {"model.logit_scale"}
    assert groups["decay"][1]["weight_decay"] == 0.2
    assert groups["no_decay"][1]["weight_decay"] == 0.0
    assert groups["scale"][1]["weight_decay"] == 0.0
    assert groups["scale"][1]["lr"] == 1e-3  # logit_scale_lr null: the model's lr


@pytest.mark.parametrize("scale_lr", [0.0, 0.5])
def test_scale_group_takes_its_own_lr_even_zero(scale_lr):
    clf, cfg = classifier_for("flyp", (f"train.logit_scale_lr={scale_lr}",))
    assert named_groups(clf, param_groups(clf, cfg))["scale"][1]["lr"] == scale_lr


def test_param_groups_by_name_ft_head_and_frozen_text():
    clf, cfg = classifier_for("ft")
    groups = named_groups(clf, param_groups(clf, cfg))
    assert set(groups) == {"decay", "no_decay"}  # text tower and scale frozen
    assert groups["decay"][0] == {
        "model.visual.0.weight",
        "model.visual.3.weight",
        "model.visual.8.weight",
        "head.weight",
    }
    assert groups["no_decay"][0] == TINY_VISUAL_VECTORS | {"head.bias"}


def test_training_optimizer_uses_the_groups(fake_pacs, tmp_path, monkeypatch):
    """What finetune hands AdamW, by parameter name: decay, lr and the scale's own lr."""
    built = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    exp = prepare(recipe(fake_pacs, "train.weight_decay=0.2", "train.logit_scale_lr=0.5",
                         "train.stop_after_steps=1"))  # fmt: skip
    finetune(exp.recipe, tmp_path / "run", exp=exp)
    (optimizer,) = built
    names = {id(p): "model." + n for n, p in exp.bundle.model.named_parameters()}
    seen = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen[names[id(p)]] = (group["weight_decay"], group["initial_lr"])
    assert seen == {
        **{n: (0.2, 3e-3) for n in TINY_MATRICES},
        **{n: (0.0, 3e-3) for n in TINY_VECTORS},
        "model.logit_scale": (0.0, 0.5),
    }


# --- learning-rate schedule ---------------------------------------------------------------


def test_warmup_cosine_values():
    f = warmup_cosine(4, 20)
    assert f(0) == 0.25  # linear warmup: (step + 1) / warmup
    assert f(1) == 0.5
    assert f(3) == 1.0  # end of warmup
    assert f(4) == 1.0  # the cosine starts at 1
    assert f(12) == pytest.approx(0.5, abs=1e-12)  # halfway through the cosine
    assert f(8) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)), abs=1e-12)
    assert f(20) == pytest.approx(0.0, abs=1e-12)  # the floor, reached at the last step
    assert warmup_cosine(0, 10)(0) == 1.0  # no warmup: full lr at once


def test_logged_lr_follows_warmup_and_reaches_zero(fake_pacs, tmp_path):
    """9 steps, warmup 3, lr 3e-3. Each log line holds the lr after its step's scheduler
    update, i.e. the lr of the next step: 3e-3 * factor(step)."""
    finetune(recipe(fake_pacs, "train.warmup_steps=3", "train.select_on=last"), tmp_path / "r")
    lr = {x["step"]: x["lr"] for x in step_lines(tmp_path / "r")}
    assert sorted(lr) == list(range(1, 10))
    assert lr[1] == pytest.approx(3e-3 * 2 / 3, rel=1e-9)  # still warming up
    assert lr[2] == pytest.approx(3e-3, rel=1e-9)  # end of warmup: the full lr
    assert lr[3] == pytest.approx(3e-3, rel=1e-9)  # cosine from 1
    assert lr[6] == pytest.approx(3e-3 * 0.5, rel=1e-9)  # halfway through the cosine
    assert lr[9] == pytest.approx(0.0, abs=1e-12)  # the floor at the last step


# --- logit scale ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "init, push, bound",
    [
        (99.0, 1.0, 100.0),  # pushed up from under the cap: stops at train.max_logit_scale
        (150.0, 1.0, 150.0),  # a model starting above the cap keeps its own start as the cap
        (1.5, -1.0, 1.0),  # pushed down: the log scale stays >= 0 (temperature <= 1)
    ],
)
def test_logit_scale_is_clamped(init, push, bound, fake_pacs, tmp_path, monkeypatch):
    """A loss whose only wish is to move the scale (by ``push``): with lr 1 on the scale, Adam
    moves it by about 0.5 in log space at the first step, well past the bound unless clamped."""

    def scale_only(image, text, model, labels, ctx, gather=None):
        return -push * model.logit_scale + 0 * (image.sum() + text.sum())

    monkeypatch.setattr(flyp.gradcache, "contrastive_loss", scale_only)
    finetune(
        recipe(fake_pacs, f"train.init_logit_scale={init}", "train.logit_scale_lr=1",
               "train.select_on=last", "train.epochs=1"),
        tmp_path / "r",
    )  # fmt: skip
    scales = [1 / x["temperature"] for x in step_lines(tmp_path / "r")]
    assert scales == pytest.approx([bound] * 3, rel=1e-5)


# --- epoch selection ---------------------------------------------------------------------


def scripted_validation(monkeypatch, scores: list[float]) -> list[dict[str, torch.Tensor]]:
    """Replace the validation metric by ``scores``; return the weights seen at each call."""
    seen: list[dict[str, torch.Tensor]] = []

    def fake(classifier, exp) -> float:
        # on the CPU: the run may train on FLYP_TEST_DEVICE, the saved weights are CPU tensors
        seen.append({k: v.detach().cpu().clone() for k, v in classifier.state_dict().items()})
        return scores[len(seen) - 1]

    monkeypatch.setattr(flyp.train, "validation_score", fake)
    return seen


@pytest.mark.parametrize("scores, selected", [([0.2, 0.9, 0.5], 2), ([0.9, 0.2, 0.5], 1)])
def test_selection_keeps_the_best_validation_epoch(scores, selected, fake_pacs, tmp_path,
                                                   monkeypatch):  # fmt: skip
    seen = scripted_validation(monkeypatch, scores)
    metrics = finetune(recipe(fake_pacs), tmp_path / "r")
    assert len(seen) == 3 and metrics["selected_epoch"] == selected
    saved = load_file(str(tmp_path / "r" / "model.safetensors"))
    for key, value in saved.items():
        torch.testing.assert_close(value, seen[selected - 1][key], rtol=0, atol=0, msg=key)
    # the selected weights differ from the last epoch's: the check above can tell them apart
    assert not torch.equal(saved["model.visual.0.weight"], seen[2]["model.visual.0.weight"])
    val_lines = [x for x in log_lines(tmp_path / "r") if "val" in x]
    assert [(x["step"], x["epoch"], x["val"]) for x in val_lines] == [
        (3, 1, scores[0]),
        (6, 2, scores[1]),
        (9, 3, scores[2]),
    ]
    assert {x["val_metric"] for x in val_lines} == {"accuracy"}


def test_selected_weights_score_the_best_logged_validation(fake_pacs, tmp_path):
    """Real validation: the selected epoch is the first best of the logged scores, and the
    saved weights, evaluated again at the end, score exactly that on validation."""
    metrics = finetune(recipe(fake_pacs), tmp_path / "r")
    vals = [x["val"] for x in log_lines(tmp_path / "r") if "val" in x]
    assert len(vals) == 3
    assert metrics["selected_epoch"] == 1 + vals.index(max(vals))
    assert metrics["sets"]["val"]["accuracy"] == max(vals)


def test_selection_survives_a_resume(fake_pacs, tmp_path, monkeypatch):
    """Epoch 1 is the best; the run is killed in epoch 2 and resumed: epoch 1 stays selected."""
    seen = scripted_validation(monkeypatch, [0.9, 0.2, 0.5])
    finetune(recipe(fake_pacs, "train.stop_after_steps=4"), tmp_path / "r")
    assert len(seen) == 1
    metrics = finetune(recipe(fake_pacs), tmp_path / "r", resume=True)
    assert len(seen) == 3 and metrics["selected_epoch"] == 1
    saved = load_file(str(tmp_path / "r" / "model.safetensors"))
    for key, value in saved.items():
        torch.testing.assert_close(value, seen[0][key], rtol=0, atol=0, msg=key)


def test_select_on_last_never_validates(fake_pacs, tmp_path, monkeypatch):
    seen = scripted_validation(monkeypatch, [])
    metrics = finetune(recipe(fake_pacs, "train.select_on=last"), tmp_path / "r")
    assert seen == [] and metrics["selected_epoch"] == 3


# --- linear probe --------------------------------------------------------------------------


def test_probe_c_is_chosen_on_the_validation_split(fake_pacs, tmp_path, monkeypatch):
    from flyp.data.loader import ImageDataset, eval_loader
    from flyp.probe import image_features

    calls = []
    real = flyp.probe.choose_c

    def spy(train_x, train_y, val_x, val_y, *args, **kwargs):
        calls.append((train_x, train_y, val_x, val_y))
        return real(train_x, train_y, val_x, val_y, *args, **kwargs)

    monkeypatch.setattr(flyp.probe, "choose_c", spy)
    exp = prepare(recipe(fake_pacs, "train.method=lp"))
    finetune(exp.recipe, tmp_path / "r", exp=exp)
    ((train_x, train_y, val_x, val_y),) = calls
    bench = exp.benchmark
    assert train_y.tolist() == [s.label for s in bench.train]
    assert val_y.tolist() == [s.label for s in bench.val]
    assert [s.path for s in bench.val] != [s.path for s in bench.tests["photo"]]
    expected_x, _ = image_features(
        exp.bundle.model, eval_loader(ImageDataset(bench.val, exp.bundle.eval_transform), 64, 0)
    )
    assert val_x.shape == (9, 32)
    atol = tf32_atol(1e-6)  # the run's evaluation batches differ from these: TF32 on a GPU
    assert torch.allclose(torch.from_numpy(val_x), torch.from_numpy(expected_x), atol=atol)
    probe = json.loads((tmp_path / "r" / "probe.json").read_text())
    by_c = probe["val_accuracy_by_C"]
    assert probe["chosen_C"] == float(max(by_c, key=lambda c: (by_c[c], -float(c))))


# --- L2-SP -----------------------------------------------------------------------------------


def test_l2sp_anchor_stays_at_the_pretrained_weights(fake_pacs, tmp_path, monkeypatch):
    from flyp.methods import l2sp_penalty

    contexts = []
    real = flyp.train.loss_context

    def keep(exp):
        contexts.append(real(exp))
        return contexts[-1]

    monkeypatch.setattr(flyp.train, "loss_context", keep)
    exp = prepare(recipe(fake_pacs, "train.method=l2sp", "train.select_on=last"))
    finetune(exp.recipe, tmp_path / "r", exp=exp)
    (ctx,) = contexts
    pretrained = load_model("tiny").model
    image_names = {n for n in image_tower_names(pretrained, 32)}
    assert set(ctx.theta0) == image_names  # the trainable weights: the image tower
    for name in image_names:
        torch.testing.assert_close(
            ctx.theta0[name].cpu(), pretrained.get_parameter(name).detach(), rtol=0, atol=0,
            msg=name,
        )  # fmt: skip
    moved = l2sp_penalty(exp.bundle.model, ctx.theta0).item()
    expected = sum(
        (exp.bundle.model.get_parameter(n).detach().cpu() - pretrained.get_parameter(n).detach())
        .pow(2)
        .sum()
        .item()
        for n in image_names
    )
    assert moved == pytest.approx(expected, rel=1e-5) and expected > 1e-6


# --- captions --------------------------------------------------------------------------------


def test_captions_use_every_template_and_the_class_name():
    templates = ["a photo of a {}.", "a sketch of the {}.", "{} in a painting.", "{}"]
    classes = ["dog", "horse", "house"]
    ctx = LossContext(WordHashTokenizer(), classes, templates)
    labels = torch.arange(200) % 3
    seeds = torch.randint(0, 2**62, (200,), generator=torch.Generator().manual_seed(1))
    captions = captions_for(labels, seeds, ctx)
    used = set()
    for label, caption in zip(labels.tolist(), captions, strict=True):
        name = classes[label]
        options = [t for t in templates if t.format(name) == caption]
        assert len(options) == 1, caption  # one template, filled with this sample's class
        used.add(options[0])
    assert used == set(templates)
    # the template follows the seed: the same seeds give the same captions
    assert captions_for(labels, seeds, ctx) == captions


def test_training_captions_use_every_template(fake_pacs, tmp_path, monkeypatch):
    """The loader's per-sample seeds reach the captions: 54 captions over 7 templates."""
    captions: list[str] = []
    real = flyp.gradcache.caption_ids
    classes = ("dog", "horse", "house")

    def spy(labels, seeds, ctx):
        ids = real(labels, seeds, ctx)
        # row label * T + template of the caption table (T = 7 templates here)
        captions.extend(PACS[i % len(PACS)].format(classes[i // len(PACS)]) for i in ids.tolist())
        assert ids.tolist() == [y * len(PACS) + s % len(PACS)
                                for y, s in zip(labels.tolist(), seeds.tolist(), strict=True)]  # fmt: skip
        return ids

    monkeypatch.setattr(flyp.gradcache, "caption_ids", spy)
    finetune(recipe(fake_pacs, "data.templates=pacs", "train.select_on=last"), tmp_path / "r")
    assert len(captions) == 54
    used = {t for t in PACS for c in captions for n in classes if t.format(n) == c}
    assert used == set(PACS)


# --- data split --------------------------------------------------------------------------------


def test_split_seed_changes_the_split(fake_pacs):
    def split(seed: int):
        cfg = recipe(fake_pacs, f"data.split_seed={seed}").data
        bench = build_benchmark(cfg)
        return [[s.path for s in part] for part in (bench.train, bench.val, bench.tests["photo"])]

    first = split(0)
    assert split(0) == first
    other = split(1)
    for a, b in zip(first, other, strict=True):
        assert a != b and len(a) == len(b)
    assert sorted(sum(first, [])) == sorted(sum(other, []))  # the same images, split otherwise


# --- precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_precision_reaches_the_towers(precision, dtype, fake_pacs, tmp_path):
    exp = prepare(recipe(fake_pacs, f"train.precision={precision}", "train.stop_after_steps=2"))
    model = exp.bundle.model
    real = model.encode_image
    dtypes = []

    def recorded(images):
        out = real(images)
        if model.training:
            dtypes.append(out.dtype)
        return out

    model.encode_image = recorded
    finetune(exp.recipe, tmp_path / "r", exp=exp)
    assert dtypes == [dtype, dtype]


# --- which towers train ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["flyp", "flyp-image-only"])
def test_flyp_trains_both_towers_and_image_only_one(method, fake_pacs, tmp_path):
    finetune(recipe(fake_pacs, f"train.method={method}", "train.stop_after_steps=1"),
             tmp_path / "r")  # fmt: skip
    after = checkpoint_weights(tmp_path / "r")
    before = load_model("tiny").model.state_dict()
    changed = {k for k in TINY_MATRICES | TINY_VECTORS | {"model.logit_scale"}
               if not torch.equal(after[k], before[k.removeprefix("model.")])}  # fmt: skip
    text = {"model.token_embedding.weight", "model.text_projection.weight",
            "model.text_projection.bias"}  # fmt: skip
    if method == "flyp":
        assert changed == TINY_MATRICES | TINY_VECTORS | {"model.logit_scale"}
    else:
        assert changed == (TINY_MATRICES | TINY_VECTORS | {"model.logit_scale"}) - text


@pytest.mark.parametrize("extra", [(), ("train.micro_batch=2",), ("train.unique_captions=false",)])
def test_a_training_step_never_calls_the_tokenizer(extra, fake_pacs, tmp_path, monkeypatch):
    """Every (class, template) caption is tokenized once, before the first step, into a table
    the steps index; the table's rows are the tokenizer's own tokens of each caption."""
    import flyp.train as train_mod
    from flyp.data.templates import PACS as templates
    from flyp.models import tiny

    calls = {"in steps": 0, "texts": []}
    in_step = {"now": False}
    real_call, real_step = tiny.WordHashTokenizer.__call__, train_mod.forward_backward

    def counted(self, texts):
        calls["in steps"] += in_step["now"]
        calls["texts"].append(list(texts))
        return real_call(self, texts)

    def step(*args, **kwargs):
        in_step["now"] = True
        try:
            return real_step(*args, **kwargs)
        finally:
            in_step["now"] = False

    monkeypatch.setattr(tiny.WordHashTokenizer, "__call__", counted)
    monkeypatch.setattr(train_mod, "forward_backward", step)
    finetune(recipe(fake_pacs, "data.templates=pacs", "train.epochs=1", *extra), tmp_path / "r")
    assert calls["in steps"] == 0
    table = [t.format(c) for c in ("dog", "horse", "house") for t in templates]
    assert table in calls["texts"]  # tokenized once, as one table
