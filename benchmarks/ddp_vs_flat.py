"""One FLYP step on 2 gloo CPU processes: flyp's flat all-reduce against DistributedDataParallel.

flyp averages gradients over ranks with one all-reduce of the flattened gradients after the
backward (flyp.distributed.average_gradients). DDP instead all-reduces buckets of gradients
while the backward still runs. This script times both on the same global batch, in alternating
rounds, and checks first that both give the same gradients (so the race is a fair one).

The DDP step is flyp's own (flyp.gradcache.forward_backward with flyp.distributed.ddp_for): a
chunk's work runs as the forward of DDP's wrapper; the gradient cache's first, gradient-free pass
bypasses DDP, and its re-forwards run under ``no_sync`` for all but the last chunk, so one
bucketed all-reduce covers the whole accumulated gradient; ``gradient_as_bucket_view=True``; no
buffer broadcast (BatchNorm is frozen in FLYP). The logit scale is left out of DDP (it is used
outside the wrapper's forward) and averaged by hand.

  HF_HUB_OFFLINE=1 nice -n 10 .venv/bin/python benchmarks/ddp_vs_flat.py --models tiny vit
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HERE = Path(__file__).resolve().parent
MODELS = {
    "tiny": ("tiny", 32),
    "vit": (f"open_clip:{HERE / 'configs' / 'flyp-bench-vit.json'}", None),  # 128 px, random
}


def setup(spec: str, size: int | None, batch: int, world: int, rank: int):
    from flyp.methods import Classifier, LossContext, get_method
    from flyp.models import load_model

    torch.manual_seed(0)  # the same model and global batch on every rank
    bundle = load_model(spec, size)
    names = [f"class {i}" for i in range(10)]
    ctx = LossContext(bundle.tokenizer, names, ["a photo of a {}."], loss_kind=bundle.loss)
    side = bundle.image_size
    images = torch.randn(batch, 3, side, side)
    labels = torch.randint(0, len(names), (batch,))
    seeds = torch.arange(batch)
    share = slice(rank * batch // world, (rank + 1) * batch // world)
    local = (images[share], labels[share], seeds[share])
    return bundle.model, ctx, get_method("flyp"), Classifier, local


def flat_step(method, classifier, local, ctx, micro_batch):
    from flyp.distributed import average_gradients, gather_batch
    from flyp.gradcache import forward_backward

    images, labels, seeds = local
    loss = forward_backward(
        method, classifier, images, labels, seeds, 0, ctx, micro_batch=micro_batch,
        gather=gather_batch,
    )  # fmt: skip
    average_gradients([p for p in classifier.parameters() if p.requires_grad], 2)
    return loss


def ddp_step(method, classifier, ddp, by_hand, local, ctx, micro_batch):
    """flyp's own step with DDP doing the gradient communication (flyp.distributed.ddp_for), as
    flyp.train runs it under torchrun."""
    from flyp.distributed import average_gradients, gather_batch
    from flyp.gradcache import forward_backward

    images, labels, seeds = local
    loss = forward_backward(
        method, classifier, images, labels, seeds, 0, ctx, micro_batch=micro_batch,
        gather=gather_batch, ddp=ddp,
    )  # fmt: skip
    average_gradients(by_hand, 2)  # the logit scale: DDP leaves it out
    return loss


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def worker(rank: int, world: int, init: str, args, queue) -> None:
    from flyp.distributed import ddp_for

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's deprecation notices
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        spec, size = MODELS[name]
        for micro in args.micro_batch:
            micro_batch = micro or None
            model, ctx, method, Classifier, local = setup(spec, size, args.batch, world, rank)
            flat_model = copy.deepcopy(model)
            flat_classifier = Classifier(flat_model)
            ddp_model = copy.deepcopy(model)
            ddp_classifier = Classifier(ddp_model)
            ddp, by_hand = ddp_for(ddp_classifier, torch.device("cpu"))
            for net in (flat_model, ddp_model):
                net.train()
            # the same gradients first: the same step, the same weights
            flat_step(method, flat_classifier, local, ctx, micro_batch)
            ddp_step(method, ddp_classifier, ddp, by_hand, local, ctx, micro_batch)
            a, b = grads(flat_model), grads(ddp_model)
            worst = max((a[k] - b[k]).abs().max().item() for k in a)
            assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
            speed = {"flat": [], "ddp": []}
            for _ in range(args.rounds):
                for kind in ("flat", "ddp"):
                    dist.barrier()
                    tick = time.perf_counter()
                    for _ in range(args.steps):
                        if kind == "flat":
                            flat_model.zero_grad(set_to_none=True)
                            flat_step(method, flat_classifier, local, ctx, micro_batch)
                        else:
                            ddp_model.zero_grad(set_to_none=True)
                            ddp_step(method, ddp_classifier, ddp, by_hand, local, ctx, micro_batch)
                    seconds = torch.tensor(time.perf_counter() - tick)
                    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # the slower rank's time
                    speed[kind].append(args.batch * args.steps / seconds.item())
            results.append(
                {
                    "model": name,
                    "micro_batch": micro_batch,
                    "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
                    "max_grad_difference": worst,
                    **{k: sorted(v)[len(v) // 2] for k, v in speed.items()},  # the median
                    "rounds": speed,
                }
            )
            del ddp
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "vit"], choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=32, help="the global batch")
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[0, 8],
                        help="per-rank gradient-cache chunk; 0: none")  # fmt: skip
    parser.add_argument("--steps", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        queue = mp.get_context("spawn").SimpleQueue()
        mp.spawn(worker, args=(2, f"{tmp}/init", args, queue), nprocs=2)
        results = queue.get()
    print(f"load average before/after: {os.getloadavg()[0]:.2f} (1 min)")
    print("| model | gradient cache | flat all-reduce (img/s) | DDP (img/s) | DDP/flat | max |Δgrad| |")
    print("|---|---|---|---|---|---|")
    for r in results:
        cache = f"chunks of {r['micro_batch']}" if r["micro_batch"] else "off"
        print(
            f"| {r['model']} ({r['params_m']:.1f}M) | {cache} | {r['flat']:.1f} | {r['ddp']:.1f} "
            f"| {r['ddp'] / r['flat']:.2f} | {r['max_grad_difference']:.1e} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
