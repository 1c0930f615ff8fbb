"""Hugging Face CLIP and SigLIP model folders (``save_pretrained`` output), loaded offline.

``hf:/path/to/dir`` needs config.json, the weights, and a tokenizer the folder can load;
preprocessor_config.json, if present, gives the image size, mean and std.

The transformers model is regrouped into flyp's interface: ``visual`` (vision tower and
projection: every image parameter is named ``visual.*``), ``text`` (text tower and
projection), and the model's own ``logit_scale`` (and SigLIP's ``logit_bias``) parameters.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from torch import Tensor, nn
from torchvision import transforms as T

from flyp.models.base import ModelBundle, ModelSpecError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Tower(nn.Module):
    """One transformers tower followed by its projection: inputs -> pooled embedding."""

    def __init__(self, tower: nn.Module, projection: nn.Module | None, input_name: str, **kwargs):
        super().__init__()
        self.tower = tower
        self.projection = projection if projection is not None else nn.Identity()
        self.input_name = input_name
        self.kwargs = kwargs

    def forward(self, inputs: Tensor) -> Tensor:
        out = self.tower(**{self.input_name: inputs}, **self.kwargs)
        return self.projection(out.pooler_output)


class HFTwoTower(nn.Module):
    def __init__(self, model: nn.Module, siglip: bool, interpolate: bool = False):
        super().__init__()
        extra = {"interpolate_pos_encoding": True} if interpolate else {}
        self.visual = Tower(
            model.vision_model, getattr(model, "visual_projection", None), "pixel_values", **extra
        )
        self.text = Tower(model.text_model, getattr(model, "text_projection", None), "input_ids")
        self.logit_scale = model.logit_scale
        if siglip:
            self.logit_bias = model.logit_bias

    def encode_image(self, images: Tensor) -> Tensor:
        return self.visual(images)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.text(tokens)


class HFTokenizer:
    """``list[str] -> LongTensor``. CLIP pads to the longest caption (pad after the end token
    leaves the pooled end token unchanged, the text mask being causal); SigLIP pools the last
    position, so it always pads to the length it was trained with."""

    def __init__(self, tokenizer, max_length: int, pad_to_max: bool):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_max = pad_to_max

    def __call__(self, texts: list[str]) -> Tensor:
        out = self.tokenizer(
            list(texts),
            padding="max_length" if self.pad_to_max else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return out["input_ids"]


def _image_settings(folder: Path, config_size: int, siglip: bool) -> tuple[int, tuple, tuple]:
    mean, std = ((0.5,) * 3, (0.5,) * 3) if siglip else (CLIP_MEAN, CLIP_STD)
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return config_size, mean, std
    pre = json.loads(path.read_text())
    crop = pre.get("crop_size") or pre.get("size") or {}
    if isinstance(crop, dict):
        size = crop.get("height") or crop.get("shortest_edge") or config_size
    else:
        size = crop or config_size
    return int(size), tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))


def _reason(err: Exception) -> str:
    if "ignore_mismatched_sizes" in str(err):  # the details went to transformers' log
        return "some weights have other shapes than config.json gives"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _key(entry) -> str:
    """mismatched_keys holds (name, checkpoint shape, model shape) tuples, missing_keys names."""
    return entry[0] if isinstance(entry, tuple | list) else str(entry)


def load_hf(
    path: str, image_size: int | None = None, context_length: int | None = None
) -> ModelBundle:
    from transformers import AutoConfig, AutoTokenizer, CLIPModel, SiglipModel

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelSpecError(
            f"hf:{path} needs a model folder with config.json (a save_pretrained output)"
        )
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ModelSpecError(
            f"hf:{path}: {folder / 'config.json'} is not a model config ({_reason(err)}); "
            "pass a save_pretrained folder"
        ) from None
    kinds = {"clip": CLIPModel, "siglip": SiglipModel}
    if config.model_type not in kinds:
        raise ModelSpecError(
            f"hf:{path} is a '{config.model_type}' model; flyp loads CLIP and SigLIP folders"
        )
    siglip = config.model_type == "siglip"
    try:
        model, info = kinds[config.model_type].from_pretrained(
            folder, local_files_only=True, output_loading_info=True
        )
    except (OSError, RuntimeError, ValueError, SafetensorError) as err:
        raise ModelSpecError(
            f"hf:{path}: the weights in {folder} do not load ({_reason(err)}); pass the folder "
            "save_pretrained wrote, weights and config.json of the same model"
        ) from None
    # transformers fills missing or misshapen weights with random ones and only warns
    missing = [*info.get("missing_keys", []), *info.get("mismatched_keys", [])]
    if missing:
        raise ModelSpecError(
            f"hf:{path}: the weights in {folder} do not fit its config.json "
            f"({len(missing)} missing or misshapen, e.g. {_key(missing[0])}); pass the folder "
            "save_pretrained wrote, weights and config.json of the same model"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ModelSpecError(
            f"hf:{path} has no tokenizer files flyp can load offline ({err})"
        ) from err
    size, mean, std = _image_settings(folder, config.vision_config.image_size, siglip)
    native = config.vision_config.image_size
    size = image_size or size
    max_length = context_length or config.text_config.max_position_embeddings
    normalize = T.Normalize(mean, std)
    bicubic = T.InterpolationMode.BICUBIC
    train_tf = T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.9, 1.0), interpolation=bicubic),
            T.ToTensor(),
            normalize,
        ]
    )
    if siglip:
        eval_tf = T.Compose(
            [T.Resize((size, size), interpolation=bicubic), T.ToTensor(), normalize]
        )
    else:
        eval_tf = T.Compose(
            [T.Resize(size, interpolation=bicubic), T.CenterCrop(size), T.ToTensor(), normalize]
        )
    return ModelBundle(
        HFTwoTower(model, siglip, interpolate=size != native),
        HFTokenizer(tokenizer, max_length, pad_to_max=siglip),
        train_tf,
        eval_tf,
        spec=f"hf:{path}",
        image_size=size,
        loss="siglip" if siglip else "clip",
    )
