"""The finetuning methods, as declarations over one shared training loop.

A method says what trains (image tower, text tower, a linear head), which loss it minimises
and how its classifier head is made. The loop in :mod:`flyp.train` does the rest.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flyp.errors import RecipeError
from flyp.heads import zeroshot_weights
from flyp.losses import clip_loss, siglip_loss
from flyp.models.base import prefers_channels_last, to_model_layout


@dataclass(frozen=True)
class Method:
    name: str
    objective: str  # "none", "contrastive", "ce-head" (linear head), "ce-both" (class prompts)
    train_text: bool = True
    linear_head: bool = False
    l2sp: bool = False
    lipsum: bool = False  # Lipsum-FT's random-text regulariser (train.lipsum_weight)
    probe: bool = False  # start from a linear probe fitted on frozen features (lp, lpft)
    collisions: str | None = None  # overrides train.collisions (FLYP's collision ablations)
    summary: str = ""


_ALL = [
    Method("zeroshot", "none", summary="no training: the pretrained model's zero-shot head"),
    Method("flyp", "contrastive", summary="contrastive loss on captions of labels, both towers"),
    Method("flyp-image-only", "contrastive", train_text=False, summary="FLYP, text tower frozen"),
    Method("flyp-mask", "contrastive", collisions="mask", summary="FLYP, same-class captions masked"),
    Method("flyp-soft", "contrastive", collisions="soft", summary="FLYP, same-class soft positives"),
    Method("ft", "ce-head", train_text=False, linear_head=True, summary="CE, image tower + head"),
    Method("l2sp", "ce-head", train_text=False, linear_head=True, l2sp=True, summary="ft + L2-SP"),
    Method(
        "lipsum-ft",
        "ce-head",
        train_text=False,
        linear_head=True,
        lipsum=True,
        summary="ft + Lipsum-FT (image-text scores on random texts kept)",
    ),
    Method("lp", "none", train_text=False, linear_head=True, probe=True, summary="linear probe"),
    Method("lpft", "ce-head", train_text=False, linear_head=True, probe=True, summary="lp, then ft"),
    Method("ce-both", "ce-both", summary="CE over class prompts through both towers"),
]
METHODS: dict[str, Method] = {m.name: m for m in _ALL}


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise RecipeError(
            f"unknown method '{name}'{hint} (train.method / --methods); known: {', '.join(METHODS)}"
        )
    return METHODS[name]


def _reached_by(model: nn.Module, encode: Callable[[], Tensor]) -> set[str]:
    """Names of the parameters (the scale aside) that ``encode()`` depends on, found by one
    backward pass in eval mode; the model's requires_grad flags and mode are put back."""
    named = [(n, p) for n, p in model.named_parameters() if not is_scale_param(n)]
    was_training, flags = model.training, [p.requires_grad for _, p in named]
    model.eval()
    for _, p in named:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            out = encode().float().sum()
            grads = torch.autograd.grad(out, [p for _, p in named], allow_unused=True)
    finally:
        for (_, p), flag in zip(named, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return {n for (n, _), g in zip(named, grads, strict=True) if g is not None}


def image_tower_names(model: nn.Module, image_size: int) -> set[str]:
    """Names of the parameters ``encode_image`` depends on, found by one backward pass, so no
    naming convention is needed (the default model's bridge sits outside ``visual``)."""
    device = model.logit_scale.device
    probe = torch.zeros(1, 3, image_size, image_size, device=device)
    return _reached_by(model, lambda: model.encode_image(probe))


def text_tower_names(model: nn.Module, tokenizer: Callable) -> set[str]:
    """Names of the parameters ``encode_text`` depends on, found as :func:`image_tower_names`
    does: a text-side parameter ``encode_text`` never reaches (a captioner's decoder, say) is
    not trained, so that every trainable parameter has a gradient at every step (DDP is then
    built without searching the graph for unused ones)."""
    tokens = tokenizer(["a photo of a thing."]).to(model.logit_scale.device)
    return _reached_by(model, lambda: model.encode_text(tokens))


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """A region where autocast is off (logits and losses in fp32)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def is_scale_param(name: str) -> bool:
    return name in ("logit_scale", "logit_bias")


def normalized_image_features(model: nn.Module, images: Tensor, channels_last: bool) -> Tensor:
    images = to_model_layout(images.to(model.logit_scale.device, non_blocking=True), channels_last)
    features = model.encode_image(images)
    with full_precision(features.device):
        return F.normalize(features.float(), dim=-1)


class Classifier(nn.Module):
    """Images -> class logits: the two-tower model with either the zero-shot head of its own
    text tower (rebuilt by :meth:`refresh_text_head`) or a trained linear head."""

    def __init__(self, model: nn.Module, head: nn.Linear | None = None):
        super().__init__()
        self.model = model
        self.head = head
        self.text_head: Tensor | None = None
        self.channels_last = prefers_channels_last(model)

    def refresh_text_head(
        self, tokenizer: Callable, class_names: list[str], templates: list[str]
    ) -> None:
        self.text_head = zeroshot_weights(self.model, tokenizer, class_names, templates)

    def image_features(self, images: Tensor) -> Tensor:
        """The unit-length fp32 image features the heads score."""
        return normalized_image_features(self.model, images, self.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        return self.logits(self.image_features(images))

    def logits(self, features: Tensor) -> Tensor:
        """Class logits of unit-length image features (what :meth:`image_features` returns)."""
        # The logits in fp32 even under bf16 autocast: cross-entropy and argmax over classes
        # whose scores differ in the third decimal need the precision.
        with full_precision(features.device):
            if self.head is not None:
                return self.head(features)
            if self.text_head is None:
                raise RuntimeError(
                    "call refresh_text_head() before classifying with the zero-shot head"
                )
            return self.model.logit_scale.float().exp() * features @ self.text_head.float().t()


@dataclass
class LossContext:
    tokenizer: Callable
    class_names: list[str]
    templates: list[str]
    loss_kind: str = "clip"  # "clip" (InfoNCE) or "siglip"
    collisions: str = "none"
    l2sp_weight: float = 0.0
    unique_captions: bool = True  # encode each distinct caption of a batch once
    theta0: dict[str, Tensor] = field(default_factory=dict)
    # Lipsum-FT: the frozen pretrained model, the weight and count of random texts, and the
    # run's seed (the texts are drawn from (seed, step)); set by flyp.train for lipsum-ft only.
    reference: nn.Module | None = None
    lipsum_weight: float = 0.0
    lipsum_texts: int = 80
    lipsum_text: str = "tokens"  # "tokens": random token ids (the official code); "words"
    seed: int = 0
    # (step, text features): micro-batch chunks of one step reuse the step's text features
    lipsum_cache: tuple[int, Tensor] | None = None
    # the tokens of every (class, template) caption, row label * len(templates) + template:
    # tokenized once per run (caption_table), indexed at each step
    table: Tensor | None = field(default=None, repr=False)

    def caption_table(self) -> Tensor:
        """Every caption a step can draw, tokenized once: row ``label * T + template``."""
        if self.table is None:
            texts = [t.format(name) for name in self.class_names for t in self.templates]
            self.table = self.tokenizer(texts)
        return self.table


def build_classifier(method: Method, model: nn.Module, ctx: LossContext) -> Classifier:
    head = None
    if method.linear_head:
        weights = zeroshot_weights(model, ctx.tokenizer, ctx.class_names, ctx.templates)
        head = nn.Linear(weights.shape[1], weights.shape[0], device=weights.device)
        with torch.no_grad():
            head.weight.copy_(weights * model.logit_scale.exp().detach())
            head.bias.zero_()
    return Classifier(model, head)


def set_trainable(
    method: Method, classifier: Classifier, image_names: set[str], text_names: set[str]
) -> None:
    """What the method trains: the image tower, the text tower where the method says so, the
    scale for the losses that use it. ``image_names``/``text_names``: the parameters each
    tower's encoder reaches (:func:`image_tower_names`, :func:`text_tower_names`); any other
    parameter of the model is left frozen, as no loss could give it a gradient."""
    for name, p in classifier.model.named_parameters():
        if is_scale_param(name):
            p.requires_grad_(method.objective in ("contrastive", "ce-both"))
        else:
            p.requires_grad_(name in image_names or method.train_text and name in text_names)


def captions_for(labels: Tensor, seeds: Tensor, ctx: LossContext) -> list[str]:
    """One caption per sample; the template is drawn from the sample's own seed.

    ``labels`` and ``seeds`` are the loader's, on the host: read there in one go, where a GPU
    tensor read element by element would make the host wait for the device once per sample."""
    n = len(ctx.templates)
    return [
        ctx.templates[s % n].format(ctx.class_names[y])
        for y, s in zip(labels.tolist(), seeds.tolist(), strict=True)
    ]


def caption_ids(labels: Tensor, seeds: Tensor, ctx: LossContext) -> Tensor:
    """Each sample's row of :meth:`LossContext.caption_table`: its label's captions, the
    template drawn from its own seed (as :func:`captions_for`). Host tensors in, host out."""
    n = len(ctx.templates)
    return labels.long() * n + seeds.long().remainder(n)


def distinct_captions(ids: Tensor, unique: bool) -> tuple[Tensor, Tensor | None]:
    """The captions a step encodes, and where each sample's caption is among them (None: one
    encoding per sample). With ``unique`` each distinct caption of the whole batch is encoded
    once; a sort of integer ids on the host, no tokenizer and no comparison of token rows."""
    if not unique:
        return ids, None
    distinct, where = torch.unique(ids, return_inverse=True)
    return (distinct, where) if len(distinct) < len(ids) else (ids, None)


def contrastive_loss(
    image_features: Tensor,
    text_features: Tensor,
    model: nn.Module,
    labels: Tensor,
    ctx: LossContext,
    gather: Callable | None = None,
) -> Tensor:
    """``gather`` (flyp.distributed.gather_batch) takes the loss over every process's batch."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    if gather is not None:  # the labels only where collision handling reads them
        needed = labels if ctx.collisions != "none" else None
        image_features, text_features, labels = gather(image_features, text_features, needed)
    scale = model.logit_scale.exp()
    if ctx.loss_kind == "siglip":
        return siglip_loss(
            image_features, text_features, scale, model.logit_bias, labels, ctx.collisions
        )
    return clip_loss(image_features, text_features, scale, labels, ctx.collisions)


