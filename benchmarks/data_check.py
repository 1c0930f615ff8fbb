"""The image check's cost: PACS cold (one thread, then the default threads) and warm (from the
manifest), the per-image decode of an ImageNet-sized JPEG with threads and with processes, and
the projection for ImageNet's 1.28M training images.

  .venv/bin/python benchmarks/data_check.py                 # ~1 minute on 2 cores
  .venv/bin/python benchmarks/data_check.py --pacs /path/to/pacs --large 400

The manifests go to a temporary folder (FLYP_CACHE), never the user's cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import PACS  # noqa: E402

IMAGENET_TRAIN = 1_281_167
NOISE = 20  # grey levels of noise: files near ImageNet's ~110 KB average


def _decode(path: str) -> None:
    from flyp.data.folders import decode_rgb

    decode_rgb(path)


def pacs_check(paths: list[str], cache: Path, workers: int) -> tuple[float, float, int, int]:
    """Wall and CPU seconds, decoded and cached counts of one check (manifest under ``cache``)."""
    from flyp.data.check import check_paths

    os.environ["FLYP_CACHE"] = str(cache)
    cpu = _cpu()
    report = check_paths(paths, workers)
    assert not report.bad, report.bad
    return report.seconds, _cpu() - cpu, report.decoded, report.cached


def imagenet_like(folder: Path, n: int, source: list[str]) -> list[str]:
    """500x375 JPEGs (ImageNet's typical size) at quality 90 from PACS photos, with the fine
    noise of a real photo so they do not compress unrealistically well."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        with Image.open(source[i % len(source)]) as img:
            big = np.asarray(img.convert("RGB").resize((500, 375)), dtype=np.float32)
        noisy = np.clip(big + rng.normal(0, NOISE, big.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        out.append(str(path))
    return out


def timed_map(pool_kind: str, workers: int, paths: list[str]) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process and its children) to decode ``paths``. CPU time
    does not grow when other programs share the cores, so the projection is made from it."""
    wall, cpu = time.perf_counter(), _cpu()
    if workers == 1:
        for p in paths:
            _decode(p)
    else:
        pool = ThreadPoolExecutor if pool_kind == "threads" else ProcessPoolExecutor
        with pool(workers) as ex:
            list(ex.map(_decode, paths, chunksize=16))
    return time.perf_counter() - wall, _cpu() - cpu


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    from flyp.data.check import default_workers
    from flyp.data.folders import IMAGE_SUFFIXES

    parser = argparse.ArgumentParser()
    parser.add_argument("--pacs", type=Path, default=PACS)
    parser.add_argument("--large", type=int, default=300, help="ImageNet-sized JPEGs to decode")
    args = parser.parse_args()
    root = args.pacs.resolve()
    if not root.is_dir():
        sys.exit(f"PACS is not at {root}; pass --pacs")
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    workers = default_workers()
    for p in paths:  # read every file once, so the cold runs time decoding, not the disk
        Path(p).read_bytes()
    print(f"PACS: {len(paths)} images at {root}; {os.cpu_count()} CPUs, {workers} check threads")
    with tempfile.TemporaryDirectory() as tmp:
        for label, n in [("cold, 1 thread", 1), (f"cold, {workers} threads", workers)]:
            cache = Path(tmp) / f"cache{n}"
            seconds, cpu_s, decoded, cached = pacs_check(paths, cache, n)
            print(
                f"  {label:<18} {seconds:6.2f} s wall, {cpu_s:6.2f} s CPU "
                f"({1000 * cpu_s / len(paths):.3f} ms CPU/image, {decoded} decoded)"
            )
        seconds, cpu_s, decoded, cached = pacs_check(paths, cache, workers)
        warm_per_image = seconds / len(paths)
        manifest = next((cache / "image-check").glob("*.json"))
        print(
            f"  {'warm (manifest)':<18} {seconds:6.2f} s wall ({1e6 * warm_per_image:.1f} "
            f"us/image, {cached} known good); manifest {manifest.stat().st_size / 1e6:.2f} MB"
        )

        big = Path(tmp) / "big"
        big.mkdir()
        photos = [p for p in paths if "/photo/" in p]
        large = imagenet_like(big, args.large, photos)
        kb = np.mean([Path(p).stat().st_size for p in large]) / 1024
        print(f"\n{args.large} ImageNet-sized JPEGs (500x375, q90, {kb:.0f} KB each):")
        timed_map("threads", 1, large[:20])  # warm-up
        per, cpu = {}, {}
        for kind, n in [("serial", 1), ("threads", workers), ("processes", workers)]:
            seconds, cpu_seconds = timed_map(kind, n, large)
            per[kind], cpu[kind] = seconds / len(large), cpu_seconds / len(large)
            print(
                f"  {kind:<10} x{n}: {1000 * per[kind]:.2f} ms/image wall, "
                f"{1000 * cpu[kind]:.2f} ms/image CPU"
            )

        # Projection: cold is the decode cost; warm is stat + lookup, measured on PACS, plus
        # reading a manifest of 1.28M entries (measured: written and read back here).
        fake = {
            f"n{i // 1300:08d}/n{i // 1300:08d}_{i}.JPEG": [110_000, 1_700_000_000_000_000_000]
            for i in range(IMAGENET_TRAIN)
        }
        big_manifest = Path(tmp) / "imagenet.json"
        big_manifest.write_text(json.dumps({"images": fake}))
        tick = time.perf_counter()
        json.loads(big_manifest.read_text())
        load_s = time.perf_counter() - tick
        print(f"\nImageNet train ({IMAGENET_TRAIN:,} images), projected:")
        for kind in per:
            minutes = IMAGENET_TRAIN * per[kind] / 60
            print(f"  cold, {kind:<10} here (wall): {minutes:6.1f} min")
        for cores in (1, 8, 32):
            minutes = IMAGENET_TRAIN * cpu["threads"] / cores / 60
            print(
                f"  cold, threads on {cores:>2} free cores (CPU time / cores): {minutes:6.1f} min"
            )
        print(
            f"  warm (manifest): {IMAGENET_TRAIN * warm_per_image:.0f} s stat+lookup "
            f"+ {load_s:.1f} s to read its {big_manifest.stat().st_size / 1e6:.0f} MB manifest"
        )


if __name__ == "__main__":
    main()
