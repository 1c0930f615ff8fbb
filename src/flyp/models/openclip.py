"""open_clip models: an architecture name with a pretrained tag, or with a local checkpoint file."""

from __future__ import annotations

import os
import socket
import types
from collections.abc import Callable
from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from flyp.models.base import ModelBundle, ModelSpecError, trim_padding


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


def load_open_clip(
    arch: str, weights: str | None, image_size: int | None = None, trim_text: bool = True
) -> ModelBundle:
    """``arch`` is an open_clip architecture name or a path to a model config JSON file.

    ``trim_text``: cut tokens to the longest caption of each batch where that leaves the
    features unchanged (see :func:`trim_text_context`); otherwise open_clip's full context."""
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
    if trim_text:
        tokenizer = trim_text_context(model, tokenizer)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    loss = "siglip" if getattr(model, "logit_bias", None) is not None else "clip"
    spec = f"open_clip:{arch}:{weights}" if weights else f"open_clip:{arch}"
    return ModelBundle(
        model, tokenizer, train_tf, eval_tf, spec=spec, image_size=int(size), loss=loss
    )


class TrimmedTokenizer:
    """open_clip's tokenizer, with the columns that are padding in every row dropped."""

    def __init__(self, tokenizer: Callable[[list[str]], Tensor]):
        self.tokenizer = tokenizer
        self.context_length = getattr(tokenizer, "context_length", None)

    def __call__(self, texts: list[str]) -> Tensor:
        return trim_padding(self.tokenizer(texts), pad_id=0)


def _encode_text_any_length(self, text: Tensor, normalize: bool = False) -> Tensor:
    """open_clip's CLIP.encode_text with the positional embedding and causal mask sliced to
    the token length (the original adds the full 77-position embedding)."""
    from open_clip.transformer import text_global_pool

    n = text.shape[1]
    cast_dtype = self.transformer.get_cast_dtype()
    x = self.token_embedding(text).to(cast_dtype)
    x = x + self.positional_embedding[:n].to(cast_dtype)
    x = self.transformer(x, attn_mask=self.attn_mask[:n, :n])
    x = self.ln_final(x)
    x = text_global_pool(
        x, text, self.text_pool_type, eos_token_id=getattr(self, "text_eos_id", None)
    )
    if self.text_projection is not None:
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        else:
            x = x @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def trim_text_context(model: nn.Module, tokenizer: Callable) -> Callable:
    """Let ``model`` take tokens cut to the longest caption; return the tokenizer that cuts.

    Text cost grows with the token count, and class captions are ~10 of CLIP's 77 tokens.
    Cutting leaves the features unchanged when attention is causal (no position sees the
    padding after it) and pooling reads the end-of-text or first token, which holds for
    open_clip's CLIP text towers with its own tokenizer (padding id 0). Other towers keep
    the full context: the model and tokenizer are returned as they were.
    """
    import open_clip

    trimmable = (
        type(model).encode_text is open_clip.model.CLIP.encode_text
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos", "first")
        and isinstance(tokenizer, open_clip.tokenizer.SimpleTokenizer)
    )
    if not trimmable:
        return tokenizer
    model.encode_text = types.MethodType(_encode_text_any_length, model)
    return TrimmedTokenizer(tokenizer)
