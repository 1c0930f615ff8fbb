"""WILDS iWildCam and FMoW read straight from the folders the ``wilds`` package downloads
(the package itself is not needed).

  iwildcam_v2.0/metadata.csv    columns split, y, filename (and more); images in train/<filename>
                                split: train, id_val, id_test, val (OOD), test (OOD)
  fmow_v1.1/rgb_metadata.csv    columns split, timestamp, country_code, category (and more);
                                row i is images/rgb_img_<i>.png; split: train, val, test, seq
  fmow_v1.1/country_code_mapping.csv   columns alpha-3, region

FMoW's split column holds train/val/test; WILDS's official scheme cuts them by time: images
before 2013 are in-distribution (train, id_val, id_test), val rows from 2013-2015 are OOD
val, test rows from 2016 on are OOD test; train rows from 2013 on and ``seq`` rows are unused.

Sets are named for the recipe: the ID validation set is ``val`` (model selection), the ID test
set ``id_test``, the OOD sets ``ood_test`` and ``ood_val`` (pick them in data.ood_domains).
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from flyp.data import templates as tpl
from flyp.data.folders import DataError, Sample, require_dir
from flyp.data.paper import set_root
from flyp.data.sets import Benchmark, finish
from flyp.data.wilds_meta import FMOW_CLASSES, IWILDCAM_CLASSES
from flyp.recipe import DataConfig

# WILDS's region groups, numbered 0..4. Images from countries outside the region mapping are
# WILDS's "Other" region: they count in every metric but worst-region accuracy, so they get the
# group id that metrics_from_predictions leaves out of worst-group accuracy.
FMOW_REGIONS = ["Asia", "Europe", "Africa", "Americas", "Oceania"]
OTHER_REGION = -1
OOD_SETS = {"ood_test": "test", "ood_val": "val"}


def _rows(path: Path, needed: list[str]) -> Iterator[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path} does not exist; point data.root at the folder the wilds package downloaded")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} lacks columns {missing}; is this the WILDS metadata file?")
        yield from reader


def _dataset_dir(cfg: DataConfig, name: str, folder: str, marker: str) -> Path:
    root = set_root(cfg, name, None) or (Path(cfg.root).expanduser() if cfg.root else None)
    if root is None:
        raise DataError(f"set data.root to the folder holding {folder}/ (as downloaded by the wilds package)")
    root = require_dir(root, f"{name} root", f"it must hold {folder}/{marker}")
    return root if (root / marker).is_file() else root / folder


def _check_ood(cfg: DataConfig) -> None:
    for name in cfg.ood_domains:
        if name not in OOD_SETS:
            raise DataError(f"data.ood_domains: '{name}' is not a WILDS OOD set; use {sorted(OOD_SETS)}")


def build_iwildcam(cfg: DataConfig) -> Benchmark:
    """iWildCam (182 classes); headline metric macro-F1."""
    _check_ood(cfg)
    folder = _dataset_dir(cfg, "iwildcam", "iwildcam_v2.0", "metadata.csv")
    splits: dict[str, list[Sample]] = {}
    for row in _rows(folder / "metadata.csv", ["split", "y", "filename"]):
        label = int(row["y"])
        if not 0 <= label < len(IWILDCAM_CLASSES):
            raise DataError(f"{folder / 'metadata.csv'}: label {label} outside 0..{len(IWILDCAM_CLASSES) - 1}")
        splits.setdefault(row["split"], []).append(Sample(str(folder / "train" / row["filename"]), label))
    tests = {"id_test": splits.get("id_test", [])} | {n: splits.get(OOD_SETS[n], []) for n in cfg.ood_domains}
    return finish(
        cfg, "iwildcam", list(IWILDCAM_CLASSES), tpl.IWILDCAM,
        splits.get("train", []), splits.get("id_val", []), tests, id_name="id_test", metric="macro_f1",
    )


def fmow_split(split: str, year: int) -> str | None:
    """WILDS's official FMoW split of a row (None: unused)."""
    if split == "train":
        return "train" if year < 2013 else None
    if split == "val":
        return "id_val" if year < 2013 else ("val" if year < 2016 else None)
    if split == "test":
        return "id_test" if year < 2013 else ("test" if year >= 2016 else None)
    return None


def build_fmow(cfg: DataConfig) -> Benchmark:
    """FMoW (62 classes); headline metric worst-region accuracy. Every set keeps its "Other"
    images (group ``OTHER_REGION``): WILDS's average accuracy counts them, its worst-region
    accuracy does not."""
    _check_ood(cfg)
    folder = _dataset_dir(cfg, "fmow", "fmow_v1.1", "rgb_metadata.csv")
    regions = {r["alpha-3"]: r["region"] for r in _rows(folder / "country_code_mapping.csv", ["alpha-3", "region"])}
    index = {c: i for i, c in enumerate(FMOW_CLASSES)}
    splits: dict[str, list[Sample]] = {}
    group_of: dict[str, int] = {}
    for i, row in enumerate(_rows(folder / "rgb_metadata.csv", ["split", "timestamp", "country_code", "category"])):
        split = fmow_split(row["split"], int(row["timestamp"][:4]))
        if split is None:
            continue
        if row["category"] not in index:
            raise DataError(f"{folder / 'rgb_metadata.csv'}, row {i}: unknown category '{row['category']}'")
        region = regions.get(row["country_code"], "Other")
        path = str(folder / "images" / f"rgb_img_{i}.png")
        splits.setdefault(split, []).append(Sample(path, index[row["category"]]))
        group_of[path] = FMOW_REGIONS.index(region) if region in FMOW_REGIONS else OTHER_REGION
    tests = {"id_test": splits.get("id_test", [])} | {n: splits.get(OOD_SETS[n], []) for n in cfg.ood_domains}
    names = [c.replace("_", " ") for c in FMOW_CLASSES]
    return finish(
        cfg, "fmow", names, tpl.FMOW, splits.get("train", []), splits.get("id_val", []),
        tests, id_name="id_test", metric="worst_group_accuracy", group_of=group_of,
    )
