"""Torch datasets and loaders with per-sample seeds.

Every training sample is drawn with its own seed (from the run seed, the epoch and its position
in the epoch). The seed drives the image augmentation and the caption template, so a run is
the same whatever the number of workers, and a resumed run replays exactly what the
uninterrupted one would have seen.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from flyp import progress
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
        return seeded(self.transform, image, sample.label, seed)


def seeded(transform: Callable, image: Image.Image, label: int, seed: int | None):
    """(``transform(image)``, label, seed): the transform's random draws made from ``seed``
    (-1 and unseeded for None), so a sample looks the same in every run that draws it, with
    the caller's generator left as it was.

    Only the CPU generator is seeded: torchvision's augmentations draw from it. Not
    torch.manual_seed, which also seeds every CUDA generator: in a process without CUDA
    initialised (a loader worker, a CPU run) it queues that call with a captured stack trace,
    about 0.1 ms a sample (benchmarks/equal_step.py), and in a GPU process without loader
    workers it reset the generator that dropout draws from to the batch's last sample, so
    dropout depended on the number of workers. The images are the same either way."""
    if seed is None:
        return transform(image), label, -1
    cpu = torch.default_generator
    before = cpu.get_state()
    cpu.manual_seed(seed)
    try:
        return transform(image), label, seed
    finally:
        cpu.set_state(before)


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

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Draw ``epoch``'s order from step ``start`` on at the next iteration: one loader (and
        its persistent workers) serves every epoch, with the order a fresh sampler would give."""
        self.epoch, self.start = epoch, start

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


WORKER_CAP = 16  # more decoding processes than this per GPU only add memory and start time
PREFETCH = 4  # batches each worker keeps ready ahead of the step


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or a job
    scheduler's share), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on macOS / Windows
        return os.cpu_count() or 1


