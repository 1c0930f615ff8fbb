"""Training streamed from WebDataset shards (``data.stream: true`` with ``data.benchmark: wds``),
or from a Hugging Face dataset's data files (``data.benchmark: hf``: the ID split's Parquet or
Arrow files are the shards, read a row group at a time, :func:`read_table`; built by
:mod:`flyp.data.hf`, an epoch's length from the files' own row counts).

Nothing of the training shards is listed up front. The ID domain's shards are split whole,
seeded by ``data.split_seed``: about ``data.val_fraction`` of them are ID validation and
``data.test_fraction`` ID test (at least one each). Only those, and the OOD domains, are indexed
as :mod:`flyp.data.shards` indexes (their tar headers), so evaluation works on them unchanged.
The training shards are read in sequence as the run trains; an epoch's length is
``data.train_samples``, or the training shards' counts in ``sizes.json`` beside them
(WebDataset's and open_clip's convention: ``{"train-000.tar": 10000, ...}``).

The stream of epoch e is fixed by the run seed alone:

- the training shards are permuted with a generator seeded from (seed, e); rank r of W
  processes takes ``shards[r::W]``, so under torchrun each rank opens only its own shards;
- the rank's shards are dealt to L *lanes* (``[l::L]``), L = its loader workers (at most its
  shards; fixed when the run starts and kept at a resume); a lane reads its shards one after the
  other, members in order, through a shuffle buffer of ``data.shuffle_buffer`` samples whose
  generator is seeded from (seed, e, rank, lane) and also draws each sample's augmentation seed;
- an epoch is ``samples // global batch`` steps; batch i of a rank comes from lane i % L (the
  DataLoader's in-order round robin over its workers), so every lane yields exactly its share of
  full batches, starting its shards again when they run out (the buffer's generator goes on),
  and no rank waits for another;
- resuming at step k of an epoch, each lane reads past its part of the first k batches without
  decoding an image, so the run goes on with the batches the uninterrupted run trained on.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flyp.data.folders import DataError, Sample, decode_source, nfc
from flyp.data.loader import PREFETCH, _own_generator, pins, seeded, worker_count
from flyp.data.shards import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSIONS,
    _label,
    _split,
    build_wds,
    class_index,
    container_name,
    found_domains,
    index_shard,
    named_classes,
)
from flyp.errors import RunError
from flyp.recipe import DataConfig

SIZES = "sizes.json"
FIX_STREAM = "or set data.stream: false"


def _names(shards: tuple[str, ...] | list[str], shown: int = 4) -> str:
    names = [Path(s).name for s in shards]
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class StreamSpec:
    """What a streamed training set is: its shards, an epoch's samples and where that number
    comes from, the shards held out as ID validation and test, and the class names."""

    shards: tuple[str, ...]
    samples: int
    source: str  # "sizes.json" or "data.train_samples"
    val_shards: tuple[str, ...]
    test_shards: tuple[str, ...]
    class_names: tuple[str, ...]
    id_domain: str
    # a Hugging Face dataset's data files (Parquet or Arrow) instead of tar shards: its columns
    image_column: str | None = None
    label_column: str | None = None

    def summary(self) -> str:
        unit = "shards" if self.image_column is None else "files"
        return (
            f"training set streamed from {len(self.shards)} {unit} ({self.samples} samples per "
            f"{self.source}), never indexed; ID validation {unit}: {_names(self.val_shards)}; "
            f"ID test {unit}: {_names(self.test_shards)}"
        )


def split_shards(
    shards: list[str], cfg: DataConfig, unit: str = "shards"
) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test) shards of the ID domain: whole shards, seeded by split_seed."""
    n = len(shards)
    n_val = max(1, round(n * cfg.val_fraction))
    n_test = max(1, round(n * cfg.test_fraction))
    if n - n_val - n_test < 1:
        raise DataError(
            f"data.stream holds out whole {unit} of the ID domain '{cfg.id_domain}' for "
            f"validation ({n_val}) and test ({n_test}), and its {n} {unit} leave none to train "
            f"on; write it as more {unit} (at least {n_val + n_test + 1}), {FIX_STREAM}"
        )
    order = random.Random(cfg.split_seed).sample(sorted(shards), n)
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    return sorted(train), sorted(val), sorted(test)


