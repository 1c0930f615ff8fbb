"""Evaluation images/s: the zero-shot head built once (Classifier.text_head), images batched,
channels_last on and off.

  .venv/bin/python benchmarks/eval_speed.py                       # ~1 minute on 2 cores
  .venv/bin/python benchmarks/eval_speed.py --model default --images 334
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import pacs_photo  # noqa: E402


def main() -> None:
    from flyp.data.folders import Sample
    from flyp.data.loader import ImageDataset, eval_loader
    from flyp.evaluate import evaluate_sets
    from flyp.methods import Classifier
    from flyp.models import load_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=f"open_clip:{HERE / 'configs' / 'flyp-bench-vit.json'}")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    rows = pacs_photo()[:: max(1, len(pacs_photo()) // args.images)][: args.images]
    classes = sorted({c for _, c, _ in rows})
    names = [c.removeprefix("a photo of a ").removesuffix(".") for c in classes]
    samples = [Sample(p, classes.index(c)) for p, c, _ in rows]
    bundle = load_model(args.model)
    classifier = Classifier(bundle.model)
    tick = time.perf_counter()
    classifier.refresh_text_head(bundle.tokenizer, names, ["a photo of a {}.", "a sketch of a {}."])
    head_s = time.perf_counter() - tick
    loader = {
        "photo": eval_loader(ImageDataset(samples, bundle.eval_transform), args.batch, args.workers)
    }
    print(f"{bundle.spec}, {len(samples)} PACS photo images, batch {args.batch}, "
          f"{torch.get_num_threads()} threads; text head built once in {head_s:.2f}s")  # fmt: skip
    for layout in (torch.contiguous_format, torch.channels_last, torch.contiguous_format):
        bundle.model.to(memory_format=layout)
        tick = time.perf_counter()
        evaluate_sets(classifier, loader, len(names))  # images are made channels_last inside
        seconds = time.perf_counter() - tick
        print(
            f"  model weights {str(layout).removeprefix('torch.'):<18} {len(samples) / seconds:7.1f} images/s"
        )


if __name__ == "__main__":
    main()