def l2sp_penalty(model: nn.Module, theta0: dict[str, Tensor]) -> Tensor:
    """Squared distance of the trained weights from ``theta0`` (the pretrained ones)."""
    terms = [
        (p - theta0[name]).pow(2).sum()
        for name, p in model.named_parameters()
        if p.requires_grad and name in theta0
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` in eval mode (Lipsum-FT's θ0): one more model in memory.

    Made before ``torch.compile`` wraps the towers, so the copy holds plain modules. Whatever
    the model carries, the copy never calls it: an instance-level wrapper of a method (what
    ``torch.compile`` puts on the model, a patched ``encode_image``) is a function a deep copy
    shares, still bound to ``model``. The copy gets the wrapped method bound to itself instead,
    or, where none can be found, its class's own method.
    """
    memo: dict[int, Any] = {}
    reference = copy.deepcopy(model, memo).eval()
    for original, copied in zip(model.modules(), reference.modules(), strict=True):
        for name, value in list(vars(copied).items()):
            shared = value is vars(original).get(name) and hasattr(type(copied), name)
            if not shared or not callable(value) or isinstance(value, nn.Module):
                continue
            inner = inspect.unwrap(value)
            if isinstance(inner, types.MethodType) and id(inner.__self__) in memo:
                setattr(copied, name, types.MethodType(inner.__func__, memo[id(inner.__self__)]))
            else:
                delattr(copied, name)
    reference.requires_grad_(False)
    return reference


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _text_generator(seed: int, step: int) -> torch.Generator:
    """The random texts' own stream, the same for the same (seed, step) so that a resumed run
    replays them; it leaves the global stream (dropout, augmentation) untouched."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)


TOKEN_LENGTH = 8  # random tokens per text (the official code's token_length)
PLACEHOLDER = "x"  # one token in every tokenizer flyp wraps; marks where the random ids go


def _ordinary_ids(tokenizer: Callable) -> Tensor:
    """The ids a random token may take: the tokenizer's vocabulary without its special tokens
    (start, end, padding, unknown, mask), as the official code draws from [0, 49406) for
    CLIP: id 0 ("!" in CLIP's vocabulary) is drawn where it is an ordinary token. flyp's
    wrappers keep the library's tokenizer (Hugging Face, open_clip) as ``.tokenizer``."""
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    size = getattr(inner, "vocab_size", None)
    if not isinstance(size, int):
        raise RecipeError(
            f"train.lipsum_text=tokens draws token ids, but the tokenizer {type(inner).__name__} "
            "does not give its vocabulary size; set train.lipsum_text=words"
        )
    special = torch.tensor(sorted(getattr(inner, "all_special_ids", [])), dtype=torch.long)
    ids = torch.arange(size)
    return ids[~torch.isin(ids, special)]


def random_token_ids(tokenizer: Callable, count: int, seed: int, step: int) -> Tensor:
    """``count`` texts of ``TOKEN_LENGTH`` token ids drawn uniformly from the vocabulary (no
    special tokens), framed as the tokenizer frames a caption: CLIP's [start] ids [end], BERT's
    [CLS] ids [SEP], padded as its captions are. This is the official Lipsum-FT input
    (github.com/cs-giung/lipsum-ft: 8 ids in [0, 49406) between CLIP's start and end tokens).

    The framing comes from the tokenizer itself: it tokenizes ``TOKEN_LENGTH`` placeholder
    words, whose ids are then replaced by the random ones.
    """
    ids = _ordinary_ids(tokenizer)
    tokens = tokenizer([" ".join([PLACEHOLDER] * TOKEN_LENGTH)] * count).clone()
    placeholder = torch.isin(tokens, ids)  # every token but the framing and the padding
    if placeholder.sum(dim=1).ne(TOKEN_LENGTH).any():
        raise RecipeError(
            f"train.lipsum_text=tokens: the tokenizer does not give {TOKEN_LENGTH} tokens of "
            f"'{PLACEHOLDER}' (a context of {tokens.shape[1]} tokens is too short?); "
            "set train.lipsum_text=words"
        )
    draws = torch.randint(len(ids), (count * TOKEN_LENGTH,), generator=_text_generator(seed, step))
    tokens[placeholder] = ids[draws].to(tokens.dtype)
    return tokens


def random_texts(count: int, seed: int, step: int) -> list[str]:
    """``count`` random texts, the same for the same (seed, step): 1-8 "words" of 2-8 random
    letters each, which the model's own tokenizer turns into (mostly rare, word-piece) tokens
    (``train.lipsum_text=words``; the official code draws token ids: :func:`random_token_ids`).
    """
    g = _text_generator(seed, step)
    texts = []
    for _ in range(count):
        n_words = int(torch.randint(1, 9, (), generator=g))
        lengths = torch.randint(2, 9, (n_words,), generator=g).tolist()
        letters = torch.randint(0, len(LETTERS), (sum(lengths),), generator=g).tolist()
        chars, words = [LETTERS[i] for i in letters], []
        for n in lengths:
            words.append("".join(chars[:n]))
            chars = chars[n:]
        texts.append(" ".join(words))
    return texts


def lipsum_text_features(step: int, ctx: LossContext, device: torch.device) -> Tensor:
    """Unit-length fp32 text features of the step's random texts, from the frozen text tower."""
    if ctx.lipsum_cache is not None and ctx.lipsum_cache[0] == step:
        return ctx.lipsum_cache[1]
    if ctx.lipsum_text == "words":
        tokens = ctx.tokenizer(random_texts(ctx.lipsum_texts, ctx.seed, step))
    else:
        tokens = random_token_ids(ctx.tokenizer, ctx.lipsum_texts, ctx.seed, step)
    tokens = tokens.to(device, non_blocking=True)  # a blocking copy would wait for the device
    with torch.no_grad():
        text = ctx.reference.encode_text(tokens)
        with full_precision(device):
            text = F.normalize(text.float(), dim=-1)
    ctx.lipsum_cache = (step, text)
    return text


def lipsum_penalty(
    features: Tensor, reference_features: Tensor, text_features: Tensor, scale: Tensor | float
) -> Tensor:
    """Lipsum-FT's regulariser, mean over the batch of Σ_m (v_m − v0_m)² / (2M), with
    v_m = scale · ⟨text_m, image⟩ (the official code scales the scores by the pretrained
    temperature, as the zero-shot logits are)."""
    diff = scale * (features - reference_features) @ text_features.t()
    return diff.pow(2).sum(dim=-1).div(2 * text_features.shape[0]).mean()


def compute_loss(
    method: Method,
    classifier: Classifier,
    images: Tensor,
    labels: Tensor,
    seeds: Tensor,
    step: int,
    ctx: LossContext,
) -> Tensor:
    model = classifier.model
    if method.objective == "contrastive":
        distinct, where = distinct_captions(caption_ids(labels, seeds, ctx), ctx.unique_captions)
        tokens = ctx.caption_table()[distinct].to(images.device, non_blocking=True)
        text = model.encode_text(tokens)
        if where is not None:
            text = text[where.to(images.device, non_blocking=True)]
        labels = labels.to(images.device, non_blocking=True)
        return contrastive_loss(model.encode_image(images), text, model, labels, ctx)
    if method.objective == "ce-head":
        if not method.lipsum:
            loss = F.cross_entropy(classifier(images), labels)
        else:  # the features once: for the head and for the regulariser
            if ctx.reference is None:
                raise RuntimeError("lipsum-ft needs ctx.reference, the frozen pretrained model")
            features = classifier.image_features(images)
            with full_precision(features.device):
                loss = F.cross_entropy(classifier.head(features), labels)
            with torch.no_grad():
                reference = normalized_image_features(
                    ctx.reference, images, prefers_channels_last(ctx.reference)
                )
            text = lipsum_text_features(step, ctx, features.device)
            with full_precision(features.device):
                scale = ctx.reference.logit_scale.float().exp()
                loss = loss + ctx.lipsum_weight * lipsum_penalty(features, reference, text, scale)
        if method.l2sp:
            loss = loss + ctx.l2sp_weight * l2sp_penalty(model, ctx.theta0)
        return loss
    if method.objective == "ce-both":
        g = torch.Generator().manual_seed(step)
        picks = torch.randint(0, len(ctx.templates), (len(ctx.class_names),), generator=g).tolist()
        prompts = [ctx.templates[t].format(c) for t, c in zip(picks, ctx.class_names, strict=True)]
        text = model.encode_text(ctx.tokenizer(prompts).to(images.device, non_blocking=True))
        image = model.encode_image(images)
        with full_precision(images.device):  # the logits in fp32
            text, image = F.normalize(text.float(), dim=-1), F.normalize(image.float(), dim=-1)
            return F.cross_entropy(model.logit_scale.float().exp() * image @ text.t(), labels)
    raise ValueError(f"method '{method.name}' does not train")