def _sizes(folder: Path) -> dict[str, int] | None:
    file = folder / SIZES
    if not file.is_file():
        return None
    try:
        sizes = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(sizes, dict):
            raise ValueError("not an object")
        return {str(k): int(v) for k, v in sizes.items()}
    except (ValueError, TypeError, OSError) as err:
        raise DataError(
            f"{file} is not a JSON object of shard names and sample counts ({err}); write "
            '{"train-000.tar": 10000, ...}, or set data.train_samples'
        ) from None


def epoch_samples(cfg: DataConfig, train: list[str]) -> tuple[int, str]:
    """(an epoch's samples, where that number comes from): data.train_samples, else the sum of
    the training shards' counts in the sizes.json beside them."""
    if cfg.train_samples is not None:
        return cfg.train_samples, "data.train_samples"
    total = 0
    for shard in train:
        sizes = _sizes(Path(shard).parent)
        where = Path(shard).parent / SIZES
        if sizes is None:
            raise DataError(
                f"data.stream does not read the training shards to count them, and there is no "
                f'{where}: write it ({{"{Path(shard).name}": <samples>, ...}}, one entry a '
                "shard, as WebDataset's tools write it), or set data.train_samples"
            )
        if Path(shard).name not in sizes:
            raise DataError(
                f"{where} has no count for {Path(shard).name}, a training shard; add it, or set "
                "data.train_samples"
            )
        total += sizes[Path(shard).name]
    return total, SIZES


def build_shards(cfg: DataConfig):
    """``data.benchmark: wds``: every shard indexed (flyp.data.shards), or with data.stream the
    training shards streamed."""
    return build_streamed(cfg, found_domains(cfg)) if cfg.stream else build_wds(cfg)


def build_streamed(cfg: DataConfig, found: dict[str, list[str]]):
    """The benchmark whose ID training set is streamed: validation, test and OOD indexed."""
    from flyp.data import templates as tpl
    from flyp.data.benchmarks import assemble

    every = [shard for d in dict.fromkeys([cfg.id_domain, *cfg.ood_domains]) for shard in found[d]]
    classes = named_classes(cfg, every)
    if classes is None:
        raise DataError(
            "data.stream reads the training labels only as it trains, so the class names must "
            f"be known first: write {Path(every[0]).parent / 'classes.txt'} (one name a line, in "
            f"index order) or set data.classes_file, {FIX_STREAM}"
        )
    train, val, test = split_shards(found[cfg.id_domain], cfg)
    samples, source = epoch_samples(cfg, train)

    def indexed(shards: list[str]) -> list[Sample]:
        return [
            Sample(image, class_index(label, key, container_name(image), classes, cfg.id_domain))
            for shard in shards
            for key, image, label in index_shard(shard)
        ]

    domains = {d: indexed(found[d]) for d in cfg.ood_domains}
    spec = StreamSpec(
        tuple(train), samples, source, tuple(val), tuple(test), tuple(classes), cfg.id_domain
    )
    parts = ([], indexed(val), indexed(test))
    return assemble(cfg, "wds", classes, tpl.SIMPLE, domains, id_parts=parts, stream=spec)


# (where, image bytes, class index): one sample as a lane holds it, undecoded
Item = tuple[str, bytes, int]


