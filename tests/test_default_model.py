"""The default offline model: loads without a network, has the CLIP interface, trains end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flyp.models.default import MiniLMTokenizer, load_default

IMAGENET_ELEPHANTS = {101, 385, 386}  # tusker, Indian elephant, African bush elephant


@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    return load_default()


def test_bundle_fields(bundle):
    assert bundle.spec == "default" and bundle.loss == "clip" and bundle.image_size == 224
    assert load_default.__defaults__ == (None, None)
    assert isinstance(bundle.model.logit_scale, torch.nn.Parameter)
    assert 5 < bundle.model.logit_scale.exp().item() < 20


def test_encoders_shapes_and_finite(bundle):
    model = bundle.model.eval()
    with torch.no_grad():
        images = model.encode_image(torch.randn(2, 3, 64, 64))
        texts = model.encode_text(bundle.tokenizer(["a photo of a dog.", "a horse"]))
    assert images.shape == texts.shape == (2, 384)
    assert torch.isfinite(images).all() and torch.isfinite(texts).all()


def test_tokenizer_pads_with_zero_and_trims(bundle):
    tokens = bundle.tokenizer(["a dog", "a photo of a very large elephant."])
    assert tokens.dtype == torch.long
    assert (tokens[1] != 0).all()  # the longest caption fills the width exactly
    assert (tokens[0, -1] == 0) and (tokens[0] != 0).sum() < tokens.shape[1]
    assert bundle.tokenizer(["a dog"]).shape[1] < tokens.shape[1]
    short = MiniLMTokenizer(bundle.tokenizer.tokenizer.name_or_path, context_length=4)
    assert short(["a photo of a very large elephant."]).shape == (1, 4)


def test_gradients_reach_both_towers_and_bridge(bundle):
    model = bundle.model.eval()  # BatchNorm statistics frozen, as when finetuning
    model.zero_grad(set_to_none=True)
    images = model.encode_image(torch.randn(2, 3, 64, 64))
    texts = model.encode_text(bundle.tokenizer(["a photo of a dog.", "a photo of a guitar."]))
    logits = model.logit_scale.exp() * F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).t()
    target = torch.arange(2)
    ((F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2).backward()
    for name in (
        "visual.conv_stem.weight",
        "visual.classifier.weight",
        "text.embeddings.word_embeddings.weight",
        "text.encoder.layer.0.attention.self.query.weight",
        "bridge",
        "logit_scale",
    ):
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


def test_image_tower_recognises_an_elephant(bundle, pacs_root):
    from PIL import Image

    photo = pacs_root / "photo" / "elephant" / "064_0004.jpg"
    image = bundle.eval_transform(Image.open(photo).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        top1 = bundle.model.eval().visual(image).argmax(-1).item()
    assert top1 in IMAGENET_ELEPHANTS
