"""Pretrained weights are loaded into the network they were trained as (issue 15, part 1).

open_clip 3.x builds ``ViT-B-16`` with ``nn.GELU``; OpenAI's weights were trained with
QuickGELU, and open_clip only warns. These tests pin, without any hub, that every model source
gets the activation, the image preprocessing, the text length and the temperature its weights
were trained with: open_clip tags (the paper recipes' among them, built without weights),
OpenAI's own checkpoint files, open_clip files, and Hugging Face CLIP / SigLIP folders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from fakes import make_domains, make_tiny_hf
from flyp.models import ModelSpecError, load_model

open_clip = pytest.importorskip("open_clip")
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # noqa: E402
from open_clip.transformer import QuickGELU  # noqa: E402

import flyp.models.openclip as oc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
HALF = (0.5, 0.5, 0.5)
SCALE = 42.0  # a logit scale no default has: it can only come from the weights


def _activations(model: torch.nn.Module) -> set[type]:
    """The activation module types of every transformer MLP (open_clip names them mlp.gelu)."""
    return {type(m.gelu) for m in model.modules() if hasattr(m, "gelu") and hasattr(m, "c_fc")}


def _normalize(transform):
    step = next(t for t in transform.transforms if type(t).__name__ == "Normalize")
    return tuple(float(x) for x in step.mean), tuple(float(x) for x in step.std)


def _config(folder: Path, name: str, **extra) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(TINY_VIT | extra))
    return path


def _reference(config: Path, quick_gelu: bool, seed: int = 0) -> torch.nn.Module:
    """A tiny open_clip model as the weights' trainer built it, with a distinctive scale."""
    open_clip.add_model_config(config)
    torch.manual_seed(seed)
    model = open_clip.create_model(config.stem, force_quick_gelu=quick_gelu).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(SCALE))
    return model


def _features(model, tokens, size: int = 32):
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def _same_network(bundle, reference) -> bool:
    tokens = open_clip.get_tokenizer(bundle.spec.split(":")[1])(["a photo of a dog.", "a cat"])
    ours, theirs = _features(bundle.model, tokens), _features(reference, tokens)
    return all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs, strict=True))


# ------------------------------------------------------------------ open_clip pretrained tags


def _recipe_tags() -> list[str]:
    specs = {yaml.safe_load(p.read_text())["model"]["spec"] for p in ROOT.glob("recipes/*.yaml")}
    tags = sorted(s for s in specs if s.startswith("open_clip:") and s.count(":") == 2)
    assert "open_clip:ViT-B-16:openai" in tags  # what all eight paper recipes use
    return tags


@pytest.mark.parametrize("spec", _recipe_tags())
def test_paper_recipe_tags_build_with_quickgelu_and_their_preprocessing(spec, monkeypatch):
    """Each open_clip tag of recipes/*.yaml, built by load_model's own resolution without
    weights (no hub here): QuickGELU in every MLP of both towers, no nn.GELU, the tag's mean
    and std, and CLIP's 77-token context."""
    _, arch, tag = spec.split(":")
    monkeypatch.setattr(oc, "_resolve_pretrained", lambda arch, weights: (None, False))
    bundle = load_model(spec)
    assert open_clip.get_pretrained_cfg(arch, tag)["quick_gelu"] is True
    assert _activations(bundle.model.visual) == {QuickGELU}
    assert _activations(bundle.model.transformer) == {QuickGELU}
    assert not any(isinstance(m, torch.nn.GELU) for m in bundle.model.modules())
    assert _normalize(bundle.eval_transform) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    assert bundle.tokenizer.context_length == 77 and bundle.spec == spec