def local_processes(device: torch.device) -> int:
    """flyp processes on this machine sharing its cores: torchrun's LOCAL_WORLD_SIZE, else the
    local GPUs in use by a process group started otherwise, else this one process."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        return min(world, torch.cuda.device_count()) if device.type == "cuda" else world
    return 1


def auto_workers(device: torch.device | str, cores: int | None = None) -> int:
    """``data.num_workers: auto``: loader workers for one process of this machine.

    Each local process gets an equal share of the available cores. On a GPU the main process
    only feeds the device, so it keeps one core and the rest decode (at most WORKER_CAP). On a
    CPU the step itself runs on those cores with torch's threads, so a worker takes time from
    it: one worker of 2 cores ran the step at 0.98x of none (docs/scale_and_speed.md); only a
    quarter of the share decodes, none below 4 cores.
    """
    device = torch.device(device)
    share = (available_cores() if cores is None else cores) // local_processes(device)
    spare = share // 4 if device.type == "cpu" else share - 1
    return max(0, min(spare, WORKER_CAP))


def worker_count(setting: int | str, device: torch.device | str = "cpu") -> int:
    """``data.num_workers`` as a number: itself, or :func:`auto_workers` for "auto"."""
    return auto_workers(device) if setting == "auto" else int(setting)


def pins(device: torch.device | str | None) -> bool:
    """Page-locked host memory where batches go to a CUDA device: the copy is then
    asynchronous (``non_blocking``) and faster; elsewhere pinning buys nothing."""
    return device is not None and torch.device(device).type == "cuda"


def train_loader(
    dataset: ImageDataset,
    sampler: EpochSampler,
    batch_size: int,
    num_workers: int | str,
    pin_memory: bool | None = None,
    device: torch.device | str | None = None,
) -> DataLoader:
    """The run's one training loader: built once, iterated once per epoch after
    ``sampler.set_epoch``. Its workers persist between epochs (no new processes, no second
    copy of the decoded-image cache each epoch) and keep PREFETCH batches ready each.
    ``pin_memory`` None: pinned iff ``device`` is CUDA."""
    workers = worker_count(num_workers, device or "cpu")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        prefetch_factor=PREFETCH if workers else None,
        pin_memory=pins(device) if pin_memory is None else pin_memory,
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
    dataset: ImageDataset | TensorDataset,
    batch_size: int,
    num_workers: int | str,
    device: torch.device | str | None = None,
) -> DataLoader | TensorBatches:
    """Batches in order; ``device``: where they go (pinned for CUDA, and "auto" workers)."""
    if isinstance(dataset, TensorDataset):  # already in memory: slices of it
        return TensorBatches(dataset, batch_size)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=worker_count(num_workers, device or "cpu"),
        pin_memory=pins(device),
        generator=_own_generator(),
    )


def _own_generator() -> torch.Generator:
    """A DataLoader draws a seed for its workers each time it is iterated; drawn from the global
    generator, that draw would shift the model's dropout stream (and a resumed run would draw it
    at a different point than the uninterrupted one). Our samples carry their own seeds."""
    return torch.Generator().manual_seed(0)


def materialize(
    dataset: ImageDataset,
    batch_size: int,
    num_workers: int | str,
    channels_last: bool = False,
    device: torch.device | str | None = None,
) -> TensorDataset:
    """Every (image, label) of an evaluation dataset, decoded and transformed once, in memory:
    page-locked when ``device`` is CUDA, so that every later pass copies its batches (views of
    the cache, pinned too) asynchronously."""
    images, labels = [], []
    workers = worker_count(num_workers, device or "cpu")
    for batch_images, batch_labels, _ in eval_loader(dataset, batch_size, workers):
        images.append(batch_images)
        labels.append(batch_labels)
        progress.working(f"decoding images {sum(map(len, labels))}/{len(dataset)}")
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)
    if not images:  # an empty shard of a small set (several ranks)
        return TensorDataset(torch.zeros(0), labels_t, labels_t.clone())
    # stored in the layout the image tower runs in, so every later pass takes views of it
    layout = torch.channels_last if channels_last else torch.contiguous_format
    images_t = torch.cat(images).contiguous(memory_format=layout)
    if pins(device):
        images_t = images_t.pin_memory()
    return TensorDataset(images_t, labels_t, torch.full_like(labels_t, -1))


# Evaluation batches cross from the loader's workers to the device as uint8 (1 byte a pixel, a
# quarter of fp32's shared memory, pinned memory and copy), and the decoded-image cache holds
# them so (4x the images per eval.cache_gb); the last two steps of the transform, ToTensor's
# /255 and the normalisation, run on the device with the same fp32 arithmetic.


def uint8_transform(transform: Callable) -> tuple[Callable, tuple, tuple] | None:
    """``transform`` (a torchvision Compose ending in ToTensor, Normalize) as the same steps
    ending in PILToTensor, with the mean and std that :func:`finish_pixels` applies on the
    device; None for a transform of another shape (it then runs whole in the workers)."""
    from torchvision import transforms as T

    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, T.Compose) or not steps or len(steps) < 2:
        return None
    to_tensor, normalize = steps[-2:]
    if type(to_tensor) is not T.ToTensor or type(normalize) is not T.Normalize or normalize.inplace:
        return None
    return T.Compose([*steps[:-2], T.PILToTensor()]), tuple(normalize.mean), tuple(normalize.std)


def finish_pixels(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images to the model's input: ToTensor's ``float().div(255)``, then Normalize's
    ``sub(mean).div(std)``, in fp32 as torchvision does them (bitwise its output)."""
    x = images.to(torch.float32).div(255)
    mean_t, std_t = _pixel_constants(tuple(mean), tuple(std), x.device)
    return x.sub_(mean_t).div_(std_t)


@functools.cache
def _pixel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalisation's mean and std as (3, 1, 1) fp32 tensors on ``device``, made once: no
    host-to-device copy in a training step."""
    shape = (-1, 1, 1)
    return (
        torch.tensor(mean, dtype=torch.float32, device=device).view(shape),
        torch.tensor(std, dtype=torch.float32, device=device).view(shape),
    )


class OnDevice:
    """A loader's batches moved to ``device`` (non-blocking from pinned memory) with uint8
    images finished there (:func:`finish_pixels`); the loader's ``dataset`` and ``len``."""

    def __init__(self, loader, device: torch.device | str, mean: Sequence[float], std: Sequence[float]):
        self.loader, self.device, self.mean, self.std = loader, torch.device(device), mean, std
        self.dataset = getattr(loader, "dataset", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, *rest in self.loader:
            images = images.to(self.device, non_blocking=True)
            if images.dtype == torch.uint8:
                images = finish_pixels(images, self.mean, self.std)
            yield (images, *rest)
