"""Evaluation at ImageNet's shape on the CPU: 1000 classes, 224 px JPEGs, one process against
two gloo processes, and the decodes a whole comparison costs.

It writes a synthetic dataset (ID domain: 1000 classes x 3 images, split train/val/test; an
OOD domain of 1000 images), then prints:
  - evaluation images/s per rank (the tiny model: the figure is the decode and the loader, which
    is what bounds a GPU node's evaluation), with eval.cache_gb=0 so that every pass decodes;
  - decodes per test image over `flyp compare` (ft, 2 seeds of 2 steps, 3 interpolated
    WiSE-FT alphas, soups) with no cache, and with the cache;
  - peak memory per process, and the shared memory the loaders' batches take (uint8 vs fp32).

  .venv/bin/python benchmarks/scale_eval.py            # ~3-4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_rss_mb  # noqa: E402

CLASSES = 1000
SIZE = 224


def write_data(root: Path, per_class: int, ood_per_class: int) -> Path:
    """JPEGs of smooth random colour fields (JPEG-sized like photos: ~10 kB at 224 px)."""
    rng = np.random.default_rng(0)
    for domain, count in (("id", per_class), ("ood", ood_per_class)):
        for c in range(CLASSES):
            folder = root / domain / f"class{c:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(small).resize((SIZE, SIZE), Image.BICUBIC)
                image.save(folder / f"{i}.jpg", quality=90)
    return root


def overrides(root: Path, *extra: str) -> list[str]:
    return [
        "model.spec=tiny",
        f"model.image_size={SIZE}",
        "data.benchmark=folders",
        f"data.root={root}",
        "data.id_domain=id",
        "data.ood_domains=[ood]",
        "data.val_fraction=0.34",
        "data.test_fraction=0.33",
        "data.num_workers=0",
        "eval.batch_size=128",
        "train.batch_size=64",
        "train.epochs=1",
        "train.device=cpu",
        *extra,
    ]


def _evaluate(sets: list[str], rounds: int) -> dict:
    from flyp.evaluate import evaluate_classifier
    from flyp.experiment import prepare
    from flyp.methods import Classifier
    from flyp.recipe import load_recipe

    exp = prepare(load_recipe(None, sets))
    classifier = Classifier(exp.bundle.model)
    seconds = []
    for _ in range(rounds):
        tick = time.perf_counter()
        metrics = evaluate_classifier(classifier, exp)
        seconds.append(time.perf_counter() - tick)
    images = sum(s["n"] for s in metrics.values())
    return {"images": images, "seconds": min(seconds), "peak_rss_mb": peak_rss_mb()}


def _rank(rank: int, world: int, init: str, sets: list[str], rounds: int, out: str) -> None:
    os.environ["LOCAL_WORLD_SIZE"] = str(world)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = _evaluate(sets, rounds)
        Path(f"{out}.{rank}").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def compare_decodes(root: Path, out: Path, cache_gb: float) -> dict:
    import flyp.data.loader as loader_mod
    from flyp.compare import compare
    from flyp.experiment import prepare
    from flyp.recipe import load_recipe

    recipe = load_recipe(
        None,
        overrides(
            root,
            f"eval.cache_gb={cache_gb}",
            "eval.wise_alphas=[0,0.25,0.5,0.75,1]",
            "data.max_train=128",  # 2 steps a run: the decodes of evaluation are the point
            "data.max_eval=250",  # a stratified 250 of each set: decodes per image are the point
        ),
    )
    sets = prepare(recipe).benchmark.eval_sets()
    tests = [str(s.path) for name, samples in sets.items() if name != "val" for s in samples]
    decodes: Counter = Counter()
    real = loader_mod.load_rgb

    def counted(path):
        decodes[str(path)] += 1
        return real(path)

    loader_mod.load_rgb = counted
    try:
        tick = time.perf_counter()
        compare(recipe, ["ft"], [0, 1], out, soups=True)
        seconds = time.perf_counter() - tick
    finally:
        loader_mod.load_rgb = real
    per_image = sorted({decodes[p] for p in tests})
    return {"decodes_per_test_image": per_image, "test_images": len(tests), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=3, help="ID images per class")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tick = time.perf_counter()
        root = write_data(tmp / "data", args.per_class, 1)
        print(f"data: {CLASSES} classes, {args.per_class} ID + 1 OOD image each, {SIZE} px JPEG "
              f"({time.perf_counter() - tick:.0f} s to write)")  # fmt: skip
        sets = overrides(root, "eval.cache_gb=0")
        torch.set_num_threads(2)
        one = _evaluate(sets, args.rounds)
        print(f"1 process : {one['images']} evaluation images in {one['seconds']:.1f} s = "
              f"{one['images'] / one['seconds']:.0f} images/s; peak memory {one['peak_rss_mb']:.0f} MB")  # fmt: skip
        mp.spawn(_rank, args=(2, str(tmp / "pg"), sets, args.rounds, str(tmp / "r")), nprocs=2)
        ranks = [json.loads(Path(f"{tmp / 'r'}.{r}").read_text()) for r in range(2)]
        wall = max(r["seconds"] for r in ranks)
        for r, result in enumerate(ranks):
            print(f"2 processes, rank {r}: its share in {result['seconds']:.1f} s = "
                  f"{result['images'] / 2 / result['seconds']:.0f} images/s of its own; peak memory "
                  f"{result['peak_rss_mb']:.0f} MB")  # fmt: skip
        print(f"2 processes: {ranks[0]['images']} images in {wall:.1f} s = "
              f"{ranks[0]['images'] / wall:.0f} images/s ({one['seconds'] / wall:.2f}x one process)")  # fmt: skip
        for cache_gb in (0, 4):
            result = compare_decodes(root, tmp / f"cmp{cache_gb}", cache_gb)
            print(f"compare ft x2 seeds, 3 WiSE alphas, soups, eval.cache_gb={cache_gb}: each of "
                  f"{result['test_images']} test images decoded {result['decodes_per_test_image']} "
                  f"times ({result['seconds']:.0f} s)")  # fmt: skip
        batch, workers, prefetch = 512, 15, 2
        for name, size in (("uint8", 1), ("fp32", 4)):
            shm = workers * prefetch * batch * 3 * SIZE * SIZE * size
            print(f"loader shared memory, batch {batch}, {workers} workers x {prefetch} batches ahead, "
                  f"{name}: {shm / 2**30:.1f} GiB")  # fmt: skip


if __name__ == "__main__":
    main()