def test_every_open_clip_tag_gets_the_activation_and_preprocessing_it_was_trained_with(
    monkeypatch,
):
    """All of open_clip's tags, through load_model up to the point where open_clip builds the
    model: QuickGELU wherever the tag was trained with it (27 tags whose architecture is GELU,
    ViT-B-16 openai among them), never turned off where the architecture has it, and the tag's
    own mean, std, interpolation and resize mode."""
    calls = []

    class Built(Exception):
        pass

    def record(arch, **kwargs):
        calls.append(kwargs)
        raise Built

    monkeypatch.setattr(oc, "_resolve_pretrained", lambda arch, weights: (weights, False))
    monkeypatch.setattr(open_clip, "create_model_and_transforms", record)
    forced = []
    for arch, tag in open_clip.list_pretrained():
        with pytest.raises(ModelSpecError):
            load_model(f"open_clip:{arch}:{tag}")
        kwargs, tag_cfg = calls[-1], open_clip.get_pretrained_cfg(arch, tag)
        arch_quick = open_clip.get_model_config(arch).get("quick_gelu", False)
        built_quick = kwargs["force_quick_gelu"] or arch_quick
        assert built_quick == (tag_cfg.get("quick_gelu", False) or arch_quick), (arch, tag)
        if kwargs["force_quick_gelu"] and not arch_quick:
            forced.append(f"{arch}:{tag}")
        assert tuple(kwargs["image_mean"]) == tuple(tag_cfg["mean"]), (arch, tag)
        assert tuple(kwargs["image_std"]) == tuple(tag_cfg["std"]), (arch, tag)
        assert kwargs["image_interpolation"] == tag_cfg["interpolation"]
        assert kwargs["image_resize_mode"] == tag_cfg["resize_mode"]
    assert "ViT-B-16:openai" in forced and "ViT-L-14-336:openai" in forced and len(forced) >= 20


@pytest.fixture
def tiny_tags(tmp_path, monkeypatch):
    """A tiny architecture with two pretrained tags registered the way open_clip's own are
    (a local 'file' instead of a download): 'qg', trained with QuickGELU and SigLIP's 0.5
    normalisation, and 'plain', trained with GELU."""
    config = _config(tmp_path, "flyp-fid-vit")
    weights = {}
    for tag, quick in (("qg", True), ("plain", False)):
        weights[tag] = _reference(config, quick)
        torch.save(weights[tag].state_dict(), tmp_path / f"{tag}.pt")
    tags = {
        "qg": {"file": str(tmp_path / "qg.pt"), "quick_gelu": True, "mean": HALF, "std": HALF},
        "plain": {"file": str(tmp_path / "plain.pt"), "mean": HALF, "std": HALF},
    }
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "flyp-fid-vit", tags)
    quick_config = _config(tmp_path, "flyp-fid-vit-quickgelu", quick_gelu=True)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "flyp-fid-vit-quickgelu", tags)
    return config, quick_config, weights


def test_a_quickgelu_tag_loads_its_weights_into_quickgelu(tiny_tags):
    """The whole path with weights: the network computes what the QuickGELU model that saved
    them computes, with the saved temperature and the tag's normalisation."""
    config, _, weights = tiny_tags
    bundle = load_model(f"open_clip:{config}:qg")
    assert _activations(bundle.model) == {QuickGELU}
    assert _same_network(bundle, weights["qg"])
    assert bundle.model.logit_scale.exp().item() == pytest.approx(SCALE)
    assert _normalize(bundle.eval_transform) == (HALF, HALF)


def test_a_gelu_tag_stays_gelu_and_a_quickgelu_name_stays_quickgelu(tiny_tags):
    config, quick_config, weights = tiny_tags
    plain = load_model(f"open_clip:{config}:plain")
    assert _activations(plain.model) == {torch.nn.GELU} and _same_network(plain, weights["plain"])
    named = load_model(f"open_clip:{quick_config}:plain")  # the user named -quickgelu
    assert _activations(named.model) == {QuickGELU}


def test_no_hub_for_a_quickgelu_tag_names_the_quickgelu_architecture(monkeypatch, tmp_path):
    """The one-line refusal says how to pass a copy of the weights in open_clip's format
    (which carries no sign of QuickGELU): under the -quickgelu architecture."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSpecError) as err:
        load_model("open_clip:ViT-B-16:openai")
    assert "open_clip:ViT-B-16-quickgelu:/path/to/weights.pt" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelSpecError) as err:
        load_model("open_clip:ViT-B-16:laion2b_s34b_b88k")  # trained with GELU
    assert "quickgelu" not in str(err.value)


# ------------------------------------------------------------------ open_clip checkpoint files


def _as_openai_jit(reference: torch.nn.Module, path: Path) -> Path:
    """A file in the form OpenAI distributes CLIP (ViT-B-16.pt): a TorchScript archive whose
    state dict also holds input_resolution, context_length and vocab_size."""
    import copy

    model = copy.deepcopy(reference)
    for key, value in (("input_resolution", 32), ("context_length", 77), ("vocab_size", 49408)):
        model.__dict__.pop(key, None)
        model.register_buffer(key, torch.tensor(value))
    images = torch.zeros(1, 3, 32, 32)
    traced = torch.jit.trace_module(model, {"encode_image": (images,)}, check_trace=False)
    torch.jit.save(traced, str(path))
    return path


def _as_openai_state_dict(reference: torch.nn.Module, path: Path) -> Path:
    """OpenAI's weights as a plain state dict: half-precision matrices, fp32 norms, and the
    three entries open_clip's files never hold."""
    state = {k: v.half() if v.ndim >= 2 else v for k, v in reference.state_dict().items()}
    state |= {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77)}
    torch.save(state | {"vocab_size": torch.tensor(49408)}, path)
    return path


