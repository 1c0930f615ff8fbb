"""What image size costs on this machine: a FLYP run of the default model per size on PACS given
as one's own data (`--data`, photo ID, sketch OOD), 1 epoch of a stratified 192 training images
(6 steps of 32), at most 100 images per evaluation set. Prints, per size, a training step's and
an evaluated image's wall time and CPU time (this process's, all its threads), measured through
flyp.progress's hooks (the first step, which warms up, left out).

CPU time is what a busy machine does not inflate: on a shared machine wall time is CPU time
divided by the share of the cores this run got, so ``CPU s / cores`` is the wall time of a quiet
machine with ``cores`` cores (torch's threads keep them busy during a step).

    .venv/bin/python benchmarks/sizing.py [--sizes 96 160 224]

~1-2 minutes per size on 2 quiet CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PACS  # noqa: E402


def one(size: int, out: Path) -> dict:
    import flyp.progress as progress
    from flyp.cli import main

    steps: list[tuple[float, float]] = []
    evals: list[tuple[float, float, int]] = []
    clock = {"wall": time.perf_counter(), "cpu": time.process_time()}
    real_step, real_images, real_begin = progress.step, progress.images, progress.begin

    def lap() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        spent = wall - clock["wall"], cpu - clock["cpu"]
        clock.update(wall=wall, cpu=cpu)
        return spent

    def begin() -> None:
        lap()
        real_begin()

    def step(k: int, n: int) -> None:
        steps.append(lap())
        real_step(k, n)

    def images(name: str, k: int, n, count: int) -> None:
        evals.append((*lap(), count))
        real_images(name, k, n, count)

    progress.step, progress.images, progress.begin = step, images, begin
    try:
        argv = ["finetune", "--data", str(PACS.resolve()), "--id-domain", "photo"]
        argv += ["--ood-domains", "sketch", "--set", f"model.image_size={size}"]
        argv += ["--set", "train.epochs=1", "--set", "data.max_train=192"]
        argv += ["--set", "data.max_eval=100", "--out", str(out)]
        assert main(argv) == 0
    finally:
        progress.step, progress.images, progress.begin = real_step, real_images, real_begin
    timed = steps[1:]
    counted = sum(c for *_, c in evals)
    return {
        "size": size,
        "step_wall_s": statistics.median(w for w, _ in timed),
        "step_cpu_s": statistics.median(c for _, c in timed),
        "eval_image_wall_ms": 1000 * sum(w for w, _, _ in evals) / counted,
        "eval_image_cpu_ms": 1000 * sum(c for _, c, _ in evals) / counted,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 160, 224])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            rows.append(one(size, Path(scratch) / f"s{size}"))
            print("SIZE " + json.dumps(rows[-1]), flush=True)
    cores = len(os.sched_getaffinity(0))
    print(f"load average {os.getloadavg()[0]:.1f} on {cores} cores")
    print(
        f"| image size | training step (batch 32): wall s here / CPU s / CPU s ÷ {cores} cores "
        "| evaluated image: wall ms here / CPU ms |"
    )
    print("|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} px | {r['step_wall_s']:.2f} / {r['step_cpu_s']:.2f} / "
            f"{r['step_cpu_s'] / cores:.2f} | {r['eval_image_wall_ms']:.1f} / "
            f"{r['eval_image_cpu_ms']:.1f} |"
        )


if __name__ == "__main__":
    main()
