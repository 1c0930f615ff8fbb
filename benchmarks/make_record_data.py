"""Write a DIR/<domain>/<class>/<image> tree as the formats datasets ship in: a Hugging Face
dataset (Parquet as the Hub stores it, data/train-00000-of-00001.parquet, with a ClassLabel and
a domain column; and a save_to_disk folder, one split per domain) and WebDataset shards
(<domain>-000.tar, ... of <key>.jpg + <key>.cls, with classes.txt). The README's walkthrough
and benchmarks/record_speed.py build theirs with it.

    .venv/bin/python benchmarks/make_record_data.py ../shared/data/pacs OUT --domains photo sketch
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

PER_SHARD = 500


def images(root: Path, domains: list[str], limit: int | None = None):
    """(domain, class index, image path) in sorted order, classes by the first domain's folders;
    at most ``limit`` images of each class in each domain."""
    classes = sorted(p.name for p in (root / domains[0]).iterdir() if p.is_dir())
    rows = []
    for domain in domains:
        for label, name in enumerate(classes):
            files = [
                p
                for p in sorted((root / domain / name).iterdir())
                if p.is_file() and not p.name.startswith(".")
            ]
            rows += [(domain, label, p) for p in files[:limit]]
    return classes, rows


def write_shards(classes, rows, out: Path, per_shard: int = PER_SHARD, shuffle: bool = False) -> Path:
    """<domain>-000.tar, ... of ``per_shard`` samples, classes.txt, and sizes.json (each shard's
    sample count, WebDataset's convention, which data.stream reads). ``shuffle``: the samples
    in a seeded order, so that every shard holds every class (as a dataset's writer shuffles)."""
    import json
    import random

    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    sizes = {}
    for domain in dict.fromkeys(d for d, _, _ in rows):
        mine = [r for r in rows if r[0] == domain]
        if shuffle:
            random.Random(0).shuffle(mine)
        for start in range(0, len(mine), per_shard):
            name = f"{domain}-{start // per_shard:03d}.tar"
            sizes[name] = len(mine[start : start + per_shard])
            with tarfile.open(out / name, "w") as tar:
                for i, (_, label, path) in enumerate(mine[start : start + per_shard], start):
                    suffix = path.suffix.lower().lstrip(".")
                    for name, blob in (
                        (f"{i:06d}.{suffix}", path.read_bytes()),
                        (f"{i:06d}.cls", str(label).encode()),
                    ):
                        info = tarfile.TarInfo(name)
                        info.size = len(blob)
                        tar.addfile(info, io.BytesIO(blob))
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1) + "\n")
    return out


def write_hf(classes, rows, out: Path) -> tuple[Path, Path]:
    """(the Parquet dataset's folder, the save_to_disk folder)."""
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=classes),
            "domain": datasets.Value("string"),
        }
    )
    table = datasets.Dataset.from_dict(
        {
            "image": [{"bytes": p.read_bytes(), "path": None} for _, _, p in rows],
            "label": [label for _, label, _ in rows],
            "domain": [d for d, _, _ in rows],
        },
        features=features,
    )
    table.to_parquet(str(out / "parquet" / "data" / "train-00000-of-00001.parquet"))
    by_domain = {
        d: table.select([i for i, r in enumerate(rows) if r[0] == d])
        for d in dict.fromkeys(d for d, _, _ in rows)
    }
    datasets.DatasetDict(by_domain).save_to_disk(str(out / "saved"))
    return out / "parquet", out / "saved"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--domains", nargs="+", required=True)
    parser.add_argument("--limit", type=int, default=None, help="images per class and domain (default: all)")
    parser.add_argument("--per-shard", type=int, default=PER_SHARD, help=f"samples a shard (default {PER_SHARD})")
    parser.add_argument("--shuffle", action="store_true", help="shards in a seeded order: every class in each")
    args = parser.parse_args()
    classes, rows = images(args.root, args.domains, args.limit)
    write_shards(classes, rows, args.out / "shards", args.per_shard, args.shuffle)
    write_hf(classes, rows, args.out)
    print(f"{len(rows)} images of {len(classes)} classes written to {args.out}")


if __name__ == "__main__":
    main()