@pytest.mark.parametrize("form", ["torchscript", "state_dict"])
def test_openai_checkpoint_files_load_with_quickgelu(form, tmp_path):
    """OpenAI's own files given as a path (open_clip's weights_only loader refuses its
    TorchScript archives outright) are built with QuickGELU and OpenAI's preprocessing, and
    compute what the model that wrote them computes."""
    config = _config(tmp_path, "flyp-fid-vit")
    reference = _reference(config, quick_gelu=True)
    if form == "state_dict":  # what the half-precision file can hold
        with torch.no_grad():
            for p in reference.parameters():
                if p.ndim >= 2:
                    p.copy_(p.half().float())
        path = _as_openai_state_dict(reference, tmp_path / "ViT-fid.pt")
    else:
        path = _as_openai_jit(reference, tmp_path / "ViT-fid.pt")
    bundle = load_model(f"open_clip:{config}:{path}")
    assert _activations(bundle.model) == {QuickGELU}
    assert _same_network(bundle, reference)
    assert bundle.model.logit_scale.exp().item() == pytest.approx(SCALE)
    assert _normalize(bundle.eval_transform) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    larger = load_model(f"open_clip:{config}:{path}", image_size=48)  # positions resized
    assert larger.image_size == 48 and _activations(larger.model) == {QuickGELU}


def test_an_open_clip_file_keeps_the_architectures_activation(tmp_path):
    """A plain open_clip state dict carries no sign of its activation: it gets what the
    architecture (as named) says, GELU here, QuickGELU under a -quickgelu config."""
    config = _config(tmp_path, "flyp-fid-plain")
    reference = _reference(config, quick_gelu=False)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    bundle = load_model(f"open_clip:{config}:{tmp_path / 'w.pt'}")
    assert _activations(bundle.model) == {torch.nn.GELU} and _same_network(bundle, reference)
    quick = _config(tmp_path, "flyp-fid-plain-quickgelu", quick_gelu=True)
    assert _activations(load_model(f"open_clip:{quick}:{tmp_path / 'w.pt'}").model) == {QuickGELU}


def test_open_clip_config_beside_the_weights_gives_activation_and_preprocessing(tmp_path):
    """open_clip's folder format (a Hugging Face download, a flyp export) says what the
    weights were trained with in open_clip_config.json: that is used for the file."""
    config = _config(tmp_path, "flyp-fid-side")
    reference = _reference(config, quick_gelu=True)
    folder = tmp_path / "download"
    folder.mkdir()
    torch.save(reference.state_dict(), folder / "open_clip_pytorch_model.bin")
    side = {
        "model_cfg": TINY_VIT | {"quick_gelu": True},
        "preprocess_cfg": {"mean": HALF, "std": HALF},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(side))
    bundle = load_model(f"open_clip:{config}:{folder / 'open_clip_pytorch_model.bin'}")
    assert _activations(bundle.model) == {QuickGELU} and _same_network(bundle, reference)
    assert _normalize(bundle.eval_transform) == (HALF, HALF)


def test_a_checkpoint_file_gets_its_architectures_pretrained_preprocessing(tiny_tags, tmp_path):
    """A file of an architecture whose every tag shares one normalisation (SigLIP's 0.5) gets
    it, instead of open_clip's OpenAI default; where tags differ, the default stays."""
    config, _, weights = tiny_tags
    torch.save(weights["plain"].state_dict(), tmp_path / "copy.pt")
    bundle = load_model(f"open_clip:{config}:{tmp_path / 'copy.pt'}")
    assert _normalize(bundle.eval_transform) == (HALF, HALF)
    assert _activations(bundle.model) == {torch.nn.GELU}  # no tag-wide guess for the activation
    assert oc._common_preprocess("ViT-B-16-SigLIP")["mean"] == HALF
    assert oc._common_preprocess("ViT-B-16")["mean"] == OPENAI_DATASET_MEAN
    assert oc._common_preprocess("ViT-L-14") == {}  # its tags differ: open_clip's default