def read_table(file: str, spec: StreamSpec) -> Iterator[Item]:
    """The rows of one Parquet or Arrow data file in order, a row group (a record batch) at a
    time, image bytes and label together."""

    def batches():
        if file.endswith(".parquet"):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(file)
            for group in range(pf.num_row_groups):
                yield pf.read_row_group(group, columns=[spec.image_column, spec.label_column])
        else:
            from flyp.data.records import _arrow_table

            yield _arrow_table(file).select([spec.image_column, spec.label_column])

    classes = list(spec.class_names)  # once a file, not once a row
    row = 0
    try:
        for table in batches():
            images = table.column(0).to_pylist()
            labels = table.column(1).to_pylist()
            for cell, value in zip(images, labels, strict=True):
                where = f"{file} row {row}"
                data = cell.get("bytes") if isinstance(cell, dict) else cell
                if data is None:
                    raise DataError(
                        f"{where}: the image cell holds no bytes (a path to a file elsewhere?); "
                        f"write the images into the dataset, {FIX_STREAM}"
                    )
                if value is None:
                    raise DataError(f"{where}: the label is empty; fix the row, {FIX_STREAM}")
                if isinstance(value, str):
                    value = nfc(value)
                yield where, data, class_index(value, f"row {row}", file, classes, spec.id_domain)
                row += 1
    except OSError as err:
        raise DataError(f"cannot read {file} ({err}); replace it or leave it out") from None


def read_source(shard: str, spec: StreamSpec) -> Iterator[Item]:
    """One shard's samples in order: a tar shard, or a Hugging Face data file."""
    if spec.image_column is not None:
        return read_table(shard, spec)
    return read_shard(shard, spec.class_names, spec.id_domain)


def read_shard(shard: str, classes: tuple[str, ...], id_domain: str) -> Iterator[Item]:
    """The samples of one shard in tar order, read in one forward pass: the consecutive members
    sharing a key (WebDataset's rule), one image and its label (.cls, .txt or .json)."""
    key = image = label = None
    rank = len(LABEL_EXTENSIONS)
    names = list(classes)  # once a shard, not once a sample

    def done() -> Item | None:
        if image is None:
            return None  # a key without an image (a caption or metadata alone) is no sample
        where = f"{shard} member {image[0]}"
        if label is None:
            raise DataError(
                f"{shard}: sample '{key}' has an image but no label (.cls, .txt or .json); add "
                "one or remove the sample"
            )
        return where, image[1], class_index(label, key, where, names, id_domain)

    try:
        with _open_tar(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name, ext = _split(member.name)
                if name != key:
                    if (item := done()) is not None:
                        yield item
                    key, image, label, rank = name, None, None, len(LABEL_EXTENSIONS)
                if ext in IMAGE_EXTENSIONS and image is None:
                    image = (member.name, tar.extractfile(member).read())
                elif ext in LABEL_EXTENSIONS and LABEL_EXTENSIONS.index(ext) < rank:
                    data = tar.extractfile(member).read()
                    label = _label(ext, data, f"{shard} member {member.name}")
                    rank = LABEL_EXTENSIONS.index(ext)
            if (item := done()) is not None:
                yield item
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"cannot read shard {shard} ({err}); replace it or leave it out") from None


def _open_tar(shard: str) -> tarfile.TarFile:
    """A shard opened for one forward pass (the one place the stream opens a shard). Read as a
    file, not in tarfile's pipe mode ("r|"), which parsed each sample 2.5x slower (~150 against
    ~60 us) through its own buffering; the reads are the same, in order."""
    return tarfile.open(shard, "r:")


FIX_BAD = "remove or replace it (a streamed training image is never skipped)"


