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


@pytest.mark.parametrize("offline", ["1", None])
def test_open_clip_tag_without_hub_fails_fast_naming_the_file_alternative(
    offline, monkeypatch, tmp_path
):
    """No retry loop, with or without HF_HUB_OFFLINE: the tag is looked up in the (empty)
    local cache, then, if the variable is unset, the hub gets one bounded probe. The network
    here is one where a connection hangs (the slow case), not one that fails at once."""
    import socket

    import open_clip  # noqa: F401  (imported before the clock starts: this is no import benchmark)
    from huggingface_hub import constants

    def hang(*args, **kwargs):
        time.sleep(30)
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", hang)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline is not None)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    start = time.time()
    with pytest.raises(ModelSpecError) as err:
        load_model("open_clip:ViT-B-16:openai")
    assert time.time() - start < 5
    why = "HF_HUB_OFFLINE is set" if offline else "no model hub is reachable"
    assert f"open_clip:ViT-B-16:openai is not in the local cache and {why}" in str(err.value)
    assert "open_clip:ViT-B-16:/path/to/weights.pt" in str(err.value)
    assert constants.HF_HUB_OFFLINE is (offline is not None)  # the client's setting is restored


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d.joinpath("w.pt").write_text("not weights"), "w.pt is not a checkpoint of"),
        (lambda d: d.joinpath("w.safetensors").write_bytes(b"0" * 64), "Error while deserializing"),
        (lambda d: torch.save({"visual.proj": torch.zeros(1)}, d / "w.pt"), "Missing key(s)"),
        (lambda d: torch.save(_other_vit(d), d / "w.pt"), "size mismatch for text_projection"),
    ],
    ids=["text_file", "corrupt_safetensors", "foreign_state_dict", "other_architecture"],
)
def test_weights_that_do_not_fit_name_the_file_and_the_spec(make, message, tmp_path):
    config = tmp_path / "flyp-test-vit.json"
    config.write_text(json.dumps(TINY_VIT))
    make(tmp_path)
    weights = next(tmp_path.glob("w.*"))
    with pytest.raises(ModelSpecError) as err:
        load_model(f"open_clip:{config}:{weights}")
    text = str(err.value)
    assert text.startswith(f"open_clip:flyp-test-vit:{weights}: {weights.name} is not a checkpoint")
    assert message in text and "\n" not in text


def _other_vit(folder):
    config = folder / "flyp-test-vit-wide.json"
    config.write_text(json.dumps(TINY_VIT | {"embed_dim": 24}))
    return load_model(f"open_clip:{config}").model.state_dict()


def test_bad_specs_are_explained(tmp_path):
    with pytest.raises(ModelSpecError, match="unknown model spec"):
        load_model("resnet")
    with pytest.raises(ModelSpecError, match="no architecture 'ViT-Q-99'"):
        load_model("open_clip:ViT-Q-99")
    # open_clip's hub prefix: the hub is out of reach, the message says what to pass instead
    with pytest.raises(ModelSpecError, match=r"open_clip:hf-hub:\.\.\. downloads the model from "
                       r"the Hugging Face hub, which flyp does not reach .* open_clip:ARCH:/path"):  # fmt: skip
        load_model("open_clip:hf-hub:laion/CLIP-ViT-B-16-laion2B-s34B-b88K")
    with pytest.raises(ModelSpecError, match="no pretrained tag 'nope'"):
        load_model("open_clip:ViT-B-16:nope")
    with pytest.raises(ModelSpecError, match="does not exist"):
        load_model(f"open_clip:ViT-B-16:{tmp_path}/missing.pt")
    with pytest.raises(ModelSpecError, match=r"tiny:x'.*a number in \[0, 1\)"):
        load_model("tiny:x")


def test_trim_padding():
    tokens = torch.tensor([[5, 6, 0, 0, 0], [7, 0, 0, 0, 0]])
    assert trim_padding(tokens).tolist() == [[5, 6], [7, 0]]
