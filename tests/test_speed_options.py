
"""Speed options: trimmed open_clip text context, bf16, micro-batches, compile, recipe checks."""

from __future__ import annotations

import json
import re

import pytest
import torch

from fakes import checkpoint_weights, tiny_overrides
from flyp.models import load_model
from flyp.models.openclip import TrimmedTokenizer, trim_text_context
from flyp.recipe import RecipeError, load_recipe
from flyp.train import RunError, finetune

TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
CAPTIONS = ["a photo of a dog.", "a sketch of a very big house with a red door.", "horse"]


def test_trimmed_open_clip_text_gives_the_full_context_features(tmp_path):
    config = tmp_path / "flyp-speed-vit.json"
    config.write_text(json.dumps(TINY_VIT))
    full = load_model(f"open_clip:{config}", context_length=77)  # open_clip as it comes
    assert not isinstance(full.tokenizer, TrimmedTokenizer)
    full.model.eval()
    tokens = full.tokenizer(CAPTIONS)
    with torch.no_grad():
        expected = full.model.encode_text(tokens)
        tokenizer = trim_text_context(full.model, full.tokenizer)
        short = tokenizer(CAPTIONS)
        assert tokens.shape[1] == 77 and short.shape[1] < 20
        torch.testing.assert_close(full.model.encode_text(short), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(full.model.encode_text(tokens), expected, rtol=1e-5, atol=1e-5)
    # the default load trims, and gradients flow into the (sliced) positional embedding
    trimmed = load_model(f"open_clip:{config}")
    assert isinstance(trimmed.tokenizer, TrimmedTokenizer)
    trimmed.model.encode_text(trimmed.tokenizer(CAPTIONS)).sum().backward()
    assert trimmed.model.positional_embedding.grad[:5].abs().sum() > 0


def tiny(root, *extra):
    return load_recipe(
        None,
        tiny_overrides(
            root,
            "data.ood_domains=[art]",
            "train.epochs=1",
            "train.lr=3e-2",
            "train.stop_after_steps=1",
            *extra,
        ),
    )


def test_micro_batch_run_takes_the_full_batch_step(fake_pacs, tmp_path):
    finetune(tiny(fake_pacs), tmp_path / "full")
    finetune(tiny(fake_pacs, "train.micro_batch=2"), tmp_path / "cached")
    a = checkpoint_weights(tmp_path / "full")
    b = checkpoint_weights(tmp_path / "cached")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5, msg=key)


def test_bf16_and_compile_runs_train(fake_pacs, tmp_path, monkeypatch):
    compiled = []
    original = torch.compile

    def eager_compile(fn, **kwargs):  # inductor's C++ build is too slow for a unit test
        compiled.append(fn.__name__)
        return original(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    finetune(tiny(fake_pacs, "train.precision=bf16", "train.compile=true"), tmp_path / "run")
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and 0 < log[0]["loss"] < 10
    assert compiled == ["encode_image", "encode_text"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.precision=fp16", "train.precision: 'fp16' is not one of auto, fp32, bf16"),
        ("train.micro_batch=0", "train.micro_batch: 0 is out of range; it must be >= 1"),
    ],
)
def test_bad_speed_values_are_refused_with_the_recipe(override, message, fake_pacs):
    with pytest.raises(RecipeError, match=re.escape(message)):
        tiny(fake_pacs, override)


def test_micro_batches_with_training_batchnorm_are_refused(fake_pacs, tmp_path):
    with pytest.raises(RunError, match="use train.batchnorm=frozen"):
        finetune(tiny(fake_pacs, "train.batchnorm=train", "train.micro_batch=2"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
