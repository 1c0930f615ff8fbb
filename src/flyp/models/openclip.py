"""open_clip models: an architecture name with a pretrained tag, or with a local checkpoint file."""

from __future__ import annotations

import json
import os
import socket
import threading
import types
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flyp.models.base import ModelBundle, ModelSpecError, trim_padding

HUB_PROBE_SECONDS = 2.0  # the whole reachability check, name lookup included
# Entries of OpenAI's own checkpoints (ViT-B-16.pt, ...) that open_clip's files never hold.
OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


@dataclass(frozen=True)
class Pretraining:
    """What a checkpoint's weights were trained with that its architecture name does not say.

    open_clip 3.x builds ``ViT-B-16`` and most other architectures with ``nn.GELU``, but
    OpenAI's weights (and those of several other tags) were trained with QuickGELU: loaded
    into GELU they run a different network (ImageNet zero-shot 64.4 instead of 68.3 for
    ViT-B-16, and open_clip only warns). ``quick_gelu`` turns QuickGELU on, never off (an
    architecture named ``-quickgelu`` stays as named); ``preprocess`` holds the mean, std,
    interpolation and resize mode the weights expect (empty: the architecture's defaults)."""

    quick_gelu: bool = False
    preprocess: dict = field(default_factory=dict)


def tag_pretraining(arch: str, tag: str) -> Pretraining:
    """A pretrained tag's settings, from open_clip's own metadata (``open_clip.pretrained``)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    preprocess = {k: cfg[k] for k in PREPROCESS_KEYS if k in cfg}
    return Pretraining(bool(cfg.get("quick_gelu", False)), preprocess)


def _common_preprocess(arch: str) -> dict:
    """The preprocessing every pretrained tag of ``arch`` shares (e.g. SigLIP's mean and std
    of 0.5), or nothing where they differ: a checkpoint file of such an architecture is almost
    always one of those weights, or finetuned from them."""
    import open_clip

    found = [
        tag_pretraining(arch, t).preprocess for t in open_clip.list_pretrained_tags_by_model(arch)
    ]
    return found[0] if found and all(p == found[0] for p in found) else {}


def file_pretraining(arch: str, path: Path, openai: bool) -> Pretraining:
    """A local checkpoint file's settings: OpenAI's own files (``openai``) were trained with
    QuickGELU and OpenAI's preprocessing; an ``open_clip_config.json`` beside the file (open_clip's
    folder format, a Hugging Face download, a flyp export) says what it holds; otherwise the
    activation is the architecture's and the preprocessing its tags' common one."""
    if openai:
        return _openai_pretraining()
    beside = path.parent / "open_clip_config.json"
    try:
        config = json.loads(beside.read_text()) if beside.is_file() else {}
    except (OSError, ValueError):
        config = {}
    if isinstance(config, dict) and isinstance(config.get("model_cfg"), dict):
        preprocess = config.get("preprocess_cfg") or {}
        return Pretraining(
            bool(config["model_cfg"].get("quick_gelu", False)),
            {k: preprocess[k] for k in PREPROCESS_KEYS if k in preprocess},
        )
    return Pretraining(False, _common_preprocess(arch))


def _openai_pretraining() -> Pretraining:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return Pretraining(
        True,
        {
            "mean": OPENAI_DATASET_MEAN,
            "std": OPENAI_DATASET_STD,
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    )


def _is_torchscript(path: Path) -> bool:
    """OpenAI distributes its CLIP checkpoints as TorchScript archives (zip files with
    constants.pkl); ``torch.load(weights_only=True)``, which open_clip uses, refuses them."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def openai_state_dict(path: Path) -> dict[str, Tensor] | None:
    """The weights of ``path`` if it is one of OpenAI's own CLIP checkpoints (a TorchScript
    archive, or a state dict with OpenAI's ``input_resolution`` / ``context_length`` /
    ``vocab_size`` entries), without those entries; None for any other file."""
    if _is_torchscript(path):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    elif path.suffix in (".safetensors", ".npz", ".npy"):
        return None  # OpenAI never shipped these; open_clip loads them
    else:
        try:  # memory-mapped: a look at the keys costs no copy of the weights
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a zip-format file (or not a checkpoint): open_clip says which
            return None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not any(k in state for k in OPENAI_ONLY_KEYS):
            return None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if k not in OPENAI_ONLY_KEYS}


