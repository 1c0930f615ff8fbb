"""Peak memory of one FLYP step: the micro-batch alone, 8x it through the gradient cache, 8x plain.

CPU: each case runs in a fresh child process; the figure is the peak RSS during its first step
minus the RSS just before it.
CUDA: torch.cuda.max_memory_allocated over the step, minus the memory allocated before it.

  .venv/bin/python benchmarks/gradcache_memory.py                   # ~1 minute on 2 cores
  .venv/bin/python benchmarks/gradcache_memory.py --micro 32 --device cuda
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "configs" / "flyp-bench-vit.json"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(args: argparse.Namespace) -> None:
    import torch

    from flyp.gradcache import forward_backward
    from flyp.methods import Classifier, LossContext, get_method
    from flyp.models import load_model

    torch.manual_seed(0)
    device = torch.device(args.device)
    bundle = load_model(f"open_clip:{args.model}", context_length=None if args.trim else 77)
    classifier = Classifier(bundle.model.to(device))
    classifier.train()
    ctx = LossContext(bundle.tokenizer, ["dog", "horse", "house"], ["a photo of a {}."])
    size = bundle.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, 3, (args.batch,), device=device)
    seeds = torch.arange(args.batch)

    def step() -> None:
        classifier.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
        forward_backward(
            get_method("flyp"), classifier, images, labels, seeds, 0, ctx,
            micro_batch=args.micro, precision=args.precision,
        )  # fmt: skip

    if device.type == "cuda":
        step()  # warm-up: cuBLAS workspaces and the caching allocator settle
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:  # the first step (no warm-up: freed CPU memory stays in RSS and would hide the peak),
        # with the gradient buffers made beforehand, as they are after a run's first step
        for p in classifier.parameters():
            p.grad = torch.zeros_like(p)
        before = rss_mb()
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    print(f"PEAK {peak:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--model", default=str(CONFIG))
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--trim", action="store_true", help="trimmed text (flyp's default)")
    args = parser.parse_args()
    if args.child:
        return child(args)

    def run(batch: int, micro: int | None) -> float:
        argv = [sys.executable, __file__, "--child", "--model", args.model, "--batch", str(batch),
                "--device", args.device, "--precision", args.precision]  # fmt: skip
        argv += ["--micro", str(micro)] if micro else []
        argv += ["--trim"] if args.trim else []
        out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=1200)
        return float(out.stdout.split("PEAK ")[-1])

    m, big = args.micro, args.micro * args.factor
    alone = run(m, None)
    cached = run(big, m)
    plain = run(big, None)
    print(f"model {Path(args.model).stem}, {args.device}, {args.precision}: step peak memory (MB)")
    print(f"  micro-batch {m} alone:            {alone:8.1f}")
    print(f"  batch {big} with gradient cache:  {cached:8.1f}  ({cached / alone:.2f}x the micro-batch; target <= 1.5x)")  # fmt: skip
    print(f"  batch {big} without:              {plain:8.1f}  ({plain / alone:.2f}x)")


if __name__ == "__main__":
    main()
