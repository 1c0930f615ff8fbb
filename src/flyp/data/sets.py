"""A benchmark's sets: the :class:`Benchmark` every builder returns, and the last step of every
builder (:func:`finish`) that turns labelled splits into one: names and overlaps checked, k-shot
sampling and the size caps, the image check (:mod:`flyp.data.check`), empty sets refused.

Below the builders (flyp.data.benchmarks for PACS, folders and CSV; flyp.data.imagenet, wilds
and transfer for the paper's), which all import it.
"""

from __future__ import annotations

import os
import random
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flyp.data import templates as tpl
from flyp.data.check import SHOW_SKIPPED, CheckReport, check_samples
from flyp.data.folders import DataError, Sample, name_key, reserved_names
from flyp.data.records import is_record
from flyp.data.splits import stratified_subsample
from flyp.distributed import local_rank
from flyp.recipe import DataConfig

# Images in shards or tables (Hugging Face, WebDataset) checked before a run: a seeded sample
# of this many, not all (a 1.28M-image set would take over an hour; the rest are checked as read)
RECORD_CHECK = 1000


@dataclass
class Benchmark:
    name: str
    class_names: list[str]
    templates: list[str]
    train: list[Sample]
    val: list[Sample]
    tests: dict[str, list[Sample]]  # the ID test set first, then each OOD set
    id_name: str
    ood_names: list[str]
    metric: str = "accuracy"  # the headline metric: "accuracy", "macro_f1", "worst_group_accuracy"
    skipped_images: int = 0
    # Links that led nowhere, left out under data.on_bad_image=skip: {path: why} (else refused).
    skipped_links: dict[str, str] = field(default_factory=dict)
    # Evaluation sets that cover only some classes (ImageNet-R/A): logits restricted to these.
    class_subsets: dict[str, list[int]] = field(default_factory=dict)
    # Group id of every sample of an evaluation set (FMoW regions), for worst-group accuracy.
    groups: dict[str, list[int]] = field(default_factory=dict)
    # Sets whose classes each cover several model classes (ObjectNet): a prediction anywhere in
    # the label's group counts as correct.
    label_groups: dict[str, list[list[int]]] = field(default_factory=dict)
    # A per-set step on the PIL image before the model's transform (ObjectNet's border crop).
    preprocess: dict[str, Callable] = field(default_factory=dict)
    # What the image check did (how many images, from the manifest, bad, time): `flyp data`.
    image_check: CheckReport | None = None
    # A training set streamed from shards (flyp.data.stream.StreamSpec): ``train`` is then empty
    stream: Any = None

    def eval_sets(self) -> dict[str, list[Sample]]:
        return {"val": self.val, **self.tests}

    def train_size(self) -> int:
        """The training images of an epoch: the indexed ones, or the stream's samples."""
        return self.stream.samples if self.stream is not None else len(self.train)


def k_shot(samples: Sequence[Sample], k: int, seed: int) -> list[Sample]:
    """N-way k-shot: exactly ``k`` samples of every class present, drawn with ``seed``."""
    if k < 1:
        raise DataError(f"k-shot needs k >= 1, got {k}")
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample.label].append(sample)
    rng = random.Random(seed)
    out: list[Sample] = []
    for label, group in sorted(by_class.items()):
        if len(group) < k:
            raise DataError(
                f"class {label} has {len(group)} training images, fewer than k={k}; "
                "lower data.k_shot or add images"
            )
        out.extend(rng.sample(sorted(group), k))
    return sorted(out)


def check_sets(
    train: list[Sample], val: list[Sample], tests: Mapping[str, list[Sample]], id_name: str
) -> None:
    """Every set has a name of its own, and every image is in one set only.

    The evaluation sets are keyed {"val", <test sets>} (``Benchmark.eval_sets``), shown next
    to "train" and become report columns next to "OOD mean" and others: a test set named like
    those (in any case or spacing) would replace the ID validation split or read as it. An image
    in two sets (a CSV domain listing another's images, a symlink) is trained on and tested on,
    or counted twice.
    """
    reserved = reserved_names(id_name)
    reserved.pop("test")  # the ID test set's name where no domain names it (transfer benchmarks)
    seen: dict[str, str] = {}
    for name in tests:
        key = name_key(name)
        if key in reserved or key in seen:
            what = reserved.get(key) or f"the set '{seen[key]}'"
            raise DataError(
                f"evaluation set '{name}' has the name of {what}; rename it (the domain's "
                "folder or CSV file, and data.id_domain / data.ood_domains)"
            )
        seen[key] = name
    # Images are compared as files: a symbolic link (a class folder linked to another class, a
    # domain linked to the ID domain) or a hard link is the image it points at.
    where: dict[object, tuple[str, str]] = {}
    for name, part in {"train": train, "val": val, **tests}.items():
        for sample in part:
            path = os.path.abspath(sample.path)
            try:
                info = os.stat(path)
                key: object = (info.st_dev, info.st_ino)
            except OSError:  # missing, a dangling link or a loop: the image check names it
                key = path
            first_set, first_path = where.setdefault(key, (name, path))
            if first_path == path and first_set != name:
                raise DataError(
                    f"image {sample.path} is in both the '{first_set}' and the '{name}' set; an "
                    "image may be in one set only: remove it from one domain's folder or CSV file"
                )
            if first_path != path:
                raise DataError(
                    f"images {first_path} ('{first_set}' set) and {path} ('{name}' set) are one "
                    "file (a symbolic or hard link): one image would count twice, or under two "
                    "labels, or be tested on after training on it; keep one of them"
                )