def _load_openai_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load OpenAI's weights into an open_clip model of the same architecture, as open_clip's
    ``load_checkpoint`` does for its own files (the positional embedding resized to the
    model's image size). Buffers the model computes itself (attention masks) are skipped."""
    from open_clip.model import resize_pos_embed

    kept = model.state_dict().keys()
    computed = {name for name, _ in model.named_buffers() if name not in kept}
    # fp32 as the model is: OpenAI's files hold fp16 matrices, which resizing cannot take
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k not in computed}
    resize_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def uses_quick_gelu(model: nn.Module) -> bool:
    """Whether an open_clip model runs QuickGELU (what its config's ``quick_gelu`` says)."""
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def _offline_requested() -> bool:
    flags = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in ("1", "on", "yes", "true") for f in flags)


def _hub_reachable(timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the hub (or the HTTPS proxy in front of it) accepts a connection within
    ``timeout`` seconds. The probe runs in a thread because a name lookup ignores socket
    timeouts: without a network it may hang far longer than the hub client's own retries."""
    from huggingface_hub import constants

    url = urlparse(urllib.request.getproxies().get("https") or constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


@contextmanager
def _hub_offline() -> Iterator[None]:
    """Answer every hub request from the local cache only, at once (no retries). The client
    reads HF_HUB_OFFLINE when it is imported, so setting the variable now would do nothing."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _is_cached(cfg: dict) -> bool:
    """Whether open_clip finds the tag's weights without a network."""
    import open_clip

    if "file" in cfg:  # a tag registered with a local file, which open_clip uses as is
        return Path(cfg["file"]).is_file()
    if cfg.get("hf_hub"):
        with _hub_offline():
            try:
                return bool(open_clip.download_pretrained(cfg))
            except Exception:  # the hub client's "not in the local cache" errors
                return False
    url = cfg.get("url", "")
    return bool(url) and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file()


def _is_file_spec(weights: str) -> bool:
    return (
        Path(weights).expanduser().exists()
        or "/" in weights
        or weights.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz"))
    )


def _resolve_pretrained(arch: str, weights: str | None) -> tuple[str | None, bool]:
    """(what open_clip should load, whether the hub may be used). A local file is used as is;
    a tag must be in the local cache, or the hub must answer now: never a retry loop."""
    import open_clip

    if not weights:
        return None, False
    if _is_file_spec(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelSpecError(f"open_clip checkpoint file {path} does not exist")
        return str(path), False
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if weights not in tags:
        raise ModelSpecError(
            f"open_clip has no pretrained tag '{weights}' for {arch}; known tags: {', '.join(tags) or 'none'}. "
            f"Or pass a local checkpoint: open_clip:{arch}:/path/to/checkpoint.pt"
        )
    if _is_cached(open_clip.get_pretrained_cfg(arch, weights)):
        return weights, False
    if _offline_requested() or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if _offline_requested() else "no model hub is reachable"
        quick = (
            f"; a copy in open_clip's format, trained with QuickGELU: "
            f"open_clip:{arch}-quickgelu:/path/to/weights.pt"
            if tag_pretraining(arch, weights).quick_gelu
            and f"{arch}-quickgelu" in open_clip.list_models()
            else ""
        )
        raise ModelSpecError(
            f"open_clip:{arch}:{weights} is not in the local cache and {why}. "
            f"Download the weights elsewhere and pass the file: open_clip:{arch}:/path/to/weights.pt "
            f"(or a Hugging Face CLIP directory: hf:/path/to/dir{quick})"
        )
    return weights, True


def _reason(err: Exception) -> str:
    """One line out of a loading error (load_state_dict lists every key on its own line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Error(s) in loading state_dict") and len(lines) > 1:
        lines = lines[1:]
    text = lines[0] if lines else type(err).__name__
    text = text if len(text) <= 160 else text[:157] + "..."
    return text if lines and not text[0].isdigit() else f"{type(err).__name__} {text}"


def load_open_clip(
    arch: str, weights: str | None, image_size: int | None = None, trim_text: bool = True
) -> ModelBundle:
    """``arch`` is an open_clip architecture name or a path to a model config JSON file.

    The model is built as its weights were trained (see :class:`Pretraining`): QuickGELU for
    tags trained with it and for OpenAI's own checkpoint files, and the tag's (or the file's)
    image preprocessing.

    ``trim_text``: cut tokens to the longest caption of each batch where that leaves the
    features unchanged (see :func:`trim_text_context`); otherwise open_clip's full context."""
    import open_clip

    if arch.endswith(".json"):
        config = Path(arch).expanduser()
        if not config.is_file():
            raise ModelSpecError(f"open_clip model config {config} does not exist")
        open_clip.add_model_config(config)
        arch = config.stem
    if arch == "hf-hub":  # open_clip's own prefix for a model fetched by its hub name
        raise ModelSpecError(
            f"open_clip:{arch}:... downloads the model from the Hugging Face hub, which flyp "
            "does not reach (runs must work offline); download it once elsewhere and pass the "
            "files: open_clip:ARCH:/path/to/open_clip_pytorch_model.bin (its open_clip_config.json "
            "names ARCH), or hf:/path/to/folder for a transformers CLIP/SigLIP folder"
        )
    if arch not in open_clip.list_models():
        raise ModelSpecError(f"open_clip has no architecture '{arch}'; see open_clip.list_models()")
    pretrained, online = _resolve_pretrained(arch, weights)
    spec = f"open_clip:{arch}:{weights}" if weights else f"open_clip:{arch}"
    with nullcontext() if online else _hub_offline():
        try:
            openai_state = None
            if not weights:
                settings = Pretraining()
            elif _is_file_spec(weights):
                path = Path(weights).expanduser()
                openai_state = openai_state_dict(path) if pretrained else None
                settings = file_pretraining(arch, path, openai=openai_state is not None)
            else:
                settings = tag_pretraining(arch, weights)
            model, train_tf, eval_tf = open_clip.create_model_and_transforms(
                arch,
                pretrained=None if openai_state is not None else pretrained,
                pretrained_text=openai_state is None,  # no hub download for OpenAI's files
                force_image_size=image_size,
                force_quick_gelu=settings.quick_gelu,
                image_mean=settings.preprocess.get("mean"),
                image_std=settings.preprocess.get("std"),
                image_interpolation=settings.preprocess.get("interpolation"),
                image_resize_mode=settings.preprocess.get("resize_mode"),
            )
            if openai_state is not None:
                _load_openai_state(model, openai_state)
        except Exception as err:
            if pretrained is None or online:
                raise
            what = (
                Path(pretrained).name
                if _is_file_spec(weights)
                else f"the cached '{weights}' weights"
            )
            raise ModelSpecError(
                f"{spec}: {what} is not a checkpoint of {arch} ({_reason(err)}); "
                f"pass a file saved from {arch}, or the architecture the file was saved from"
            ) from None
        try:
            tokenizer = open_clip.get_tokenizer(arch)
        except Exception as err:
            if online:
                raise
            raise ModelSpecError(
                f"{spec}: the tokenizer of {arch} is not in the local cache ({_reason(err)}); "
                "load the model once where the hub is reachable"
            ) from None
    if trim_text:
        tokenizer = trim_text_context(model, tokenizer)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    loss = "siglip" if getattr(model, "logit_bias", None) is not None else "clip"
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
