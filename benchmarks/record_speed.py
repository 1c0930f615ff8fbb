"""Images/s of the same images read from folders, WebDataset shards, Parquet and a save_to_disk
folder (flyp.data.records), as flyp reads them: the index (building the benchmark, image check
left out), then every image decoded to RGB, in the evaluation's order (sorted) and in a
training epoch's order (shuffled), one process. "wds stream" is data.stream: the training
shards read in sequence through the shuffle buffer (flyp.data.stream), decoded as they come;
its index is the held-out validation and test shards only. "parquet files" is the same split as
17 Parquet files of 100 rows (the Hub's layout for a larger split), indexed; "parquet stream"
the same files streamed.

    .venv/bin/python benchmarks/record_speed.py [--limit N] [--rounds R]

PACS photo (1,670 JPEGs, ~10 KB each) is written once into a scratch folder in each format;
the rows alternate formats each round so a busy machine slows them alike. Needs the hf and wds
extras. ~1 minute.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PACS  # noqa: E402
from make_record_data import images, write_hf, write_shards  # noqa: E402


def build(root: Path, limit: int | None, scratch: Path) -> dict[str, list[str]]:
    """The overrides of each format's recipe data, the same images in each."""
    classes, rows = images(root, ["photo"], limit)
    folder = scratch / "folders" / "photo"
    for _, label, path in rows:
        target = folder / classes[label] / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    shards = write_shards(classes, rows, scratch / "shards", per_shard=100, shuffle=True)
    parquet, saved = write_hf(classes, rows, scratch)
    hub = write_hub_files(classes, rows, scratch / "hub", per_file=100)
    common = ["data.id_domain=photo", "data.ood_domains=[]"]
    return {
        "folders": ["data.benchmark=folders", f"data.root={scratch / 'folders'}", *common],
        "wds shards": ["data.benchmark=wds", f"data.root={shards}", *common],
        "wds stream": ["data.benchmark=wds", f"data.root={shards}", "data.stream=true", *common],
        "parquet": ["data.benchmark=hf", f"data.root={parquet}", "data.domain_column=domain", *common],
        "save_to_disk": ["data.benchmark=hf", f"data.root={saved}", *common],
        "parquet files": ["data.benchmark=hf", f"data.root={hub}", *common],
        "parquet stream": ["data.benchmark=hf", f"data.root={hub}", "data.stream=true", *common],
    }


def write_hub_files(classes, rows, out: Path, per_file: int) -> Path:
    """The split 'photo' as the Hub stores a larger one: data/photo-0000k-of-0000n.parquet, rows
    shuffled, ``per_file`` a file (one row group each, as the stream reads them)."""
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    order = random.Random(0).sample(rows, len(rows))
    n = -(-len(order) // per_file)
    for k in range(n):
        part = order[k * per_file : (k + 1) * per_file]
        table = datasets.Dataset.from_dict(
            {"image": [{"bytes": p.read_bytes(), "path": None} for _, _, p in part],
             "label": [label for _, label, _ in part]},
            features=features,
        )  # fmt: skip
        table.to_parquet(str(out / "data" / f"photo-{k:05d}-of-{n:05d}.parquet"))
    return out


def measure(overrides: list[str]) -> dict[str, float]:
    import flyp.data.sets as sets
    from flyp.data import build_benchmark
    from flyp.data.folders import load_rgb
    from flyp.data.stream import ShardStream
    from flyp.recipe import load_recipe

    check = sets.check_samples
    sets.check_samples = lambda samples, *a, **k: check([], *a, **k)  # the index alone
    try:
        tick = time.perf_counter()
        bench = build_benchmark(load_recipe(None, overrides).data)
        index = time.perf_counter() - tick
    finally:
        sets.check_samples = check
    if bench.stream is not None:  # the training shards read in sequence, one lane, buffer 1000
        stream = ShardStream(bench.stream, lambda image: 0, seed=0, batch_size=1)
        tick = time.perf_counter()
        n = sum(1 for _ in stream)
        rate = n / (time.perf_counter() - tick)
        return {"images": n, "index_s": index, "sorted_images_per_s": rate, "shuffled_images_per_s": rate}
    paths = sorted(s.path for part in (bench.train, bench.val, *bench.tests.values()) for s in part)
    out = {"images": len(paths), "index_s": index}
    for order in ("sorted", "shuffled"):
        todo = list(paths)
        if order == "shuffled":
            random.Random(0).shuffle(todo)
        tick = time.perf_counter()
        for path in todo:
            load_rgb(path)
        out[f"{order}_images_per_s"] = len(todo) / (time.perf_counter() - tick)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=None, help="images per class of PACS photo (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        formats = build(PACS.resolve(), args.limit, Path(scratch))
        results: dict[str, list[dict]] = {name: [] for name in formats}
        for _ in range(args.rounds):
            for name, overrides in formats.items():
                results[name].append(measure(overrides))
    print("| source | images | index (s) | images/s, sorted (evaluation) | images/s, shuffled (training) |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"| {name} | {int(med['images'])} | {med['index_s']:.2f} | {med['sorted_images_per_s']:.0f} "
            f"| {med['shuffled_images_per_s']:.0f} |"
        )
    print(json.dumps({k: v for k, v in results.items()}))


if __name__ == "__main__":
    main()