def test_open_clip_siglip_bias_and_scale_come_from_the_file(tmp_path):
    """A SigLIP-style architecture (init_logit_bias -10) starts from the saved bias and
    scale, and is finetuned with the sigmoid loss."""
    config = _config(tmp_path, "flyp-fid-sigmoid", init_logit_bias=-10.0)
    reference = _reference(config, quick_gelu=False)
    with torch.no_grad():
        reference.logit_bias.fill_(-7.5)
    torch.save(reference.state_dict(), tmp_path / "w.pt")
    bundle = load_model(f"open_clip:{config}:{tmp_path / 'w.pt'}")
    assert bundle.model.logit_bias.item() == pytest.approx(-7.5) and bundle.loss == "siglip"
    assert bundle.model.logit_scale.exp().item() == pytest.approx(SCALE)


def test_open_clip_context_length_is_the_architectures(tmp_path):
    """The tokenizer's context comes from the architecture (77 for CLIP; SigLIP's configs
    say 64): a config with 20 positions tokenizes to 20 when flyp does not trim."""
    config = tmp_path / "flyp-fid-ctx.json"
    config.write_text(
        json.dumps(TINY_VIT | {"text_cfg": TINY_VIT["text_cfg"] | {"context_length": 20}})
    )
    bundle = load_model(f"open_clip:{config}", context_length=20)
    assert bundle.tokenizer(["a photo of a dog."]).shape == (1, 20)
    assert open_clip.get_model_config("ViT-B-16-SigLIP")["text_cfg"]["context_length"] == 64


def test_export_of_a_quickgelu_run_loads_back_as_quickgelu(tmp_path):
    """flyp export --format open_clip of a run trained from QuickGELU weights: open_clip's
    folder loader builds QuickGELU and gives flyp's features; the by-name line forces it."""
    from flyp.checkpoint import load_weights
    from flyp.export import export_run
    from flyp.methods import Classifier
    from flyp.recipe import load_recipe
    from flyp.train import finetune

    config = _config(tmp_path, "flyp-fid-export")
    weights = _as_openai_jit(_reference(config, quick_gelu=True), tmp_path / "openai.pt")
    root = make_domains(
        tmp_path / "data", ["photo", "sketch"], ["cat", "dog"], per_class=4, size=32
    )
    overrides = [
        f"model.spec=open_clip:{config}:{weights}",
        "data.benchmark=folders",
        f"data.root={root}",
        "data.id_domain=photo",
        "data.ood_domains=[sketch]",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
        "train.epochs=1",
        "train.batch_size=4",
        "train.select_on=last",
    ]
    finetune(load_recipe(None, overrides), tmp_path / "run")
    out = export_run(tmp_path / "run", "open_clip", tmp_path / "export")
    saved = json.loads((out / "open_clip_config.json").read_text())
    assert saved["model_cfg"]["quick_gelu"] is True
    info = json.loads((out / "flyp_export.json").read_text())
    assert "force_quick_gelu=True" in info["load"][-1]
    loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert _activations(loaded) == {QuickGELU}
    bundle = load_model(f"open_clip:{config}:{weights}")
    classifier = Classifier(bundle.model, None)
    load_weights(classifier, tmp_path / "run" / "model.safetensors")
    tokens = open_clip.get_tokenizer("flyp-fid-export")(["a photo of a dog."])
    ours, theirs = _features(bundle.model, tokens), _features(loaded, tokens)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs, strict=True))


# ------------------------------------------------------------------ Hugging Face folders

transformers = pytest.importorskip("transformers")


def _hf(kind: str, folder: Path, image_processor: bool = False, **config_changes) -> Path:
    """A tiny HF folder, with config.json changed afterwards (an activation does not change
    the weights' shapes) and the tokenizer's model_max_length set where given."""
    make_tiny_hf(kind, folder, image_processor=image_processor)
    config = json.loads((folder / "config.json").read_text())
    max_length = config_changes.pop("model_max_length", None)
    for tower in ("text_config", "vision_config"):
        config[tower] |= config_changes.get(tower, {})
    (folder / "config.json").write_text(json.dumps(config))
    if max_length is not None:
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(
            json.dumps(tok | {"model_max_length": max_length})
        )
    return folder


