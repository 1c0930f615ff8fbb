import json
import time

import pytest
import torch

from flyp.models import ModelSpecError, load_model, trim_padding

TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_open_clip_checkpoint_file_round_trip(tmp_path):
    config = tmp_path / "flyp-test-vit.json"
    config.write_text(json.dumps(TINY_VIT))
    first = load_model(f"open_clip:{config}")
    weights = tmp_path / "weights.pt"
    torch.save(first.model.state_dict(), weights)
    second = load_model(f"open_clip:{config}:{weights}")
    images = torch.randn(2, 3, 32, 32)
    tokens = first.tokenizer(["a photo of a dog.", "a house."])
    for bundle in (first, second):
        bundle.model.eval()
    with torch.no_grad():
        assert torch.equal(first.model.encode_image(images), second.model.encode_image(images))
        assert torch.equal(first.model.encode_text(tokens), second.model.encode_text(tokens))
    assert second.image_size == 32 and second.loss == "clip"


def test_open_clip_tag_without_hub_fails_fast_naming_the_file_alternative(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-flyp-cache")
    start = time.time()
    with pytest.raises(ModelSpecError, match=r"open_clip:ViT-B-16:/path/to/weights.pt"):
        load_model("open_clip:ViT-B-16:openai")
    assert time.time() - start < 60


def test_bad_specs_are_explained(tmp_path):
    with pytest.raises(ModelSpecError, match="unknown model spec"):
        load_model("resnet")
    with pytest.raises(ModelSpecError, match="no architecture 'ViT-Q-99'"):
        load_model("open_clip:ViT-Q-99")
    with pytest.raises(ModelSpecError, match="no pretrained tag 'nope'"):
        load_model("open_clip:ViT-B-16:nope")
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model(f"open_clip:ViT-B-16:{tmp_path}/missing.pt")


def test_trim_padding():
    tokens = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 0, 0, 0]])
    assert trim_padding(tokens).tolist() == [[5, 6], [7, 0]]