class ShardStream(IterableDataset):
    """A rank's training samples of an epoch, ``(image, label, seed)`` as
    :class:`flyp.data.loader.ImageDataset` gives them, with :class:`EpochSampler`'s
    ``set_epoch(epoch, start)`` and ``steps_per_epoch``. ``lanes``: set by :func:`stream_loader`
    (the loader's workers, each reading its own lane)."""

    def __init__(
        self,
        spec: StreamSpec,
        transform: Callable,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        buffer: int = 1000,
    ):
        self.spec, self.transform, self.seed = spec, transform, seed
        self.batch_size, self.rank, self.world, self.buffer = batch_size, rank, world, buffer
        self.lanes, self.epoch, self.start = 1, 0, 0

    def steps_per_epoch(self) -> int:
        return self.spec.samples // (self.batch_size * self.world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Stream ``epoch`` from step ``start`` on at the next iteration."""
        self.epoch, self.start = epoch, start

    def shards_of(self, lane: int | None = None) -> list[str]:
        """This rank's shards of the epoch (of one lane, if given)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.spec.shards), generator=g).tolist()
        mine = [self.spec.shards[i] for i in order][self.rank :: self.world]
        return mine if lane is None else mine[lane :: self.lanes]

    def _passes(self, shards: list[str]) -> Iterator[tuple[bool, Item]]:
        """(first pass?, sample) of the lane's shards, read again and again."""
        first = True
        while True:
            empty = True
            for shard in shards:
                for item in read_source(shard, self.spec):
                    empty = False
                    yield first, item
            if empty:
                raise DataError(
                    f"the training shards {_names(shards)} hold no samples; remove them, "
                    f"{FIX_STREAM}"
                )
            first = False

    def lane_items(self, lane: int) -> Iterator[tuple[Item, int]]:
        """(sample, its seed) of one lane from the epoch's step ``start`` on; those before are
        read (their place in the buffer, their draws) but not decoded."""
        steps = self.steps_per_epoch()
        total = len(range(lane, steps, self.lanes)) * self.batch_size
        skip = len(range(lane, min(self.start, steps), self.lanes)) * self.batch_size
        if total == skip:
            return
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, lane])
        buffer: list[Item] = []
        drawn = 0
        for first, item in self._passes(self.shards_of(lane)):
            if first and len(buffer) < self.buffer:
                buffer.append(item)  # the buffer fills in the first pass over the lane's shards
                continue
            j = int(rng.integers(len(buffer)))
            out, buffer[j] = buffer[j], item
            seed = int(rng.integers(2**62))
            if drawn >= skip:
                yield out, seed
            drawn += 1
            if drawn == total:
                return

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.lanes:
            raise RuntimeError(f"{workers} loader workers for {self.lanes} stream lanes")
        # the loader's j-th batch comes from worker j % L; it is the epoch's batch start + j
        lane = (worker + self.start) % self.lanes
        for (where, data, label), seed in self.lane_items(lane):
            try:
                image = decode_source(io.BytesIO(data))
            except Exception as err:  # noqa: BLE001 - any decode failure is this image's fault
                raise DataError(
                    f"cannot read image {where} ({type(err).__name__}: {err}); {FIX_BAD}"
                ) from err
            yield seeded(self.transform, image, label, seed)


def stream_loader(
    stream: ShardStream,
    num_workers: int | str,
    device: torch.device | str,
    saved: dict | None = None,
) -> tuple[DataLoader, dict]:
    """The loader of a streamed training set, and its layout ({"world", "lanes"}) for the
    checkpoint. The lanes are the loader's workers, at most the rank's shards (each lane reads
    its own); ``saved``: the layout a resumed run started with, which it keeps."""
    n = len(stream.spec.shards)
    if n < stream.world:
        raise RunError(
            f"data.stream gives each process its own training shards, and {n} shards cannot "
            f"serve {stream.world} processes; write the data as more (smaller) shards, "
            f"{FIX_STREAM}"
        )
    workers = worker_count(num_workers, device)
    lanes = max(1, min(workers, n // stream.world))
    if saved is not None:
        if saved["world"] != stream.world:
            raise RunError(
                f"this run streamed its shards over {saved['world']} processes, each reading its "
                f"own, and is resumed with {stream.world}; resume it with {saved['world']} "
                "(torchrun --nproc-per-node), or start a new run with --out"
            )
        lanes = saved["lanes"]  # the stream's lanes are its workers: kept as the run began
    stream.lanes = lanes
    processes = lanes if lanes > 1 or workers > 0 else 0
    loader = DataLoader(
        stream,
        batch_size=stream.batch_size,
        num_workers=processes,
        # a new set of workers each epoch: each starts from the epoch set_epoch gave
        persistent_workers=False,
        prefetch_factor=PREFETCH if processes else None,
        pin_memory=pins(device),
        generator=_own_generator(),
    )
    return loader, {"world": stream.world, "lanes": lanes}
