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
    captions_for,
    compute_loss,
    contrastive_loss,
    encode_captions,
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
    model = classifier.model
    device = images.device
    tokens = ctx.tokenizer(captions_for(labels, seeds, ctx))  # on the host, as the labels
    labels = labels.to(device, non_blocking=True)
    parts = chunks(len(labels), micro_batch)

    def embed(part: slice) -> tuple[Tensor, Tensor]:
        with autocast(device, precision):
            image = model.encode_image(images[part])
            text = encode_captions(model, tokens[part], ctx.unique_captions, device)
        return image.float(), text.float()  # the loss in fp32

    if len(parts) == 1:
        image, text = _through(ddp, partial(embed, parts[0]))
        loss = contrastive_loss(image, text, model, labels, ctx, gather=gather)
        loss.backward()
        return loss.detach()

    states, image_parts, text_parts = [], [], []
    with torch.no_grad():
        for part in parts:
            states.append(RngState.capture(device))
            image, text = embed(part)
            image_parts.append(image)
            text_parts.append(text)
    after = RngState.capture(device)
    image = torch.cat(image_parts).requires_grad_()
    text = torch.cat(text_parts).requires_grad_()
    loss = contrastive_loss(image, text, model, labels, ctx, gather=gather)
    loss.backward()  # gradients of the embeddings, and of the scale (and bias)
    for i, (part, state) in enumerate(zip(parts, states, strict=True)):
        state.restore()
        with _syncing(ddp, i == len(parts) - 1):
            pairs = [
                (out, cached.grad[part])
                for out, cached in zip(
                    _through(ddp, partial(embed, part)), (image, text), strict=True
                )
                if out.requires_grad  # a frozen tower gives nothing to backpropagate
            ]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    after.restore()
    return loss.detach()
