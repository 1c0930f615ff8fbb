"""What image size costs on this machine: one FLYP run of the default model per size on PACS
given as one's own data (`--data`, photo ID, sketch OOD), 1 epoch of a stratified 320 training
images (10 steps of 32), at most 200 images per evaluation set. Prints s/step and evaluation
images/s per size, the figures "Sizing a run on your own data" in the README is built from.

    .venv/bin/python benchmarks/sizing.py [--sizes 96 128 160 224]

~1 minute per size on 2 CPU cores. Each size runs in its own process (a cold start, as a user's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PACS  # noqa: E402


def one(size: int, out: Path) -> dict:
    args = [
        sys.executable, "-m", "flyp", "finetune", "--data", str(PACS.resolve()),
        "--id-domain", "photo", "--ood-domains", "sketch",
        "--set", f"model.image_size={size}", "--set", "train.epochs=1",
        "--set", "data.max_train=320", "--set", "data.max_eval=200", "--out", str(out),
    ]  # fmt: skip
    subprocess.run(args, check=True, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    steps = 320 // 32
    images = sum(s["n"] for s in metrics["sets"].values())
    return {
        "size": size,
        "s_per_step": metrics["train_seconds"] / steps,
        "train_images_per_s": metrics["train_images_per_second"],
        "eval_images_per_s": images / metrics["eval_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", type=int, default=[96, 128, 160, 224])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            rows.append(one(size, Path(scratch) / f"s{size}"))
            print(json.dumps(rows[-1]), flush=True)
    print("| image size | s / training step (batch 32) | training images/s | evaluation images/s |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['size']} px | {r['s_per_step']:.2f} | {r['train_images_per_s']:.0f} "
            f"| {r['eval_images_per_s']:.0f} |"
        )


if __name__ == "__main__":
    main()
