"""One training step's forward and backward: mixed precision, micro-batches, gradient cache.

The contrastive loss couples every pair of the batch, so it cannot be split into independent
micro-batches the way cross-entropy can. The gradient cache (Gao et al., 2021) keeps the loss
exact while holding only one micro-batch of activations:

1. embed the batch chunk by chunk under ``no_grad`` (saving each chunk's RNG state);
2. take the loss over all embeddings, with gradients w.r.t. the embeddings (and the scale);
3. re-run each chunk with gradients, RNG restored so dropout draws the same masks, and
   backpropagate the cached embedding gradients through it.

The gradients equal those of the full batch, up to float rounding. Layers that couple the
samples of a batch (BatchNorm in train mode) would see chunks, not the batch: keep BN frozen.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from flyp.methods import (
    Classifier,
    LossContext,
    Method,
    caption_ids,
    compute_loss,
    contrastive_loss,
    distinct_captions,
)
from flyp.precision import autocast

Gather = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


@dataclass
class RngState:
    """The generators a forward pass may draw from (dropout): CPU, and the GPU in use."""

    cpu: Tensor
    cuda: Any = None
    device: torch.device | None = None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        if device.type == "cuda":
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device), device)
        return cls(torch.get_rng_state())

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def chunks(n: int, micro_batch: int | None) -> list[slice]:
    size = n if not micro_batch or micro_batch >= n else micro_batch
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _through(ddp: DistributedDataParallel | None, work: Callable[[], Any]) -> Any:
    """``work()``, as the forward of DDP's wrapper when there is one (flyp.distributed.Through),
    so that DDP all-reduces the gradients of the backward that follows."""
    return work() if ddp is None else ddp(work)


def _syncing(ddp: DistributedDataParallel | None, last: bool) -> contextlib.AbstractContextManager:
    """Every chunk but the last accumulates its gradients locally (DDP's ``no_sync``); the last
    chunk's backward all-reduces the sum, overlapped with that backward."""
    return ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext()


def forward_backward(
    method: Method,
    classifier: Classifier,
    images: Tensor,
    labels: Tensor,
    seeds: Tensor,
    step: int,
    ctx: LossContext,
    *,
    micro_batch: int | None = None,
    precision: str = "fp32",
    gather: Gather | None = None,
    ddp: DistributedDataParallel | None = None,
) -> Tensor:
    """Accumulate the step's gradients into ``.grad``; return the loss (detached, on the device).

    ``labels`` and ``seeds`` are the loader's, on the host: captions are built from them there
    and the labels are moved to the device here, so that a step never waits for the device
    (nor does the caller: it reads the loss back only when it logs, see ``train.log_every``).
    ``gather`` (see :func:`flyp.distributed.gather_batch`) makes the contrastive loss global
    over processes; cross-entropy losses are per-sample means and need none. ``ddp`` (see
    :func:`flyp.distributed.ddp_for`) averages the gradients over processes as they are made.
    """
    if method.objective == "contrastive":
        return _contrastive(
            classifier, images, labels, seeds, ctx, micro_batch, precision, gather, ddp
        )
    labels = labels.to(images.device, non_blocking=True)
    # Means over samples: accumulate chunk losses weighted by their share of the batch.
    total = torch.zeros((), device=images.device)
    n = len(labels)
    parts = chunks(n, micro_batch)
    for i, part in enumerate(parts):
        work = partial(
            compute_loss, method, classifier, images[part], labels[part], seeds[part], step, ctx
        )
        with _syncing(ddp, i == len(parts) - 1):
            with autocast(images.device, precision):
                loss = _through(ddp, work)
            share = (part.stop - part.start) / n
            (loss.float() * share).backward()
        total += loss.detach().float() * share
    return total


def spread(n: int, parts: int) -> list[slice]:
    """``n`` items in ``parts`` consecutive slices as even as can be, the larger (and, where
    ``n < parts``, the non-empty) ones last: the last chunk, whose backward DDP all-reduces,
    then always holds captions, so each trainable text parameter has its gradient there."""
    sizes = [n // parts + (i >= parts - n % parts) for i in range(parts)]
    ends = [sum(sizes[: i + 1]) for i in range(parts)]
    return [slice(end - size, end) for size, end in zip(sizes, ends, strict=True)]


def _contrastive(
    classifier: Classifier,
    images: Tensor,
    labels: Tensor,
    seeds: Tensor,
    ctx: LossContext,
    micro_batch: int | None,
    precision: str,
    gather: Gather | None,
    ddp: DistributedDataParallel | None,
) -> Tensor:
    """The contrastive step. Captions come from the run's token table (no tokenizer call): the
    batch's distinct captions are encoded once each (``train.unique_captions``), in as many
    chunks as the images, chunk ``i`` of each in one forward."""
    model = classifier.model
    device = images.device
    distinct, where = distinct_captions(caption_ids(labels, seeds, ctx), ctx.unique_captions)
    tokens = ctx.caption_table()[distinct]  # on the host, as the labels
    at = None if where is None else where.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    parts = chunks(len(labels), micro_batch)
    text_parts = spread(len(distinct), len(parts))

    def embed(i: int) -> tuple[Tensor, Tensor | None]:
        with autocast(device, precision):
            image = model.encode_image(images[parts[i]])
            mine = tokens[text_parts[i]]
            text = model.encode_text(mine.to(device, non_blocking=True)) if len(mine) else None
        return image.float(), None if text is None else text.float()  # the loss in fp32

    def per_sample(text: Tensor) -> Tensor:
        return text if at is None else text[at]

    if len(parts) == 1:
        image, text = _through(ddp, partial(embed, 0))
        loss = contrastive_loss(image, per_sample(text), model, labels, ctx, gather=gather)
        loss.backward()
        return loss.detach()

    states, image_parts, text_chunks = [], [], []
    with torch.no_grad():
        for i in range(len(parts)):
            states.append(RngState.capture(device))
            image, text = embed(i)
            image_parts.append(image)
            if text is not None:
                text_chunks.append(text)
    after = RngState.capture(device)
    image = torch.cat(image_parts).requires_grad_()
    text = torch.cat(text_chunks).requires_grad_()
    loss = contrastive_loss(image, per_sample(text), model, labels, ctx, gather=gather)
    loss.backward()  # gradients of the embeddings, and of the scale (and bias)
    for i, state in enumerate(states):
        state.restore()
        with _syncing(ddp, i == len(parts) - 1):
            image_out, text_out = _through(ddp, partial(embed, i))
            pairs = [(image_out, image.grad[parts[i]])]
            if text_out is not None:
                pairs.append((text_out, text.grad[text_parts[i]]))
            pairs = [(o, g) for o, g in pairs if o.requires_grad]  # a frozen tower gives none
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    after.restore()
    return loss.detach()
