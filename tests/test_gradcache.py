"""The gradient cache gives the full batch's gradients while holding one chunk of activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flyp.gradcache import chunks, forward_backward, spread
from flyp.methods import (
    Classifier,
    LossContext,
    captions_for,
    contrastive_loss,
    get_method,
)
from flyp.models.tiny import TinyCLIP, WordHashTokenizer

CLASSES = ["dog", "horse", "house"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "{}"]


def context(collisions: str = "none") -> LossContext:
    return LossContext(WordHashTokenizer(), CLASSES, TEMPLATES, collisions=collisions)


class DropoutCLIP(TinyCLIP):
    """TinyCLIP with dropout in both towers: the cache must replay the same masks."""

    def encode_image(self, images):
        return F.dropout(super().encode_image(images), 0.3, self.training)

    def encode_text(self, tokens):
        return F.dropout(super().encode_text(tokens), 0.3, self.training)


def batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 16, 16, generator=g)
    labels = torch.randint(0, len(CLASSES), (n,), generator=g)
    seeds = torch.randint(0, 1000, (n,), generator=g)
    return images, labels, seeds


def grads_of(classifier, method_name, micro_batch, ctx, precision="fp32"):
    classifier.zero_grad(set_to_none=True)
    images, labels, seeds = batch()
    loss = forward_backward(
        get_method(method_name), classifier, images, labels, seeds, 0, ctx,
        micro_batch=micro_batch, precision=precision,
    )  # fmt: skip
    return loss, {n: p.grad.clone() for n, p in classifier.named_parameters() if p.grad is not None}


def frozen_bn_classifier(model_cls=TinyCLIP) -> Classifier:
    torch.manual_seed(0)
    classifier = Classifier(model_cls())
    classifier.train()
    for m in classifier.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    return classifier


@pytest.mark.parametrize("collisions", ["none", "soft"])
@pytest.mark.parametrize("micro_batch", [1, 3])
def test_gradient_cache_equals_full_batch(collisions, micro_batch):
    classifier = frozen_bn_classifier()
    full_loss, full = grads_of(classifier, "flyp", None, context(collisions))
    loss, cached = grads_of(classifier, "flyp", micro_batch, context(collisions))
    assert torch.allclose(loss, full_loss, atol=1e-6)
    assert full.keys() == cached.keys() and "model.logit_scale" in full
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_gradient_cache_replays_dropout_masks():
    """Reference: the same chunks, forwarded once with gradients, from the same RNG state:
    chunk i is the i-th part of the images, then the i-th part of the batch's distinct
    captions (each encoded once, its features repeated for every sample it captions)."""
    classifier = frozen_bn_classifier(DropoutCLIP)
    ctx = context()
    images, labels, seeds = batch()
    torch.manual_seed(123)
    model = classifier.model
    captions = captions_for(labels, seeds, ctx)
    # encoded in the order of the caption table: by class, then by template
    rows = zip(captions, labels.tolist(), seeds.tolist(), strict=True)
    keys = {c: (y, s % len(TEMPLATES)) for c, y, s in rows}
    distinct = sorted(keys, key=keys.get)
    tokens = ctx.tokenizer(distinct)
    parts = chunks(len(labels), 3)
    text_parts = spread(len(distinct), len(parts))
    assert len(distinct) < len(labels) and len(parts) == 3
    images_out, texts_out = [], []
    for image_part, text_part in zip(parts, text_parts, strict=True):
        images_out.append(model.encode_image(images[image_part]))
        if text_part.stop > text_part.start:
            texts_out.append(model.encode_text(tokens[text_part]))
    text = torch.cat(texts_out)[torch.tensor([distinct.index(c) for c in captions])]
    reference = contrastive_loss(torch.cat(images_out), text, model, labels, ctx)
    reference.backward()
    expected = {n: p.grad.clone() for n, p in classifier.named_parameters()}
    rng_after = torch.get_rng_state()

    torch.manual_seed(123)
    loss, cached = grads_of(classifier, "flyp", 3, ctx)
    assert torch.allclose(loss, reference.detach(), atol=1e-6)
    for name in expected:
        torch.testing.assert_close(cached[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(torch.get_rng_state(), rng_after)  # the run continues as without the cache


def test_cross_entropy_micro_batches_accumulate_to_the_full_batch():
    classifier = frozen_bn_classifier()
    classifier.head = torch.nn.Linear(32, len(CLASSES))
    full_loss, full = grads_of(classifier, "ft", None, context())
    loss, parts = grads_of(classifier, "ft", 3, context())
    assert torch.allclose(loss, full_loss, atol=1e-6)
    for name in full:
        torch.testing.assert_close(parts[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_frozen_text_tower_gets_no_gradient_through_the_cache():
    classifier = frozen_bn_classifier()
    for name, p in classifier.model.named_parameters():
        p.requires_grad_(name.startswith("visual.") or name == "logit_scale")
    _, full = grads_of(classifier, "flyp-image-only", None, context())
    _, cached = grads_of(classifier, "flyp-image-only", 2, context())
    assert full.keys() == cached.keys() and not any("text" in n for n in cached)
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_stays_close_to_fp32():
    classifier = frozen_bn_classifier()
    loss32, _ = grads_of(classifier, "flyp", None, context())
    loss16, grads16 = grads_of(classifier, "flyp", 4, context(), precision="bf16")
    assert abs(loss16.item() - loss32.item()) < 0.05
    assert all(g.dtype == torch.float32 for g in grads16.values())


def test_each_distinct_caption_is_encoded_once_with_the_same_gradients():
    classifier = frozen_bn_classifier()
    classifier.eval()  # no dropout: sharing the encoding changes nothing but the work
    rows = []
    original = classifier.model.encode_text
    classifier.model.encode_text = lambda tokens: rows.append(len(tokens)) or original(tokens)
    every = context()
    every.unique_captions = False
    loss_all, grads_all = grads_of(classifier, "flyp", None, every)
    loss, grads = grads_of(classifier, "flyp", None, context())
    images, labels, seeds = batch()
    distinct = len(set(captions_for(labels, seeds, context())))
    assert distinct < len(labels)
    assert rows == [len(labels), distinct]
    torch.testing.assert_close(loss, loss_all, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_all.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_all[name], rtol=1e-5, atol=1e-6, msg=name)
