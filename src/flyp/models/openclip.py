"""open_clip models: an architecture name with a pretrained tag, or with a local checkpoint file."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from flyp.models.base import ModelBundle, ModelSpecError


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _resolve_pretrained(arch: str, weights: str | None) -> str | None:
    """A local file is used as is; a tag must be in the local cache or the hub must answer."""
    import open_clip

    if weights is None or weights == "":
        return None
    if (
        Path(weights).expanduser().exists()
        or "/" in weights
        or weights.endswith((".pt", ".bin", ".safetensors"))
    ):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelSpecError(f"open_clip checkpoint file {path} does not exist")
        return str(path)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if weights not in tags:
        raise ModelSpecError(
            f"open_clip has no pretrained tag '{weights}' for {arch}; known tags: {', '.join(tags) or 'none'}. "
            f"Or pass a local checkpoint: open_clip:{arch}:/path/to/checkpoint.pt"
        )
    if not _hub_reachable():
        cfg = open_clip.get_pretrained_cfg(arch, weights)
        os.environ["HF_HUB_OFFLINE"] = "1"  # only answer from the local cache, never retry
        try:
            return open_clip.download_pretrained(cfg) or None
        except Exception as err:
            raise ModelSpecError(
                f"open_clip:{arch}:{weights} needs a download and no model hub is reachable from here. "
                f"Download the weights elsewhere and pass the file: open_clip:{arch}:/path/to/weights.pt "
                f"(or a Hugging Face CLIP directory: hf:/path/to/dir)"
            ) from err
    return weights


def load_open_clip(arch: str, weights: str | None, image_size: int | None = None) -> ModelBundle:
    """``arch`` is an open_clip architecture name or a path to a model config JSON file."""
    import open_clip

    if arch.endswith(".json"):
        config = Path(arch).expanduser()
        if not config.is_file():
            raise ModelSpecError(f"open_clip model config {config} does not exist")
        open_clip.add_model_config(config)
        arch = config.stem
    if arch not in open_clip.list_models():
        raise ModelSpecError(f"open_clip has no architecture '{arch}'; see open_clip.list_models()")
    pretrained = _resolve_pretrained(arch, weights)
    model, train_tf, eval_tf = open_clip.create_model_and_transforms(
        arch, pretrained=pretrained, force_image_size=image_size
    )
    tokenizer = open_clip.get_tokenizer(arch)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    loss = "siglip" if getattr(model, "logit_bias", None) is not None else "clip"
    spec = f"open_clip:{arch}:{weights}" if weights else f"open_clip:{arch}"
    return ModelBundle(
        model, tokenizer, train_tf, eval_tf, spec=spec, image_size=int(size), loss=loss
    )
