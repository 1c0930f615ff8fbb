import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from flyp.methods import (
    METHODS,
    LossContext,
    build_classifier,
    compute_loss,
    frozen_reference,
    lipsum_penalty,
    random_texts,
)
from flyp.models import load_model
from flyp.recipe import RecipeError
from flyp.train import finetune
from test_train import losses, tiny_recipe


def test_penalty_and_its_gradient_for_a_linear_image_tower_by_hand():
    """φ(x) = W x with W0 = I, x = (1, 2), W − W0 = diag(0.5, −1), texts e1 and e2, scale 2:
    the score differences are 2·(0.5, −2), so R = 4·(0.25 + 4) / (2·2) = 4.25 and
    dR/dW = (s²/M) Σ_m d_m t_m xᵀ = 2·(0.5·e1 − 2·e2) xᵀ = [[1, 2], [−4, −8]]."""
    x = torch.tensor([[1.0, 2.0]])
    w0 = torch.eye(2)
    texts = torch.eye(2)
    w = w0.clone().requires_grad_()
    assert lipsum_penalty(x @ w.t(), x @ w0.t(), texts, 2.0).item() == 0.0
    with torch.no_grad():
        w += torch.tensor([[0.5, 0.0], [0.0, -1.0]])
    penalty = lipsum_penalty(x @ w.t(), x @ w0.t(), texts, 2.0)
    assert penalty.item() == pytest.approx(4.25)
    penalty.backward()
    assert torch.allclose(w.grad, torch.tensor([[1.0, 2.0], [-4.0, -8.0]]))
    # a batch of two is the mean over samples: the same sample twice changes nothing
    twice = lipsum_penalty(torch.cat([x, x]) @ w.t(), torch.cat([x, x]) @ w0.t(), texts, 2.0)
    assert twice.item() == pytest.approx(4.25)


def test_random_texts_follow_seed_and_step():
    texts = random_texts(80, seed=3, step=7)
    assert len(texts) == 80 and texts == random_texts(80, seed=3, step=7)
    assert texts != random_texts(80, seed=3, step=8)
    assert texts != random_texts(80, seed=4, step=7)
    for text in texts:
        words = text.split(" ")
        assert 1 <= len(words) <= 8
        assert all(2 <= len(w) <= 8 and w.isalpha() and w.islower() for w in words)
    # the global stream (dropout, augmentation) is left alone
    state = torch.get_rng_state()
    random_texts(5, 0, 0)
    assert torch.equal(state, torch.get_rng_state())


def _tiny_setup(weight: float = 1.0, texts: int = 80):
    bundle = load_model("tiny")
    model = bundle.model
    ctx = LossContext(bundle.tokenizer, ["dog", "horse", "house"], ["a photo of a {}."])
    ctx.reference, ctx.lipsum_weight, ctx.lipsum_texts, ctx.seed = (
        frozen_reference(model),
        weight,
        texts,
        5,
    )
    classifier = build_classifier(METHODS["lipsum-ft"], model, ctx)
    classifier.eval()  # BatchNorm on running statistics, as train.batchnorm=frozen
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 1])
    return classifier, ctx, images, labels


def test_loss_is_cross_entropy_at_init_and_adds_the_penalty_after_a_change():
    classifier, ctx, images, labels = _tiny_setup(weight=0.5, texts=6)
    seeds = torch.zeros(4, dtype=torch.long)
    ce = F.cross_entropy(classifier(images), labels)
    at_init = compute_loss(METHODS["lipsum-ft"], classifier, images, labels, seeds, 2, ctx)
    assert at_init.item() == ce.item()  # the regulariser is exactly zero: model = reference

    with torch.no_grad():
        classifier.model.visual[-1].bias += 0.3
    ce = F.cross_entropy(classifier(images), labels)
    loss = compute_loss(METHODS["lipsum-ft"], classifier, images, labels, seeds, 2, ctx)
    # by hand: v_m = e^{log scale} ⟨t_m/|t_m|, f/|f|⟩ with the step's 6 texts
    model, ref = classifier.model, ctx.reference
    with torch.no_grad():
        # The step's 6 texts, written out rather than taken from flyp's own random_token_ids:
        # 8 ids each, uniform over the tiny tokenizer's ordinary ids 1..999 (0 is its padding,
        # its only special id), drawn from the texts' own stream for (seed 5, step 2); the tiny
        # tokenizer frames no caption (no start or end token), so a text is just its 8 ids.
        stream = torch.Generator().manual_seed(5 * 1_000_003 + 2)
        tokens = (torch.randint(999, (6 * 8,), generator=stream) + 1).view(6, 8)
        assert ctx.tokenizer([" ".join(["x"] * 8)]).shape == (1, 8)  # no framing tokens
        t = F.normalize(ref.encode_text(tokens), dim=-1)
        f = F.normalize(model.encode_image(images), dim=-1)
        f0 = F.normalize(ref.encode_image(images), dim=-1)
        scale = ref.logit_scale.exp()
        by_hand = 0.0
        for b in range(4):
            for m in range(6):
                by_hand += float(scale * (t[m] @ f[b]) - scale * (t[m] @ f0[b])) ** 2 / (2 * 6)
        by_hand /= 4
    assert by_hand > 1e-3  # the shift moved the features: the check below is not 0 == 0
    assert (loss - ce).item() == pytest.approx(0.5 * by_hand, rel=1e-4)


