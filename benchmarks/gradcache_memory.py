"""Peak memory of one FLYP step: the micro-batch alone, 8x it through the gradient cache, 8x plain.

CPU: live heap bytes (glibc mallinfo2: in-use arena blocks + mmapped blocks, which are returned to
the system when freed) sampled at every autograd save and unpack during the step, minus the live
bytes before the batch was made; so the input batch counts. (RSS is no measure: freed memory stays
in it and model loading sets the process peak.)
CUDA: torch.cuda.max_memory_allocated over the step, minus the memory allocated before it.

  .venv/bin/python benchmarks/gradcache_memory.py --micro 32        # ~1 minute on 2 cores
  .venv/bin/python benchmarks/gradcache_memory.py --micro 32 --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "configs" / "flyp-bench-vit.json"


def live_heap_bytes() -> int:
    """Bytes malloc has handed out and not taken back (glibc only)."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
        )]  # fmt: skip

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


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
    if device.type == "cpu":
        for p in classifier.parameters():  # gradient buffers exist after a run's first step
            p.grad = torch.zeros_like(p)
    before_batch = live_heap_bytes() if device.type == "cpu" else 0
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, 3, (args.batch,), device=device)
    seeds = torch.arange(args.batch)

    def step() -> None:
        classifier.zero_grad(set_to_none=False)  # gradients stay allocated, as in training
        forward_backward(
            get_method("flyp"), classifier, images, labels, seeds, 0, ctx,
            micro_batch=args.micro or None, precision=args.precision,
        )  # fmt: skip

    if device.type == "cuda":
        step()  # warm-up: cuBLAS workspaces and the caching allocator settle
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        peak_bytes = [live_heap_bytes()]

        def sample(tensor):
            peak_bytes[0] = max(peak_bytes[0], live_heap_bytes())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(sample, sample):
            step()
        peak = (peak_bytes[0] - before_batch) / 2**20
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
        argv += ["--micro", str(micro or 0)]  # 0: no gradient cache (the default would be 8)
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
