"""Several processes through torchrun: the process group, the device, gathered features, gradients.

``torchrun --nproc_per_node=N -m flyp finetune ...`` runs N copies of the same loop. Each rank
reads its share of every global batch (``EpochSampler(rank, world)``), and the contrastive loss
is taken over the *global* batch: image and text features (and labels, for the collision
variants) are all-gathered, the features with gradients.

Gradient scale. Every rank computes the same full loss L over the gathered batch (open_clip's
``local_loss=False``). ``all_gather``'s backward sums, for each rank's rows, the gradients every
rank sends back, so rank r holds ``world * dL/df_r`` for its own features f_r. Averaging the
parameter gradients over ranks then gives ``sum_r dL/df_r * df_r/dθ = dL/dθ``: exactly the
single-process gradient. The logit scale gets ``dL/ds`` on every rank; the average keeps it.
Cross-entropy methods need no gather: the average of per-rank means is the global mean.

Why a flat all-reduce instead of DistributedDataParallel: the gradient cache runs one backward
per chunk and the towers are called through ``encode_image``/``encode_text``, not ``forward``;
DDP's reducer expects one ``forward`` per backward (and ``find_unused_parameters`` for a frozen
tower). One all-reduce of the flattened gradients after the step is the same average, works with
any number of backward passes, and costs one collective per step (no overlap with backward,
which matters little on one node at these model sizes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(device: str, local_rank: int = 0) -> torch.device:
    """"auto": this process's GPU when there is one, else the CPU; or any torch device name."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    chosen = torch.device(device)
    if chosen.type == "cuda" and chosen.index is None:
        chosen = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return chosen


def init_distributed(device: str = "auto") -> DistEnv:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (nccl on CUDA, gloo on CPU).

    A group already initialised by the caller (tests spawn their own) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        return DistEnv(rank, world, local_rank, pick_device(device, local_rank))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world > 1:
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, chosen)


def gather_batch(
    image_features: Tensor, text_features: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank's rows, rank by rank; features keep their gradients, labels need none."""
    from torch.distributed.nn.functional import all_gather

    images = torch.cat(all_gather(image_features), dim=0)
    texts = torch.cat(all_gather(text_features), dim=0)
    gathered = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, labels.contiguous())
    return images, texts, torch.cat(gathered)


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """Mean of every gradient over ranks, in one flat all-reduce (the same parameters hold
    gradients on every rank, since every rank runs the same code)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or world == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (same start, same BN statistics)."""
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            staged = tensor.data.contiguous()  # collectives need the default layout
            dist.broadcast(staged, src)
            tensor.data.copy_(staged)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