def test_text_tower_and_reference_stay_frozen():
    classifier, ctx, images, labels = _tiny_setup()
    assert all(not p.requires_grad for p in ctx.reference.parameters())
    assert not ctx.reference.training
    classifier.model.requires_grad_(True)
    with torch.no_grad():
        classifier.model.visual[-1].bias += 0.3
    seeds = torch.zeros(4, dtype=torch.long)
    compute_loss(METHODS["lipsum-ft"], classifier, images, labels, seeds, 0, ctx).backward()
    assert classifier.model.token_embedding.weight.grad is None  # texts under no_grad
    assert all(p.grad is None for p in ctx.reference.parameters())
    assert classifier.model.visual[-1].bias.grad is not None


def test_recipe_keys_are_checked(fake_pacs):
    assert tiny_recipe(fake_pacs).train.lipsum_weight == 1.0
    assert tiny_recipe(fake_pacs).train.lipsum_texts == 80
    with pytest.raises(RecipeError, match="train.lipsum_texts"):
        tiny_recipe(fake_pacs, "train.lipsum_texts=0")
    with pytest.raises(RecipeError, match="train.lipsum_weight"):
        tiny_recipe(fake_pacs, "train.lipsum_weight=-1")


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


@pytest.mark.slow
def test_end_to_end_against_ft(fake_pacs, tmp_path):
    """Weight 0 is ft to the bit (the regulariser path still runs); weight 1 starts with ft's
    loss (zero regulariser at the pretrained weights) and then moves elsewhere."""
    common = ("train.epochs=1", "train.select_on=last")
    finetune(tiny_recipe(fake_pacs, "train.method=ft", *common), tmp_path / "ft")
    finetune(
        tiny_recipe(fake_pacs, "train.method=lipsum-ft", "train.lipsum_weight=0", *common),
        tmp_path / "zero",
    )
    finetune(tiny_recipe(fake_pacs, "train.method=lipsum-ft", *common), tmp_path / "one")
    ft, zero, one = (_weights(tmp_path / d) for d in ("ft", "zero", "one"))
    assert ft.keys() == zero.keys() == one.keys()
    for key in ft:
        assert torch.equal(ft[key], zero[key]), key
    assert losses(tmp_path / "zero") == losses(tmp_path / "ft")
    assert losses(tmp_path / "one")[0] == losses(tmp_path / "ft")[0]
    assert losses(tmp_path / "one")[1:] != losses(tmp_path / "ft")[1:]
    assert not torch.equal(ft["model.visual.8.weight"], one["model.visual.8.weight"])


@pytest.mark.slow
def test_resume_equals_uninterrupted(fake_pacs, tmp_path):
    args = ("train.method=lipsum-ft", "train.select_on=last", "train.epochs=2")
    recipe = tiny_recipe(fake_pacs, *args)
    finetune(recipe, tmp_path / "full")
    stopped = finetune(
        tiny_recipe(fake_pacs, *args, "train.stop_after_steps=4"), tmp_path / "resumed"
    )
    assert stopped == {"stopped_at_step": 4}
    finetune(recipe, tmp_path / "resumed", resume=True)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "resumed")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    assert losses(tmp_path / "full") == losses(tmp_path / "resumed")
    log = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == list(
        range(1, len(losses(tmp_path / "full")) + 1)
    )


def test_micro_batches_give_the_full_batch_gradients():
    """The chunks share the step's texts (cached once a step) and each adds its batch share."""
    from flyp.gradcache import forward_backward

    grads = []
    for micro in (None, 2):
        classifier, ctx, images, labels = _tiny_setup(texts=6)
        with torch.no_grad():
            classifier.model.visual[-1].bias += 0.3
        seeds = torch.zeros(4, dtype=torch.long)
        forward_backward(
            METHODS["lipsum-ft"], classifier, images, labels, seeds, 1, ctx, micro_batch=micro
        )
        grads.append(classifier.model.visual[-1].weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
