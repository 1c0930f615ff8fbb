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

The average is PyTorch's own DistributedDataParallel (:func:`ddp_for`): bucketed all-reduces
that overlap the backward pass. DDP's reducer is prepared by ``forward`` and expects one forward
per synchronised backward, while flyp calls the towers through ``encode_image``/``encode_text``
and the gradient cache runs one backward per chunk. So the step's work (a chunk's embeddings, or
a cross-entropy chunk's loss) runs as the ``forward`` of a small wrapper (:class:`Through`), every
chunk but the last under ``no_sync`` (its gradients accumulate locally, the last chunk's backward
all-reduces the sum), and the gradient cache's gradient-free first pass bypasses DDP. Frozen
parameters are not DDP's; every trainable parameter is used at every step (no unused-parameter search).
The logit scale (and SigLIP's bias) is left out of DDP: it is used outside the wrapper's forward
(in the loss over the gathered batch), and is averaged by hand (:func:`average_gradients`).
Buffers are not broadcast by DDP; BatchNorm in train mode gets rank 0's statistics after each
step. On 2 gloo CPU processes DDP was not slower than the flat all-reduce of every gradient after
the step that it replaced (benchmarks/ddp_vs_flat.py; figures in docs/scale_and_speed.md).

Evaluation is shared: every rank scores its own contiguous block of each evaluation set
(:func:`eval_shard`, :func:`shard_bounds`), the validation logits are gathered for the
temperature fit and then a few numbers per example (prediction, label, confidence, NLL), so every
rank computes the metrics of the whole set, in one process's order, and no rank waits longer
than its own share. Every decision read from or written to the output folder happens on rank 0
alone (:func:`on_main`): which runs are finished, the best epoch kept, the metrics, WiSE-FT's
alpha and the soups written, the sweep's choice and the report. The other ranks wait at an
explicit barrier, bounded by the process group's timeout (``train.dist_timeout_s``), then get
rank 0's answer by broadcast, so every rank takes the same branch. Evaluation called inside such
work (nothing in flyp does) scores every set alone, since the other ranks are not there to help.
The output folder must be one every node sees (as resuming already needs): each rank reads the
checkpoint to resume from there, and the weights it evaluates. Work on a node's own disk that every rank needs, the image
check, runs once per node (:func:`on_node_main`): local rank 0 works, its node's ranks get its
answer. Numbers equal a single process's to float rounding: the global
batch, its order and the averaged gradient are the same (see above), and evaluation is the same
code on the same weights.
"""

from __future__ import annotations

import atexit
import os
import pickle
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flyp.errors import RunError


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


def _check_one_gpu_per_rank(device: str, ranks_here: int) -> None:
    """``cuda:N`` names one GPU: several ranks of a node would all take it (NCCL then fails
    with "Duplicate GPU detected"), so it is refused where more than one rank runs here."""
    if ranks_here > 1 and device.startswith("cuda:"):
        raise RunError(
            f"train.device={device} under torchrun would put all {ranks_here} ranks of this "
            "node on one GPU; use train.device=cuda (or auto): each rank takes the GPU of its "
            "LOCAL_RANK, and CUDA_VISIBLE_DEVICES chooses which GPUs the node uses"
        )


# How long a rank may wait in a collective (recipe key train.dist_timeout_s): long enough for
# rank 0 to evaluate every set of a large benchmark while the others wait at a barrier.
DEFAULT_TIMEOUT_S = 1800.0


def init_distributed(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistEnv:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (nccl on CUDA, gloo on CPU).

    ``timeout_s`` bounds every wait in a collective (NCCL's watchdog ends a process that waits
    longer); on CUDA the group is bound to this process's GPU (``device_id``), so that NCCL
    connects eagerly and a barrier knows its device. A group already initialised by the caller
    (tests spawn their own) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        _check_one_gpu_per_rank(device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        return DistEnv(rank, world, local_rank, pick_device(device, local_rank))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _check_one_gpu_per_rank(device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world > 1:
        options: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
            options["device_id"] = chosen
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo", **options)
        global _started
        _started = True
        atexit.register(end_distributed)  # the group flyp started, flyp ends
    return DistEnv(rank, world, local_rank, chosen)


_started = False  # whether init_distributed started the process group (then flyp ends it)


def end_distributed(together: bool = False) -> None:
    """End the process group at the program's exit (registered by :func:`init_distributed`
    when it started the group; a caller's own group is the caller's to end).

    ``together`` (a verb that finished, :func:`flyp.cli.main`): every rank first waits at a
    barrier, so that no rank tears its connections down while another is still at work (rank 0
    writing a sweep's results while rank 1 had already left): with gloo, a rank ending its group
    alone was aborted ("terminate called without an active exception") in 3 of 16 runs of the
    two-node sweep test, after its work was done; with the barrier first, 0 of 38. Not after a
    failure: the other ranks may never reach the barrier.

    A process that exits with its group alive leaves the group's teardown to the interpreter's
    last moments: with gloo that aborted a rank (SIGABRT, "terminate called without an active
    exception") in 7 of 30 two-rank runs, after its work was done, so torchrun reported a
    finished run as failed; with ``destroy_process_group`` first, 0 of 30 (each way of ending
    measured on this 2-core machine). NCCL warns "destroy_process_group() was not called
    before program exit" otherwise."""
    if not (_started and dist.is_available() and dist.is_initialized()):
        return
    if together:
        dist.barrier()
    dist.destroy_process_group()


def gather_batch(
    image_features: Tensor, text_features: Tensor, labels: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Every rank's rows, rank by rank; features keep their gradients, labels need none. Labels
    travel only where the loss reads them (``None``: not gathered, None returned)."""
    from torch.distributed.nn.functional import all_gather

    images = torch.cat(all_gather(image_features), dim=0)
    texts = torch.cat(all_gather(text_features), dim=0)
    if labels is None:
        return images, texts, None
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


class Through(nn.Module):
    """Runs ``work()`` as its ``forward``: what DDP needs to prepare its reducer for a backward,
    whatever the work calls (``encode_image``, ``encode_text``, a method's loss)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, work: Callable[[], Any]) -> Any:
        return work()


def ddp_for(
    classifier: nn.Module, device: torch.device
) -> tuple[DistributedDataParallel | None, list[nn.Parameter]]:
    """DDP over the classifier's trainable parameters, and the ones left to :func:`average_gradients`
    (the logit scale and bias). Built once per run; the classifier itself is not replaced, so
    evaluation, checkpoints and state dicts see the same module and keys as in one process."""
    from flyp.methods import is_scale_param

    trainable = [(n, p) for n, p in classifier.named_parameters() if p.requires_grad]
    scales = {n for n, _ in classifier.named_parameters() if is_scale_param(n.split(".")[-1])}
    by_hand = [p for n, p in trainable if n in scales]
    if len(by_hand) == len(trainable):  # nothing for DDP (it refuses a module without any)
        return None, by_hand
    through = Through(classifier)
    ignored = [f"classifier.{n}" for n in scales]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(through, ignored)
    ddp = DistributedDataParallel(
        through,
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=False,  # BatchNorm statistics: broadcast_buffers after the step
        gradient_as_bucket_view=True,
        # Every trainable parameter has a gradient at every step (flyp.methods.set_trainable
        # trains only what the towers' encoders reach, and each method's loss uses its towers
        # and head): no search of the graph for unused ones after each forward.
        find_unused_parameters=False,
    )
    return ddp, by_hand


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) to every rank."""
    with torch.no_grad():
        for tensor in module.buffers():
            staged = tensor.data.contiguous()  # collectives need the default layout
            dist.broadcast(staged, src)
            tensor.data.copy_(staged)


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


def _several() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Whether this process writes: rank 0, or the only process."""
    return not _several() or dist.get_rank() == 0


T = TypeVar("T")


# Set while rank 0 (or a node's local rank 0) does work the other ranks wait for: evaluation
# called from there cannot ask the other ranks for their shards, so it scores every set alone.
_alone = False


@contextmanager
def _working_alone():
    global _alone
    was, _alone = _alone, True
    try:
        yield
    finally:
        _alone = was


def eval_shard() -> tuple[int, int]:
    """(rank, world) of this process's share of an evaluation: every rank scores its own
    contiguous block of each set (:func:`shard_bounds`) and the per-example results are
    gathered (:func:`gather_in_rank_order`). (0, 1) for one process, and inside :func:`on_main`
    or :func:`on_node_main` work, where the other ranks are not there to help."""
    if not _several() or _alone:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous block [lo, hi) of ``n`` items: the blocks of all ranks, in
    rank order, are the items in order, each once (sizes differ by at most one)."""
    return n * rank // world, n * (rank + 1) // world


def gather_in_rank_order(mine: T) -> list[T]:
    """Every rank's ``mine``, rank by rank, on every rank (``[mine]`` for one process)."""
    rank, world = eval_shard()
    if world == 1:
        return [mine]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


def on_main(work: Callable[[], T]) -> T:
    """``work()`` run by rank 0 alone, its result (or its error) returned (raised) on every rank.

    What writes files or only decides (evaluation, WiSE-FT, soups, reports, "is this run
    finished?") runs once, and every rank goes on with rank 0's answer, so no two ranks take
    different branches around a collective. The other ranks wait at an explicit barrier, within
    the process group's timeout (train.dist_timeout_s), not inside a training collective. An
    error on rank 0 is raised on every rank (the same exception where it pickles), so every
    process ends with the same message instead of waiting for the timeout.
    """
    if not _several():
        return work()
    outcome: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            with _working_alone():
                outcome[0] = ("result", work())
        except BaseException as err:  # Ctrl-C too: the other ranks must not wait for it
            failure = err
            outcome[0] = ("error", _portable(err))
    dist.barrier()
    dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure  # rank 0 keeps its own traceback
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def _portable(err: BaseException) -> BaseException:
    """``err`` itself where it survives pickling, else a RuntimeError that names it."""
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"rank 0 failed: {type(err).__name__}: {err}")


def local_rank() -> int:
    """This process's rank on its node: torchrun's LOCAL_RANK, else its global rank (a group
    started without torchrun is taken as one node), 0 for a single process."""
    if not _several():
        return 0
    return int(os.environ.get("LOCAL_RANK", dist.get_rank()))


def on_node_main(work: Callable[[], T]) -> T:
    """``work()`` run by each node's local rank 0 alone, its result (or its error) returned
    (raised) on every rank of that node.

    For work on the node's own disk and cores that every rank needs the answer of, such as the
    image check: done once per node instead of once per process. The other ranks wait at a
    barrier over the whole group (within train.dist_timeout_s), then take their node's answer
    from an all-gather. torchrun numbers the ranks of a node consecutively, so a node's local
    rank 0 is global rank ``rank - local_rank``.
    """
    if not _several():
        return work()
    mine: Any = None
    failure: BaseException | None = None
    if local_rank() == 0:
        try:
            with _working_alone():
                mine = ("result", work())
        except BaseException as err:  # Ctrl-C too: the node's other ranks must not wait for it
            failure = err
            mine = ("error", _portable(err))
    dist.barrier()
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    if failure is not None:
        raise failure  # the node's rank 0 keeps its own traceback
    kind, value = outcomes[dist.get_rank() - local_rank()]
    if kind == "error":
        raise value
    return value