ACTS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def _tower_acts(tower: torch.nn.Module) -> list:
    return [m.activation_fn for name, m in tower.named_modules() if name.endswith("mlp")]


@pytest.mark.parametrize(
    "kind, text_act, vision_act",
    [
        ("clip", "quick_gelu", "quick_gelu"),  # OpenAI's CLIP (transformers' default)
        ("clip", "gelu", "quick_gelu"),  # each tower its own
        ("clip", "quick_gelu", "gelu"),
        ("siglip", "gelu_pytorch_tanh", "gelu_pytorch_tanh"),  # SigLIP (its default)
        ("siglip", "gelu", "gelu_pytorch_tanh"),
    ],
)
def test_hf_activation_is_each_towers_config(kind, text_act, vision_act, tmp_path):
    """The activation every MLP computes is its tower's hidden_act in config.json."""
    folder = _hf(
        kind,
        tmp_path / kind,
        text_config={"hidden_act": text_act},
        vision_config={"hidden_act": vision_act},
    )
    bundle = load_model(f"hf:{folder}")
    x = torch.linspace(-4, 4, 101)
    for tower, act in ((bundle.model.text, text_act), (bundle.model.visual, vision_act)):
        fns = _tower_acts(tower)
        assert fns and all(torch.allclose(fn(x), ACTS[act](x), atol=1e-6) for fn in fns)
        others = [a for a in ACTS if a != act]
        assert not any(torch.allclose(fns[0](x), ACTS[o](x), atol=1e-4) for o in others)


