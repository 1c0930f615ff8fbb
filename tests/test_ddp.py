"""Gradient communication over processes: PyTorch's DistributedDataParallel (issue 15).

DDP replaced flyp's hand-written flat all-reduce after benchmarks/ddp_vs_flat.py showed it no
slower on 2 gloo CPU processes (figures in docs/scale_and_speed.md). These tests pin the choice
and what it must give: under 2 gloo processes, the gradients after one step equal the 1-process
gradients of the global batch (contrastive with and without the gradient cache, a frozen tower,
cross-entropy in chunks), and a training run wraps its model once in DDP, runs every gradient-
cache chunk but the last under ``no_sync``, and averages only the logit scale by hand.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fakes import leave_process_group, tiny_overrides
from flyp.distributed import average_gradients, ddp_for, gather_batch
from flyp.gradcache import forward_backward
from flyp.methods import (
    LossContext,
    build_classifier,
    frozen_reference,
    get_method,
    image_tower_names,
    set_trainable,
    text_tower_names,
)
from flyp.models import load_model
from flyp.train import freeze_batchnorm_stats

GLOBAL_BATCH = 8
CASES = {
    "plain": {"method": "flyp", "micro_batch": None, "frozen_text": False},
    "gradcache": {"method": "flyp", "micro_batch": 2, "frozen_text": False},  # 2 chunks a rank
    "frozen-text-tower": {"method": "flyp", "micro_batch": None, "frozen_text": True},
    "cross-entropy-chunks": {"method": "ft", "micro_batch": 3, "frozen_text": False},
    # every method that trains, each once: DDP runs without the unused-parameter search, so a
    # trainable parameter a method's loss left without a gradient would leave its bucket
    # unreduced (gradients unlike one process's) and fail the second step
    **{
        name: {"method": name, "micro_batch": None, "frozen_text": False}
        for name in ("flyp-image-only", "flyp-mask", "flyp-soft", "l2sp", "lipsum-ft", "ce-both")
    },
    # a parameter neither encoder reaches (a captioner's decoder) is left frozen
    "unreached-parameter": {"method": "flyp", "micro_batch": 2, "frozen_text": False, "extra": True},
}


def one_step_gradients(case: dict, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
    """This rank's gradients after one step on its share of a fixed global batch: through DDP
    (as flyp.train does) when there are several processes."""
    torch.manual_seed(0)
    bundle = load_model("tiny")
    model = bundle.model
    if case.get("extra"):
        model.decoder = torch.nn.Linear(4, 4)
    method = get_method(case["method"])
    names = ["dog", "horse", "house"]
    ctx = LossContext(bundle.tokenizer, names, ["a photo of a {}."], loss_kind=bundle.loss)
    ctx.collisions = method.collisions or "none"
    if method.l2sp:
        ctx.l2sp_weight = 0.5
    if method.lipsum:
        ctx.reference, ctx.lipsum_weight, ctx.lipsum_texts = frozen_reference(model), 1.0, 4
    classifier = build_classifier(method, model, ctx)
    image_names = image_tower_names(model, bundle.image_size)
    set_trainable(method, classifier, image_names, text_tower_names(model, bundle.tokenizer))
    if case["frozen_text"]:
        for name, p in model.named_parameters():
            if not name.startswith("visual"):
                p.requires_grad_(False)
    side = bundle.image_size
    images = torch.randn(GLOBAL_BATCH, 3, side, side)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0])
    share = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    classifier.train()
    freeze_batchnorm_stats(classifier)  # as train.batchnorm=frozen: per-rank BN would differ
    if method.l2sp:
        ctx.theta0 = {n: p.detach() - 0.01 for n, p in model.named_parameters() if p.requires_grad}
    ddp, by_hand = ddp_for(classifier, images.device) if world > 1 else (None, [])
    assert world == 1 or ddp is not None
    for _ in range(2):  # DDP would refuse a second step after an unreduced first
        classifier.zero_grad(set_to_none=True)
        forward_backward(
            method,
            classifier,
            images[share],
            labels[share],
            torch.arange(GLOBAL_BATCH)[share],
            0,
            ctx,
            micro_batch=case["micro_batch"],
            gather=gather_batch if world > 1 else None,
            ddp=ddp,
        )
        average_gradients(by_hand, world)
    return {n: p.grad.clone() for n, p in classifier.named_parameters() if p.grad is not None}


def _gradients_worker(rank: int, world: int, init_file: str, case: dict, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(one_step_gradients(case, rank, world), f"{out}.{rank}")
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_process_group()


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_give_the_one_process_gradient_of_the_global_batch(name, tmp_path):
    """DDP's average of gathered-loss gradients is the single-process gradient, on every rank
    (a frozen tower holds none; the gradient cache's and cross-entropy's chunks change nothing)."""
    case = CASES[name]
    alone = one_step_gradients(case)
    out = str(tmp_path / "grads")
    mp.spawn(_gradients_worker, args=(2, str(tmp_path / "pg"), case, out), nprocs=2, join=True)
    assert any(g.abs().sum() > 0 for g in alone.values())
    for rank in range(2):
        together = torch.load(f"{out}.{rank}")
        assert together.keys() == alone.keys()
        for key in alone:
            torch.testing.assert_close(together[key], alone[key], rtol=1e-5, atol=1e-6, msg=key)
    if case["frozen_text"]:
        assert all(key.startswith("model.visual") or key == "model.logit_scale" for key in alone)


def _training_worker(rank: int, world: int, init_file: str, overrides: list, out: str) -> None:
    import flyp.train as train_mod
    from flyp.recipe import load_recipe

    torch.set_num_threads(1)
    DDP = torch.nn.parallel.DistributedDataParallel
    seen = {"wraps": 0, "forwards": 0, "no_sync": 0, "by_hand": []}
    wrap, forward, no_sync = train_mod.ddp_for, DDP.forward, DDP.no_sync

    def counted_wrap(*args, **kwargs):
        seen["wraps"] += 1
        return wrap(*args, **kwargs)

    def counted_forward(self, *args, **kwargs):
        seen["forwards"] += 1
        return forward(self, *args, **kwargs)

    def counted_no_sync(self):
        seen["no_sync"] += 1
        return no_sync(self)

    def counted_average(params, world_size):
        seen["by_hand"].append(sum(p.numel() for p in params))
        return average_gradients(params, world_size)

    train_mod.ddp_for, train_mod.average_gradients = counted_wrap, counted_average
    DDP.forward, DDP.no_sync = counted_forward, counted_no_sync
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train_mod.finetune(load_recipe(None, overrides), f"{out}/run")
        torch.save(seen, f"{out}/seen.{rank}")
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_process_group()


@pytest.mark.slow
def test_training_wraps_the_model_in_ddp_with_no_sync_for_earlier_chunks(fake_pacs, tmp_path):
    """The choice pinned: 2 training processes wrap the model in DDP once per run; each step
    runs its 2 gradient-cache chunks through DDP, the first under no_sync; only the logit scale
    (one number) is averaged by hand."""
    steps = 3
    overrides = tiny_overrides(  # batch 6: 3 images a rank, in chunks of 2 and 1
        fake_pacs, f"train.stop_after_steps={steps}", "train.micro_batch=2", "data.num_workers=0"
    )
    mp.spawn(
        _training_worker, args=(2, str(tmp_path / "pg"), overrides, str(tmp_path)), nprocs=2
    )
    for rank in range(2):
        seen = torch.load(tmp_path / f"seen.{rank}")
        assert seen == {"wraps": 1, "forwards": 2 * steps, "no_sync": steps, "by_hand": [1] * steps}


@pytest.mark.parametrize("collisions, gathered", [("none", False), ("mask", True), ("soft", True)])
def test_labels_travel_to_the_other_ranks_only_where_collision_handling_reads_them(
    collisions, gathered
):
    from flyp.methods import contrastive_loss

    bundle = load_model("tiny")
    ctx = LossContext(bundle.tokenizer, ["a", "b"], ["{}"], collisions=collisions)
    seen = []

    def gather(image, text, labels):  # one process standing in for the others
        seen.append(labels)
        return image, text, labels

    features, labels = torch.randn(4, 8), torch.tensor([0, 1, 0, 1])
    loss = contrastive_loss(features, features.flip(0), bundle.model, labels, ctx, gather=gather)
    assert torch.isfinite(loss)
    assert (seen[0] is labels) if gathered else seen == [None]


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_one_named_gpu_for_several_ranks_of_a_node_is_refused(device, monkeypatch):
    """torchrun with train.device=cuda:1 would bind every rank to GPU 1 (NCCL: "Duplicate GPU
    detected"); refused before the group is joined. One rank per node may name its GPU."""
    from flyp.distributed import _check_one_gpu_per_rank, init_distributed
    from flyp.errors import RunError

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(RunError, match=f"train.device={device} under torchrun would put all 2 "
                       "ranks of this node on one GPU; use train.device=cuda"):  # fmt: skip
        init_distributed(device)
    _check_one_gpu_per_rank(device, 1)  # one rank here: its own GPU
    _check_one_gpu_per_rank("cuda", 2)  # each rank its LOCAL_RANK's GPU
