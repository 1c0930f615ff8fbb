"""SIGKILL a `flyp finetune` at random instants; each resumed run must equal the uninterrupted one.

    python benchmarks/kill_resume.py [--trials 30] [--seed 0] [--model default]

The default model on a slice of PACS (96 px, 48 training images, 2 epochs of 3 steps, a
checkpoint after every step, the best epoch kept on validation): checkpoints of ~330 MB each
(weights and AdamW's moments), so a fair share of the kills land while one is being written.
Each trial starts the run, kills it at a moment drawn uniformly over the reference run's wall
time, then does what a user would: `flyp finetune --resume RUN` (or the same command again when
the kill came before the first checkpoint). The resumed run's selected weights are compared
tensor by tensor with the reference's, and its per-set metrics for equality. A trial ends
"equal", "refused" (exit 2, one line) or "DIFFERENT"; the last line sums them up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from flyp.data.benchmarks import pacs_default_root

RECIPE = """
name: kill_resume
model: {{spec: {model}, image_size: 96}}
data: {{benchmark: pacs, root: {root}, id_domain: photo, ood_domains: [sketch],
        max_train: 48, max_eval: 16}}
train: {{method: flyp, epochs: 2, batch_size: 16, lr: 1.0e-4, warmup_steps: 1,
         checkpoint_every: 1, precision: fp32}}
eval: {{batch_size: 64, precision: fp32, wise_alphas: [1.0]}}
"""


def flyp(*args: str) -> list[str]:
    return [sys.executable, "-m", "flyp", *args]


def outcome(run: Path, reference: Path) -> str:
    """'equal' when the selected weights and the metrics are those of the reference run."""
    a, b = load_file(str(run / "model.safetensors")), load_file(str(reference / "model.safetensors"))
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sets = [json.loads((r / "metrics.json").read_text())["sets"] for r in (run, reference)]
    return "equal" if same and sets[0] == sets[1] else "DIFFERENT"


def at_kill(run: Path) -> str:
    """What the kill left: mid-write (a temporary file), a checkpoint, or nothing yet."""
    if not run.exists():
        return "no folder"
    names = [p.name for p in run.iterdir()]
    if any(n.endswith(".tmp") for n in names):
        return "mid-write " + ",".join(sorted(n.split(".")[1] for n in names if n.endswith(".tmp")))
    if "metrics.json" in names:
        return "finished"
    return "checkpoint" if "state.pt" in names else "before the first checkpoint"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="default")
    parser.add_argument("--out", type=Path, default=None, help="a scratch folder (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out or Path(tempfile.mkdtemp(prefix="flyp-kills-"))
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=args.model, root=pacs_default_root().resolve()))
    reference = out / "reference"
    subprocess.run(flyp("finetune", str(recipe), "--out", str(reference)), check=True, capture_output=True)
    tick = time.time()  # timed on a second run: the first also checked and cached the images
    subprocess.run(flyp("finetune", str(recipe), "--out", str(out / "warm")), check=True, capture_output=True)
    wall = time.time() - tick
    print(f"reference run: {wall:.1f} s; kills drawn uniformly in [0, {wall:.1f}] s", flush=True)
    draw = random.Random(args.seed)
    counts: dict[str, int] = {}
    for trial in range(args.trials):
        run = out / f"run-{trial}"
        delay = draw.uniform(0, wall)
        process = subprocess.Popen(
            flyp("finetune", str(recipe), "--out", str(run)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        left = at_kill(run)
        again = flyp("finetune", str(recipe), "--out", str(run))  # the same command again
        if not run.exists():  # killed before it made its folder: nothing to resume
            done = subprocess.run(again, capture_output=True, text=True)
        else:
            done = subprocess.run(flyp("finetune", "--resume", str(run)), capture_output=True, text=True)
            if done.returncode == 2 and "nothing to resume" in done.stderr:
                done = subprocess.run(again, capture_output=True, text=True)
        if done.returncode == 0:
            result = outcome(run, reference)
        elif done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1:
            result = "refused: " + done.stderr.strip()
        else:
            result = f"FAILED (exit {done.returncode}): {done.stderr.strip()[-300:]}"
        kind = result.split(":")[0].split(" ")[0]
        counts[kind] = counts.get(kind, 0) + 1
        print(f"kill {trial + 1:2d} at {delay:5.1f} s ({left}): {result}", flush=True)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"{args.trials} SIGKILLs: {summary}")


if __name__ == "__main__":
    main()