def _picture() -> Image.Image:
    """A smooth 64x44 picture (resampling differences stay small on smooth content; its
    resized widths leave an even margin, where crop conventions round alike)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, 44), torch.linspace(0, 1, 64), indexing="ij")
    rgb = torch.stack([x, y, (x + y) / 2]) * 255
    return Image.fromarray(rgb.permute(1, 2, 0).round().to(torch.uint8).numpy())


def _detailed_picture() -> Image.Image:
    """A 64x44 picture of seeded noise, with the smooth picture's size. On smooth content
    bilinear and bicubic resizing differ by 3e-4 on average (below any tolerance for two
    implementations); on this detail by 5e-2 to 1e-1, while flyp and transformers' processor,
    both resampling with PIL, differ by under 1e-4 (a rounding of one level in a few pixels)."""
    noise = torch.randint(0, 256, (44, 64, 3), generator=torch.Generator().manual_seed(0))
    return Image.fromarray(noise.to(torch.uint8).numpy())


def _processor_pixels(processor, picture) -> torch.Tensor:
    return torch.as_tensor(processor(picture, return_tensors="pt")["pixel_values"][0])


def test_hf_preprocessing_is_the_folders_image_processor(tmp_path):
    """preprocessor_config.json's resize (shortest edge 40), crop (32), interpolation
    (bilinear), mean and std are what flyp's evaluation transform does, the same pixels as
    transformers' own processor; a forced image size scales resize and crop together."""
    folder = _hf("clip", tmp_path / "clip")
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 40}, crop_size=32, resample=2, image_mean=mean, image_std=std
    )
    processor.save_pretrained(folder)
    bundle = load_model(f"hf:{folder}")
    steps = [type(t).__name__ for t in bundle.eval_transform.transforms]
    assert steps == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    resize = bundle.eval_transform.transforms[0]
    assert resize.size == 40 and resize.interpolation.value == "bilinear"
    assert _normalize(bundle.eval_transform) == (mean, std) and bundle.image_size == 32
    for picture in (_picture(), _detailed_picture()):  # bicubic would differ on the second
        ours, theirs = bundle.eval_transform(picture), _processor_pixels(processor, picture)
        assert ours.shape == theirs.shape == (3, 32, 32)
        assert (ours - theirs).abs().mean() < 1e-3
    larger = load_model(f"hf:{folder}", image_size=64)
    assert larger.eval_transform.transforms[0].size == 80 and larger.image_size == 64


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_preprocessing_without_a_processor_file_is_the_model_types(kind, tmp_path):
    """No preprocessor_config.json: CLIP's processor (shortest edge + centre crop, OpenAI's
    mean and std) or SigLIP's (squashed to the square, mean and std 0.5), at the config's size,
    the same pixels as that processor."""
    bundle = load_model(f"hf:{_hf(kind, tmp_path / kind)}")
    if kind == "clip":
        processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
        assert _normalize(bundle.eval_transform) == (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    else:
        processor = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
        assert _normalize(bundle.eval_transform) == (HALF, HALF)
        assert "CenterCrop" not in [type(t).__name__ for t in bundle.eval_transform.transforms]
    for picture in (_picture(), _detailed_picture()):  # bilinear would differ on the second
        ours, theirs = bundle.eval_transform(picture), _processor_pixels(processor, picture)
        assert ours.shape == theirs.shape == (3, 32, 32)
        assert (ours - theirs).abs().mean() < 1e-3


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_context_length_is_the_tokenizers_trained_length(kind, tmp_path):
    """The text length is the tokenizer's model_max_length (77 for CLIP, 64 for SigLIP) where
    set, else the config's positions; SigLIP always pads to it (it pools the last token)."""
    unset = load_model(f"hf:{_hf(kind, tmp_path / 'unset')}")
    assert unset.tokenizer.max_length == 12  # the tiny config's max_position_embeddings
    bundle = load_model(f"hf:{_hf(kind, tmp_path / 'set', model_max_length=10)}")
    assert bundle.tokenizer.max_length == 10
    tokens = bundle.tokenizer(["a photo of the dog . a photo of the cat . a photo"])
    assert tokens.shape == (1, 10)
    if kind == "siglip":
        assert bundle.tokenizer(["a dog"]).shape == (1, 10)


def test_hf_context_length_beyond_the_positions_is_refused_in_one_line(tmp_path):
    folder = _hf("clip", tmp_path / "clip")
    with pytest.raises(ModelSpecError) as err:
        load_model(f"hf:{folder}", context_length=13)
    assert str(err.value) == (
        f"model.context_length 13 is more than hf:{folder} has positions for (12); "
        "leave it unset to use the model's own (12)"
    )


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_logit_scale_and_bias_come_from_the_weights(kind, tmp_path):
    """The starting temperature (and SigLIP's bias) are the saved ones, not a default."""
    from safetensors.torch import load_file, save_file

    folder = _hf(kind, tmp_path / kind)
    state = load_file(folder / "model.safetensors")
    state["logit_scale"] = torch.tensor([math.log(SCALE)]).reshape(state["logit_scale"].shape)
    if kind == "siglip":
        state["logit_bias"] = torch.full_like(state["logit_bias"], -7.5)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    bundle = load_model(f"hf:{folder}")
    assert bundle.model.logit_scale.exp().item() == pytest.approx(SCALE)
    if kind == "siglip":
        assert bundle.model.logit_bias.item() == pytest.approx(-7.5)


def test_hf_unreadable_preprocessor_config_is_refused_in_one_line(tmp_path):
    """A broken preprocessor_config.json is named, not replaced by some other preprocessing."""
    folder = _hf("clip", tmp_path / "clip")
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ModelSpecError) as err:
        load_model(f"hf:{folder}")
    assert str(err.value).startswith(
        f"hf:{folder}: preprocessor_config.json is not an image processor config ("
    )
    assert str(err.value).endswith("fix it, or remove it to use the model type's defaults")
    assert "\n" not in str(err.value)


def test_hf_context_length_beyond_the_positions_through_the_cli(tmp_path, capsys):
    """flyp finetune ends with one line and exit status 2, and leaves no run directory."""
    from flyp.cli import main

    folder = _hf("clip", tmp_path / "clip")
    root = make_domains(
        tmp_path / "data", ["photo", "sketch"], ["cat", "dog"], per_class=4, size=16
    )
    args = ["finetune", "--data", str(root), "--id-domain", "photo", "--model", f"hf:{folder}"]
    out = tmp_path / "run"
    capsys.readouterr()  # what building the folder printed
    assert main([*args, "--set", "model.context_length=13", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the run's settings line
    assert err == (
        f"error: model.context_length 13 is more than hf:{folder} has positions for (12); "
        "leave it unset to use the model's own (12)"
    )
    assert not out.exists()
