"""Torch datasets and loaders with per-sample seeds.

Every training sample is drawn with its own seed (from the run seed, the epoch and its position
in the epoch). The seed drives the image augmentation and the caption template, so a run is
the same whatever the number of workers, and a resumed run replays exactly what the
uninterrupted one would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from flyp.data.folders import Sample, load_rgb


class ImageDataset(Dataset):
    """``decoded``: images already decoded, by sample index (flyp.reuse.DecodedImages); the
    others are read from disk when drawn."""

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable,
        preprocess: Callable | None = None,
        decoded: Mapping[int, Image.Image] | None = None,
    ):
        self.samples = list(samples)
        self.transform = transform
        self.preprocess = preprocess
        self.decoded = decoded or {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        image = self.decoded.get(index)
        if image is None:
            image = load_rgb(sample.path)
        if self.preprocess is not None:
            image = self.preprocess(image)
        if seed is None:
            return self.transform(image), sample.label, -1
        # torchvision's augmentations draw from torch's global generator: seed it for this
        # sample only, leaving the caller's generator as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), sample.label, seed


class EpochSampler(Sampler):
    """A seeded permutation per epoch yielding ``(index, sample_seed)``.

    ``start`` is the number of steps of this epoch already done (to resume mid-epoch). Only
    full global batches are used, so every step is alike. With several processes, rank r takes
    every world-th sample of each global batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        seed: int,
        epoch: int,
        start: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, epoch
        self.start, self.rank, self.world = start, rank, world

    def steps_per_epoch(self) -> int:
        return self.n // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        seeds = torch.randint(0, 2**62, (self.n,), generator=g).tolist()
        used = self.steps_per_epoch() * self.batch_size * self.world
        for pos in range(self.start * self.batch_size * self.world, used):
            if pos % self.world == self.rank:
                yield order[pos], seeds[pos]

    def __len__(self) -> int:
        return (self.steps_per_epoch() - self.start) * self.batch_size


def train_loader(
    dataset: ImageDataset,
    sampler: EpochSampler,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=True,
        persistent_workers=False,
        pin_memory=pin_memory,  # page-locked batches: faster, asynchronous copies to a GPU
        generator=_own_generator(),
    )


class TensorBatches:
    """Batches of an in-memory TensorDataset as slices (views: no per-sample indexing, no
    collation copy), in order, with the DataLoader's ``dataset`` and ``len``."""

    def __init__(self, dataset: TensorDataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for start in range(0, len(self.dataset), self.batch_size):
            yield tuple(t[start : start + self.batch_size] for t in self.dataset.tensors)


def eval_loader(
    dataset: ImageDataset | TensorDataset, batch_size: int, num_workers: int
) -> DataLoader | TensorBatches:
    if isinstance(dataset, TensorDataset):  # already in memory: slices of it
        return TensorBatches(dataset, batch_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, generator=_own_generator())


def _own_generator() -> torch.Generator:
    """A DataLoader draws a seed for its workers each time it is iterated; drawn from the global
    generator, that draw would shift the model's dropout stream (and a resumed run would draw it
    at a different point than the uninterrupted one). Our samples carry their own seeds."""
    return torch.Generator().manual_seed(0)


def materialize(
    dataset: ImageDataset, batch_size: int, num_workers: int, channels_last: bool = False
) -> TensorDataset:
    """Every (image, label) of an evaluation dataset, decoded and transformed once, in memory."""
    images, labels = [], []
    for batch_images, batch_labels, _ in eval_loader(dataset, batch_size, num_workers):
        images.append(batch_images)
        labels.append(batch_labels)
    labels_t = torch.cat(labels)
    # stored in the layout the image tower runs in, so every later pass takes views of it
    layout = torch.channels_last if channels_last else torch.contiguous_format
    images_t = torch.cat(images).contiguous(memory_format=layout)
    return TensorDataset(images_t, labels_t, torch.full_like(labels_t, -1))
