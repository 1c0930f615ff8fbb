"""Hugging Face CLIP and SigLIP model folders (``save_pretrained`` output), loaded offline.

``hf:/path/to/dir`` needs config.json, the weights, and a tokenizer the folder can load;
preprocessor_config.json, if present, gives the image preprocessing (resize, crop,
interpolation, mean and std), read by transformers' own image processor; without it, the
defaults of the model type's processor at the config's image size.

The transformers model is regrouped into flyp's interface: ``visual`` (vision tower and
projection: every image parameter is named ``visual.*``), ``text`` (text tower and
projection), and the model's own ``logit_scale`` (and SigLIP's ``logit_bias``) parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from torch import Tensor, nn
from torchvision import transforms as T

from flyp.models.base import ModelBundle, ModelSpecError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL's resampling codes, as image processors store them, in torchvision's names
RESAMPLE = {
    0: T.InterpolationMode.NEAREST,
    1: T.InterpolationMode.LANCZOS,
    2: T.InterpolationMode.BILINEAR,
    3: T.InterpolationMode.BICUBIC,
    4: T.InterpolationMode.BOX,
    5: T.InterpolationMode.HAMMING,
}


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


@dataclass
class ImageSettings:
    """The preprocessing the weights were trained with, as the model's image processor does it:
    ``resize`` to a shortest edge (an int) or to exactly (height, width), then an optional
    centre ``crop`` to the model's input ``size``, then normalisation (``mean`` / ``std``, or
    none)."""

    size: int
    resize: int | tuple[int, int] | None
    crop: bool
    interpolation: T.InterpolationMode
    mean: tuple | None
    std: tuple | None

    def at(self, size: int) -> ImageSettings:
        """The same preprocessing for an input of ``size`` px (``model.image_size``)."""
        if isinstance(self.resize, int):
            resize = round(self.resize * size / self.size)
        else:
            resize = (size, size) if self.resize is not None else None
        return ImageSettings(size, resize, self.crop, self.interpolation, self.mean, self.std)


def _image_processor(folder: Path, config_size: int, siglip: bool):
    """The folder's image processor (preprocessor_config.json), or the model type's default
    processor at the config's image size (CLIP: shortest edge + centre crop; SigLIP: squash)."""
    from transformers import AutoImageProcessor, CLIPImageProcessor, SiglipImageProcessor

    if (folder / "preprocessor_config.json").is_file():
        try:
            return AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelSpecError(
                f"hf:{folder}: preprocessor_config.json is not an image processor config "
                f"({_reason(err)}); fix it, or remove it to use the model type's defaults"
            ) from None
    if siglip:
        return SiglipImageProcessor(size={"height": config_size, "width": config_size})
    square = {"height": config_size, "width": config_size}
    return CLIPImageProcessor(size={"shortest_edge": config_size}, crop_size=square)


def _image_settings(folder: Path, config_size: int, siglip: bool) -> ImageSettings:
    pre = _image_processor(folder, config_size, siglip)

    def edge(sizes, key: str):
        return sizes.get(key) if isinstance(sizes, dict) else getattr(sizes, key, None)

    size, crop = getattr(pre, "size", None), getattr(pre, "crop_size", None)
    resize = None
    if getattr(pre, "do_resize", True) and size is not None:
        if edge(size, "shortest_edge"):
            resize = int(edge(size, "shortest_edge"))
        elif edge(size, "height"):
            resize = (int(edge(size, "height")), int(edge(size, "width")))
    crops = (
        bool(getattr(pre, "do_center_crop", False)) and crop is not None and edge(crop, "height")
    )
    if crops:
        model_size = int(edge(crop, "height"))
    elif isinstance(resize, tuple):
        model_size = resize[0]
    else:
        model_size = resize or config_size
    normalize = getattr(pre, "do_normalize", True)
    resample = getattr(pre, "resample", 3)
    return ImageSettings(
        size=model_size,
        resize=resize,
        crop=bool(crops),
        interpolation=RESAMPLE.get(int(resample), T.InterpolationMode.BICUBIC),
        mean=tuple(pre.image_mean) if normalize else None,
        std=tuple(pre.image_std) if normalize else None,
    )


def image_transforms(settings: ImageSettings) -> tuple[T.Compose, T.Compose]:
    """(train, eval): training draws a random 90-100% crop at the input size; evaluation is the
    image processor's resize and crop. Both end in the processor's normalisation."""
    tail = [T.ToTensor()]
    if settings.mean is not None:
        tail.append(T.Normalize(settings.mean, settings.std))
    how = settings.interpolation
    train = T.Compose(
        [T.RandomResizedCrop(settings.size, scale=(0.9, 1.0), interpolation=how), *tail]
    )
    steps = [T.Resize(settings.resize, interpolation=how)] if settings.resize else []
    if settings.crop:
        steps.append(T.CenterCrop(settings.size))
    return train, T.Compose([*steps, *tail])


def context_length_of(config, tokenizer) -> int:
    """The text length the model was trained with: the tokenizer's ``model_max_length`` (77
    for CLIP, 64 for SigLIP) where it is set, never more than the position embeddings."""
    positions = int(config.text_config.max_position_embeddings)
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < positions:
        return tokenizer_max
    return positions


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
    settings = _image_settings(folder, config.vision_config.image_size, siglip)
    native = config.vision_config.image_size
    if image_size:
        settings = settings.at(image_size)
    size = settings.size
    train_tf, eval_tf = image_transforms(settings)
    own, positions = (
        context_length_of(config, tokenizer),
        config.text_config.max_position_embeddings,
    )
    if context_length is not None and context_length > positions:
        raise ModelSpecError(
            f"model.context_length {context_length} is more than hf:{path} has positions for "
            f"({positions}); leave it unset to use the model's own ({own})"
        )
    max_length = context_length or own
    return ModelBundle(
        HFTwoTower(model, siglip, interpolate=size != native),
        HFTokenizer(tokenizer, max_length, pad_to_max=siglip),
        train_tf,
        eval_tf,
        spec=f"hf:{path}",
        image_size=size,
        loss="siglip" if siglip else "clip",
    )