def finish(
    cfg: DataConfig,
    name: str,
    class_names: list[str],
    templates: list[str],
    train: list[Sample],
    val: list[Sample],
    tests: dict[str, list[Sample]],
    id_name: str,
    metric: str = "accuracy",
    class_subsets: dict[str, list[int]] | None = None,
    group_of: Mapping[str, int] | None = None,
    skipped_links: Mapping[str, str] | None = None,
    stream: Any = None,
) -> Benchmark:
    """k-shot and size limits, the image check (:mod:`flyp.data.check`), then the Benchmark.

    ``group_of`` maps an image path to its group (FMoW region); every evaluation set then
    gets its per-sample group list, computed after subsampling so the two stay aligned.
    ``skipped_links``: links that led nowhere, left out under data.on_bad_image=skip (named on
    stderr here, as skipped images are, and counted in the Benchmark).
    ``stream``: the training set is streamed (``train`` empty; its images are checked as read).
    """
    skipped_links = dict(sorted((skipped_links or {}).items()))
    if local_rank() == 0:  # said once per node, as the image check says its skipped images
        for path, why in list(skipped_links.items())[:SHOW_SKIPPED]:
            print(f"data: skipped {path} ({why})", file=sys.stderr)
        if len(skipped_links) > SHOW_SKIPPED:
            print(f"data: skipped {len(skipped_links) - SHOW_SKIPPED} more links", file=sys.stderr)
    check_sets(train, val, tests, id_name)
    if cfg.k_shot is not None:
        train = k_shot(train, cfg.k_shot, cfg.split_seed)
    train = stratified_subsample(train, cfg.max_train, cfg.split_seed)
    val = stratified_subsample(val, cfg.max_eval, cfg.split_seed)
    tests = {k: stratified_subsample(v, cfg.max_eval, cfg.split_seed) for k, v in tests.items()}
    if len(class_names) < 2:
        raise DataError(
            f"{name}: only one class ({class_names[0] if class_names else 'none'}); a classifier "
            "needs at least two classes: point the data at a folder or CSV with more"
        )
    # One check over every set: each image decoded once, by parallel workers, and remembered.
    parts = [train, val, *tests.values()]
    everything = [s for part in parts for s in part]
    checked = everything
    if len(everything) > RECORD_CHECK and any(is_record(s.path) for s in everything):
        checked = random.Random(cfg.split_seed).sample(everything, RECORD_CHECK)
    _, report = check_samples(checked, cfg.on_bad_image)
    if checked is not everything:
        report.sampled_from = len(everything)
    kept = [[s for s in part if os.path.abspath(s.path) not in report.bad] for part in parts]
    train, val, *test_parts = kept
    bad = sum(map(len, parts)) - sum(map(len, kept))
    if not train and stream is None:
        raise DataError(
            f"{name}: no training images left after the split and the image check; add images "
            "or lower data.val_fraction / data.test_fraction"
        )
    for set_name, part in {"val": val, **dict(zip(tests, test_parts, strict=True))}.items():
        if not part:
            raise DataError(
                f"{name}: evaluation set '{set_name}' is empty (too few images, or all bad); add "
                "images, or raise data.val_fraction / data.test_fraction for the ID sets"
            )
    tests = dict(zip(tests, test_parts, strict=True))
    groups = {}
    if group_of is not None:
        groups = {k: [group_of[s.path] for s in v] for k, v in {"val": val, **tests}.items()}
    return Benchmark(
        name=name,
        class_names=class_names,
        templates=tpl.get_templates(cfg.templates) if cfg.templates else templates,
        train=train,
        val=val,
        tests=tests,
        id_name=id_name,
        ood_names=[k for k in tests if k != id_name],
        metric=metric,
        skipped_images=bad,
        skipped_links=skipped_links,
        image_check=report,
        stream=stream,
        class_subsets={k: v for k, v in (class_subsets or {}).items() if k in tests},
        groups=groups,
    )
