
"""Behaviours that a planted bug could change without any other test noticing.

Each test here was written against a mutant of benchmarks/mutation_check.py that survived the
rest of the suite, and seen to fail with that mutant in place. Values are worked out by hand
(or follow from a property that holds exactly); end-to-end checks use the tiny model on the
fake image folders of tests/fakes.py and stop after a few steps.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import flyp.train
from fakes import checkpoint_weights, leave_process_group
from flyp.checkpoint import load_state, save_weights
from flyp.compare import wise_sweep, zeroshot_classifier
from flyp.data.folders import Sample
from flyp.data.loader import EpochSampler, ImageDataset
from flyp.data.splits import stratified_split, stratified_subsample
from flyp.distributed import average_gradients, gather_batch
from flyp.ensemble import greedy_soup, interpolate
from flyp.evaluate import metrics_from_predictions, restrict, summarise
from flyp.losses import siglip_loss, soft_cross_entropy
from flyp.methods import (
    METHODS,
    Classifier,
    LossContext,
    build_classifier,
    captions_for,
    compute_loss,
    contrastive_loss,
    image_tower_names,
    set_trainable,
    text_tower_names,
)
from flyp.models import load_model
from flyp.models.tiny import TinyCLIP, WordHashTokenizer
from flyp.probe import choose_c, image_features, probe_to_linear
from flyp.recipe import TrainConfig
from flyp.train import finetune, param_groups, prepare
from test_train import tiny_recipe

CLASSES = ["dog", "horse", "house"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "{}"]
SCALE = 1 / 0.07  # TinyCLIP's initial exp(logit_scale)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def tiny_batch(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    labels = torch.tensor([i % len(CLASSES) for i in range(n)])
    return images, labels, torch.arange(n)


def eval_model() -> TinyCLIP:
    torch.manual_seed(0)
    return TinyCLIP().eval()


def log_lines(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]


def step_lines(run_dir) -> list[dict]:
    return [x for x in log_lines(run_dir) if "loss" in x]


# --- losses and heads --------------------------------------------------------------------------


def test_soft_cross_entropy_normalises_each_row_hand_computed():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    row0 = lse(0.0, 1.0) - 0.0
    row1 = 0.5 * (lse(2.0, 0.0) - 2.0) + 0.5 * (lse(2.0, 0.0) - 0.0)
    assert math.isclose(soft_cross_entropy(logits, target).item(), (row0 + row1) / 2, rel_tol=1e-6)


def test_siglip_collisions_hand_computed():
    # test_losses' features, scale 2, bias -1; both captions are of the images' class
    img, txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    same = torch.tensor([0, 0])

    def ls(x: float) -> float:  # log sigmoid
        return -math.log1p(math.exp(-x))

    # logits [[0.2, -1.0], [0.6, 1.0]]; the diagonal is positive
    cases = {
        "none": -(ls(0.2) + ls(1.0) + ls(1.0) + ls(-0.6)) / 2,  # off-diagonal: negatives
        "soft": -(ls(0.2) + ls(1.0) + ls(-1.0) + ls(0.6)) / 2,  # off-diagonal: positives
        "mask": -(ls(0.2) + ls(1.0)) / 2,  # off-diagonal: left out
    }
    for collisions, expected in cases.items():
        loss = siglip_loss(img, txt, 2.0, -1.0, same, collisions)
        assert math.isclose(loss.item(), expected, rel_tol=1e-6), collisions


class ScaleOnly(nn.Module):
    def __init__(self, log_scale: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(log_scale))


def test_contrastive_loss_normalises_features_and_exponentiates_the_scale():
    # test_losses' unit features, given unnormalised, and a log-scale of log(2)
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]]) * 3
    txt = torch.tensor([[0.6, 0.8], [0.0, 1.0]]) * 0.5
    ctx = LossContext(WordHashTokenizer(), CLASSES, TEMPLATES)
    loss = contrastive_loss(img, txt, ScaleOnly(math.log(2.0)), torch.tensor([0, 1]), ctx)
    i2t = (lse(1.2, 0.0) - 1.2) + (lse(1.6, 2.0) - 2.0)
    t2i = (lse(1.2, 1.6) - 1.2) + (lse(0.0, 2.0) - 2.0)
    assert math.isclose(loss.item(), (i2t / 2 + t2i / 2) / 2, rel_tol=1e-6)


def test_zero_shot_logits_are_the_temperature_scaled_cosines():
    model = eval_model()
    classifier = Classifier(model)
    classifier.text_head = F.normalize(torch.randn(3, 32), dim=-1)
    images, _, _ = tiny_batch(4)
    with torch.no_grad():
        cosines = F.normalize(model.encode_image(images), dim=-1) @ classifier.text_head.t()
        torch.testing.assert_close(classifier(images), SCALE * cosines)


def test_linear_head_starts_as_the_zero_shot_head():
    model = eval_model()
    ctx = LossContext(WordHashTokenizer(), CLASSES, TEMPLATES)
    zeroshot = Classifier(model)
    zeroshot.refresh_text_head(ctx.tokenizer, CLASSES, TEMPLATES)
    head = build_classifier(METHODS["ft"], model, ctx)
    images, _, _ = tiny_batch(4)
    with torch.no_grad():
        torch.testing.assert_close(head(images), zeroshot(images), rtol=1e-5, atol=1e-5)
    assert torch.equal(head.head.bias, torch.zeros(3))


def test_l2sp_adds_its_weight_times_the_squared_distance_to_the_start():
    model = eval_model()
    ctx = LossContext(WordHashTokenizer(), CLASSES, TEMPLATES, l2sp_weight=0.25)
    classifier = build_classifier(METHODS["l2sp"], model, ctx).eval()
    ctx.theta0 = {n: p.detach() + 0.1 for n, p in model.named_parameters()}  # 0.1 off everywhere
    images, labels, seeds = tiny_batch()
    with torch.no_grad():
        ce = compute_loss(METHODS["ft"], classifier, images, labels, seeds, 0, ctx)
        total = compute_loss(METHODS["l2sp"], classifier, images, labels, seeds, 0, ctx)
    count = sum(p.numel() for p in model.parameters())
    assert math.isclose(total.item() - ce.item(), 0.25 * 0.01 * count, rel_tol=1e-4)


def test_ce_both_is_cross_entropy_of_scaled_cosines_with_class_prompts():
    model = eval_model()
    tokenizer = WordHashTokenizer()
    ctx = LossContext(tokenizer, CLASSES, ["a photo of a {}."])
    images, labels, seeds = tiny_batch()
    with torch.no_grad():
        loss = compute_loss(METHODS["ce-both"], Classifier(model), images, labels, seeds, 5, ctx)
        prompts = ["a photo of a dog.", "a photo of a horse.", "a photo of a house."]
        text = F.normalize(model.encode_text(tokenizer(prompts)), dim=-1)
        image = F.normalize(model.encode_image(images), dim=-1)
        expected = F.cross_entropy(SCALE * image @ text.t(), labels)
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)


class RecordingTokenizer(WordHashTokenizer):
    def __init__(self):
        super().__init__()
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return super().__call__(texts)


def test_ce_both_draws_its_class_prompts_afresh_each_step_and_reproducibly():
    tokenizer = RecordingTokenizer()
    ctx = LossContext(tokenizer, CLASSES, TEMPLATES)
    classifier = Classifier(eval_model())
    images, labels, seeds = tiny_batch()
    with torch.no_grad():
        for step in [*range(8), 3]:
            compute_loss(METHODS["ce-both"], classifier, images, labels, seeds, step, ctx)
    drawn = [tuple(c) for c in tokenizer.calls]
    assert drawn[8] == drawn[3]  # the same step draws the same prompts (resume replays them)
    assert len(set(drawn[:8])) >= 4  # 27 possible draws: eight steps do not repeat one


def test_caption_template_comes_from_each_samples_own_seed():
    ctx = LossContext(WordHashTokenizer(), ["dog", "horse"], ["a {}.", "art of {}.", "{} here."])
    captions = captions_for(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 1, 5, 4]), ctx)
    assert captions == ["a dog.", "art of dog.", "dog here.", "art of horse."]


def test_only_objectives_that_use_the_temperature_train_it():
    model = TinyCLIP()
    classifier = Classifier(model)
    names = image_tower_names(model, 32)
    uses_scale = {"flyp", "flyp-image-only", "flyp-mask", "flyp-soft", "ce-both"}
    for name, method in METHODS.items():
        set_trainable(method, classifier, names, text_tower_names(model, WordHashTokenizer()))
        assert model.logit_scale.requires_grad == (name in uses_scale), name


def test_optimizer_groups_decay_every_matrix_and_give_scale_and_bias_their_own_lr():
    model = TinyCLIP()
    model.logit_bias = nn.Parameter(torch.tensor(-10.0))  # a SigLIP-style learned bias
    classifier = Classifier(model, head=nn.Linear(32, 3))
    cfg = TrainConfig(lr=1e-3, weight_decay=0.2, logit_scale_lr=5e-2)
    groups = param_groups(classifier, cfg)
    for name, p in classifier.named_parameters():
        group = next(g for g in groups if any(q is p for q in g["params"]))
        if name in ("model.logit_scale", "model.logit_bias"):
            assert (group["weight_decay"], group["lr"]) == (0.0, 5e-2), name
        elif p.ndim >= 2:
            assert (group["weight_decay"], group.get("lr", cfg.lr)) == (0.2, 1e-3), name
        else:
            assert (group["weight_decay"], group.get("lr", cfg.lr)) == (0.0, 1e-3), name


# --- ensembling --------------------------------------------------------------------------------


def test_wise_interpolates_floats_and_takes_integer_buffers_from_the_finetuned_side():
    zs = {"w": torch.tensor([0.0, 4.0]), "count": torch.tensor(7)}
    ft = {"w": torch.tensor([2.0, 0.0]), "count": torch.tensor(11)}
    out = interpolate(zs, ft, 0.25)
    assert torch.equal(out["w"], torch.tensor([0.5, 3.0]))
    assert out["count"].dtype == torch.int64 and out["count"].item() == 11


def test_greedy_soup_keeps_a_model_that_leaves_the_score_unchanged():
    # validation accuracy as a plateau: any soup within 0.6 of 2 scores 1
    score = lambda s: 1.0 if abs(float(s["w"]) - 2.0) < 0.6 else 0.0  # noqa: E731
    states = [{"w": torch.tensor([x])} for x in (2.0, 2.5, 10.0)]
    soup, kept = greedy_soup(states, score)
    assert kept == [0, 1] and torch.equal(soup["w"], torch.tensor([2.25]))


def test_greedy_soup_compares_each_candidate_with_the_soup_so_far():
    # the soup of 1 and 3 scores 0; adding 4.5 gives 2.83 (score -0.83): better than the
    # first model alone (-1) but worse than the soup so far, so it is left out
    score = lambda s: -abs(float(s["w"]) - 2.0)  # noqa: E731
    states = [{"w": torch.tensor([x])} for x in (1.0, 3.0, 4.5)]
    soup, kept = greedy_soup(states, score)
    assert kept == [0, 1] and torch.equal(soup["w"], torch.tensor([2.0]))


def fake_sets(val: float, photo: float) -> dict:
    return {
        name: {"accuracy": v}
        for name, v in [("val", val), ("photo", photo), ("art", 0.1), ("sketch", 0.2)]
    }


def test_wise_alpha_is_chosen_on_validation_ties_nearest_the_middle(fake_pacs, tmp_path):
    exp = prepare(tiny_recipe(fake_pacs))
    pretrained = copy.deepcopy(exp.bundle.model.state_dict())
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_weights(Classifier(exp.bundle.model), run_dir / "model.safetensors")
    finetuned = fake_sets(0.4, 0.95)
    (run_dir / "metrics.json").write_text(
        json.dumps({"method": "flyp", "seed": 0, "sets": finetuned})
    )
    # val peaks at 0.5 and 0.75 (tie: 0.5 is nearer the middle); ID test would pick 1.0
    known = {
        a: fake_sets(v, p)
        for a, v, p in [(0.0, 0.2, 0.1), (0.25, 0.4, 0.3), (0.5, 0.7, 0.5), (0.75, 0.7, 0.9)]
    }
    result = wise_sweep(exp, run_dir, [0.0, 0.25, 0.5, 0.75, 1.0], pretrained, known=known)
    assert result["best_alpha"] == 0.5
    assert result["points"][-1]["sets"] == finetuned  # alpha 1 is the run itself, not re-evaluated
    assert [p["val"] for p in result["points"]] == [0.2, 0.4, 0.7, 0.7, 0.4]


def test_zero_shot_end_of_wise_is_the_pretrained_model_whatever_the_model_holds(fake_pacs):
    exp = prepare(tiny_recipe(fake_pacs))
    pretrained = copy.deepcopy(exp.bundle.model.state_dict())
    with torch.no_grad():
        for p in exp.bundle.model.parameters():
            p.add_(1.0)  # as after a finetuning run, which trains the shared model in place
    classifier = zeroshot_classifier(exp, "flyp", pretrained)
    state = classifier.model.state_dict()
    for key, value in pretrained.items():
        assert torch.equal(state[key], value), key


# --- probe -------------------------------------------------------------------------------------


def test_probe_c_ties_go_to_the_strongest_regularisation():
    x = np.array([[-5.0], [-4.0], [4.0], [5.0]] * 5)
    y = np.array([0, 0, 1, 1] * 5)
    probe, scores = choose_c(x, y, x, y, grid=(0.01, 1.0, 100.0))
    assert scores == {0.01: 1.0, 1.0: 1.0, 100.0: 1.0} and probe.C == 0.01


def test_binary_probe_maps_to_its_own_classes_and_never_predicts_an_absent_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 2))
    y = np.where(x[:, 0] + 0.5 * x[:, 1] > 0, 2, 1)  # classes 1 and 2 of 3; class 0 absent
    probe = LogisticRegression().fit(x, y)
    layer = probe_to_linear(probe, 3)
    with torch.no_grad():
        logits = layer(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(logits.softmax(1)[:, 1:].numpy(), probe.predict_proba(x), atol=1e-5)
    np.testing.assert_array_equal(logits.argmax(1).numpy(), probe.predict(x))


def test_probe_features_are_unit_vectors():
    images = torch.randn(5, 3, 32, 32)
    loader = DataLoader(TensorDataset(images, torch.arange(5), torch.full((5,), -1)), batch_size=2)
    feats, labels = image_features(TinyCLIP(), loader)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), np.ones(5), rtol=1e-5)
    np.testing.assert_array_equal(labels, np.arange(5))


# --- data --------------------------------------------------------------------------------------


def test_split_sizes_round_and_do_not_depend_on_input_order():
    samples = [Sample(f"{c}/{i:02d}", c) for c in range(2) for i in range(10)]
    rest, val = stratified_split(samples, [0.29], seed=0)
    assert [sum(s.label == k for s in val) for k in range(2)] == [3, 3]  # round(2.9)
    assert stratified_split(list(reversed(samples)), [0.29], seed=0) == [rest, val]
    with pytest.raises(ValueError, match="sum to less than 1"):
        stratified_split(samples, [0.5, 0.5], seed=0)


def test_subsample_keeps_at_least_one_sample_of_a_rare_class():
    samples = [Sample(f"a/{i:03d}", 0) for i in range(99)] + [Sample("b/000", 1)]
    sub = stratified_subsample(samples, 10, seed=0)
    # the cap is 10 in all: the rare class keeps one, taken from the class above its share 9.9
    assert [sum(s.label == k for s in sub) for k in range(2)] == [9, 1]


def test_a_sample_is_transformed_under_its_own_seed_without_touching_the_global_generator(tmp_path):
    Image.new("RGB", (4, 4), (10, 20, 30)).save(tmp_path / "a.png")
    dataset = ImageDataset(
        [Sample(str(tmp_path / "a.png"), 2)], transform=lambda image: torch.rand(3)
    )
    torch.manual_seed(999)
    before = torch.get_rng_state()
    out, label, seed = dataset[(0, 7)]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(7)
    assert torch.equal(out, torch.rand(3)) and (label, seed) == (2, 7)


def test_each_rank_resumes_mid_epoch_after_the_global_batches_done():
    # 20 samples, global batch 4 over 2 ranks: 5 steps; after 2 steps a rank has read 4 samples
    for rank in (0, 1):
        full = list(EpochSampler(20, 2, 3, 1, rank=rank, world=2))
        assert EpochSampler(20, 2, 3, 1, rank=rank, world=2).steps_per_epoch() == 5
        assert len(full) == 10
        assert list(EpochSampler(20, 2, 3, 1, start=2, rank=rank, world=2)) == full[4:]


# --- distributed -------------------------------------------------------------------------------


def _collectives_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        a, b, frozen = (
            nn.Parameter(torch.zeros(2)),
            nn.Parameter(torch.zeros(1, 2)),
            nn.Parameter(torch.zeros(1)),
        )
        a.grad = torch.tensor([1.0, 2.0]) * (rank + 1)  # rank 0: [1, 2], rank 1: [2, 4]
        b.grad = torch.full((1, 2), 10.0 * rank)  # rank 0: 0, rank 1: 10
        average_gradients([a, b, frozen], world)
        features = torch.full((1, 2), float(rank), requires_grad=True)
        images, texts, labels = gather_batch(features, features * 10, torch.tensor([rank + 5]))
        (images[:, 0] * torch.tensor([1.0, 2.0])).sum().backward()
        torch.save(
            {"a": a.grad, "b": b.grad, "frozen": frozen.grad, "images": images.detach(),
             "texts": texts.detach(), "labels": labels, "feature_grad": features.grad},
            f"{out_dir}/{rank}.pt",
        )  # fmt: skip
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_process_group()


@pytest.mark.slow
def test_gradients_average_over_ranks_and_gathered_rows_keep_rank_order_and_gradients(tmp_path):
    mp.spawn(
        _collectives_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True
    )
    for rank in (0, 1):
        out = torch.load(tmp_path / f"{rank}.pt")
        assert torch.equal(out["a"], torch.tensor([1.5, 3.0])) and torch.equal(
            out["b"], torch.full((1, 2), 5.0)
        )
        assert out["frozen"] is None
        assert torch.equal(out["images"], torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        assert torch.equal(out["texts"], torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        assert out["labels"].tolist() == [5, 6]
        # every rank takes the same loss; all_gather's backward sums them: world * dL/df_rank
        assert torch.equal(out["feature_grad"], torch.tensor([[2.0 * (rank + 1), 0.0]]))


# --- evaluation --------------------------------------------------------------------------------


def test_balanced_and_worst_class_accuracy_hand_computed():
    predictions = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    m = metrics_from_predictions(predictions, labels)
    # per class: 0 -> 2/3, 1 -> 1/2, 2 -> 2/3
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert m["worst_class_accuracy"] == pytest.approx(1 / 2)


def test_summary_uses_the_benchmark_metric_and_the_mean_over_ood_sets():
    values = {
        "val": (0.5, 0.4),
        "photo": (0.9, 0.8),
        "a": (0.1, 0.2),
        "b": (0.2, 0.3),
        "c": (0.6, 0.7),
    }
    sets = {k: {"accuracy": acc, "macro_f1": f1} for k, (acc, f1) in values.items()}
    s = summarise(sets, "photo", ["a", "b", "c"], "macro_f1")
    assert (s["id"], s["val"]) == (0.8, 0.4)
    assert s["ood_mean"] == pytest.approx((0.2 + 0.3 + 0.7) / 3)


def test_restricted_logits_never_pick_an_excluded_class():
    logits = torch.tensor([[-1.0, -2.0, -3.0]])  # every logit negative: 0 would beat them all
    out = restrict(logits, [1, 2])
    assert out.argmax(dim=1).tolist() == [1] and out[0, 0].item() == float("-inf")


# --- the training loop, end to end -------------------------------------------------------------


def test_first_step_moves_each_bias_by_the_warmup_lr_and_keeps_batchnorm_statistics(
    fake_pacs, tmp_path
):
    """AdamW's first step moves every parameter with a gradient by exactly lr_0 (m / sqrt(v) is
    the sign of the gradient); 1-D parameters have no weight decay. lr_0 = 3e-3 / 4 (warmup 4)."""
    extra = ["train.warmup_steps=4", "train.stop_after_steps=1", "eval.every_epoch=false"]
    finetune(tiny_recipe(fake_pacs, *extra), tmp_path / "run")
    after = checkpoint_weights(tmp_path / "run")
    before = load_model("tiny").model.state_dict()
    vectors = [k for k, v in before.items() if v.ndim == 1 and "running" not in k]
    assert len(vectors) == 8  # conv, BN and linear biases, BN weights
    for key in vectors:
        moved = (after[f"model.{key}"] - before[key]).abs().max().item()
        assert moved == pytest.approx(7.5e-4, rel=1e-3), key
    for key in ("visual.1.running_mean", "visual.1.running_var", "visual.4.running_mean"):
        assert torch.equal(after[f"model.{key}"], before[key]), key  # train.batchnorm=frozen


def test_gradients_are_clipped_from_the_first_step(fake_pacs, tmp_path):
    # a clip norm of 1e-12 leaves gradients far below AdamW's eps: the biases barely move
    extra = ["train.grad_clip=1e-12", "train.stop_after_steps=1", "eval.every_epoch=false"]
    finetune(tiny_recipe(fake_pacs, *extra), tmp_path / "run")
    after = checkpoint_weights(tmp_path / "run")
    before = load_model("tiny").model.state_dict()
    for key in ("visual.0.bias", "visual.8.bias", "text_projection.bias"):
        assert (after[f"model.{key}"] - before[key]).abs().max().item() < 1e-6, key


def test_logged_lr_and_epoch_follow_warmup_then_cosine_over_the_whole_run(fake_pacs, tmp_path):
    # 18 images, batch 6, 3 epochs: 9 steps; warmup 2; "lr" is the rate after the step
    finetune(
        tiny_recipe(fake_pacs, "train.select_on=last", "eval.every_epoch=false"), tmp_path / "run"
    )
    lines = step_lines(tmp_path / "run")
    assert [x["epoch"] for x in lines] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    factors = [1.0, 1.0, *(0.5 * (1 + math.cos(math.pi * k / 7)) for k in range(1, 8))]
    assert [x["lr"] for x in lines] == pytest.approx([3e-3 * f for f in factors], abs=1e-12)
    assert lines[-1]["lr"] == 0.0


def scripted_validation(monkeypatch, scores: list[float]) -> None:
    values = iter(scores)
    monkeypatch.setattr(flyp.train, "validation_score", lambda classifier, exp: next(values))


def test_selection_keeps_the_earliest_of_equally_good_epochs(fake_pacs, tmp_path, monkeypatch):
    scripted_validation(monkeypatch, [0.5, 0.5, 0.5])
    assert finetune(tiny_recipe(fake_pacs), tmp_path / "run")["selected_epoch"] == 1


def test_resume_restores_best_epoch_image_count_and_drops_later_log_lines(
    fake_pacs, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    scripted_validation(monkeypatch, [])
    assert finetune(tiny_recipe(fake_pacs, "train.stop_after_steps=2"), run) == {
        "stopped_at_step": 2
    }
    assert load_state(run / "state.pt")["images_seen"] == 12
    scripted_validation(monkeypatch, [0.9])  # epoch 1 is the best
    finetune(tiny_recipe(fake_pacs, "train.stop_after_steps=4"), run, resume=True)
    assert load_state(run / "state.pt")["images_seen"] == 24
    with open(run / "log.jsonl", "a") as f:  # written after the checkpoint by a killed process
        f.write(json.dumps({"step": 5, "epoch": 2, "loss": 99.0}) + "\n")
    scripted_validation(monkeypatch, [0.5, 0.5])
    metrics = finetune(tiny_recipe(fake_pacs), run, resume=True)
    assert metrics["selected_epoch"] == 1
    assert [x["step"] for x in step_lines(run)] == list(range(1, 10))
    assert 99.0 not in [x["loss"] for x in step_lines(run)]


def test_collision_methods_override_the_recipe_collisions(fake_pacs, tmp_path):
    """Same seed, same first batch (6 captions of 3 classes: some share a class). Masking
    same-class captions out of the denominators strictly lowers the loss. (flyp-soft would
    equal flyp here: the fake folders have one template, so same-class captions are identical.)"""
    first = {}
    for method in ("flyp", "flyp-mask"):
        extra = [f"train.method={method}", "train.stop_after_steps=1", "eval.every_epoch=false"]
        finetune(tiny_recipe(fake_pacs, *extra), tmp_path / method)
        first[method] = step_lines(tmp_path / method)[0]["loss"]
    assert first["flyp-mask"] < first["flyp"]


def test_init_logit_scale_sets_the_temperature(fake_pacs, tmp_path):
    finetune(
        tiny_recipe(fake_pacs, "train.method=zeroshot", "train.init_logit_scale=10"),
        tmp_path / "run",
    )
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert weights["model.logit_scale"].item() == pytest.approx(math.log(10.0))
