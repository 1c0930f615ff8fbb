"""Hugging Face CLIP / SigLIP folders through load_model("hf:..."), on tiny random models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fakes import make_tiny_hf
from flyp.models import ModelSpecError, load_model

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _tiny(kind: str, folder: Path) -> Path:
    return make_tiny_hf(kind, folder)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def bundle(request, tmp_path_factory):
    folder = _tiny(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, load_model(f"hf:{folder}")


def test_interface(bundle):
    kind, b = bundle
    model = b.model
    tokens = b.tokenizer(["a photo of a dog .", "the cat"])
    images = torch.randn(2, 3, b.image_size, b.image_size)
    assert model.encode_image(images).shape[0] == 2
    assert model.encode_text(tokens).shape == model.encode_image(images).shape
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    assert b.loss == ("siglip" if kind == "siglip" else "clip")
    if kind == "siglip":
        assert isinstance(model.logit_bias, torch.nn.Parameter)
        assert tokens.shape[1] == 12  # SigLIP pools the last position: always padded to length
    else:
        assert tokens.shape[1] == 6  # CLIP: padded to the longest caption
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-3)


def test_image_params_live_under_visual(bundle):
    _, b = bundle
    names = [n for n, _ in b.model.named_parameters()]
    assert all(n.startswith(("visual.", "text.", "logit_")) for n in names)
    patch = [n for n in names if "patch_embedding" in n]
    assert patch and all(n.startswith("visual.tower.") for n in patch)
    image_params = {id(p) for p in b.model.visual.parameters()}
    assert not image_params & {id(p) for p in b.model.text.parameters()}


def test_gradients_reach_both_towers(bundle):
    _, b = bundle
    images = torch.randn(2, 3, b.image_size, b.image_size)
    img = torch.nn.functional.normalize(b.model.encode_image(images), dim=-1)
    txt = torch.nn.functional.normalize(
        b.model.encode_text(b.tokenizer(["a dog", "a cat"])), dim=-1
    )
    labels = torch.arange(2)
    logits = b.model.logit_scale.exp() * img @ txt.t()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    for tower in (b.model.visual, b.model.text):
        grads = [p.grad for p in tower.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    assert b.model.logit_scale.grad is not None and b.model.logit_scale.grad != 0


def test_bad_folder(tmp_path):
    with pytest.raises(ModelSpecError, match="config.json"):
        load_model(f"hf:{tmp_path}")
    with pytest.raises(ModelSpecError, match="folder"):
        load_model("hf:")


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_flyp_steps_with_an_hf_model(kind, tmp_path):
    from fakes import make_domains
    from flyp.recipe import load_recipe
    from flyp.train import finetune

    folder = _tiny(kind, tmp_path / kind)
    root = make_domains(
        tmp_path / "data", ["photo", "sketch"], ["dog", "cat"], per_class=4, size=16
    )
    recipe = load_recipe(
        None,
        [
            f"model.spec=hf:{folder}",
            f"data.root={root}",
            "data.benchmark=folders",
            "data.id_domain=photo",
            "data.ood_domains=[sketch]",
            "train.batch_size=2",
            "train.stop_after_steps=2",
            "data.val_fraction=0.25",
            "data.test_fraction=0.25",
        ],
    )
    assert finetune(recipe, tmp_path / "run") == {"stopped_at_step": 2}


def _broken(kind: str, folder: Path) -> Path:
    """A CLIP folder broken one way: weights cut short, weights missing a tensor, weights of
    another size, or a config.json that is not JSON."""
    from safetensors.torch import load_file, save_file

    _tiny("clip", folder)
    weights = folder / "model.safetensors"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif kind == "missing_tensor":
        state = load_file(weights)
        state.pop("logit_scale")
        save_file(state, weights, metadata={"format": "pt"})
    elif kind == "other_size":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"projection_dim": 12}))
    else:
        (folder / "config.json").write_text("not json")
    return folder


@pytest.mark.parametrize(
    "kind, message",
    [
        ("truncated", "do not load (Error while deserializing header"),
        ("missing_tensor", "do not fit its config.json (1 missing or misshapen, e.g. logit_scale)"),
        ("other_size", "do not load (some weights have other shapes than config.json gives)"),
        ("config", "config.json is not a model config"),
    ],
)
def test_a_folder_whose_weights_do_not_fit_is_refused(kind, message, tmp_path):
    """transformers would fill missing or misshapen weights with random ones and only warn."""
    folder = _broken(kind, tmp_path / kind)
    with pytest.raises(ModelSpecError) as err:
        load_model(f"hf:{folder}")
    assert str(err.value).startswith(f"hf:{folder}: ") and message in str(err.value)
    assert "\n" not in str(err.value)
