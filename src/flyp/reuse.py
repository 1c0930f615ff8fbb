"""What runs of one experiment compute once and share: decoded training images, and the
features of the pretrained image tower.

A comparison trains a dozen runs on the same images and evaluates the same sets dozens of
times. Both caches are exact: a run with them gives bitwise the numbers it gives without.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor, nn

from flyp.data.folders import Sample, load_rgb


def held_bytes(image: Image.Image) -> int:
    """The bytes PIL really holds for a decoded image: it stores an RGB pixel in 4 bytes (RGBX),
    not 3, and every multi-band mode likewise; single-band 8-bit modes take 1 and 16-bit 2."""
    if image.mode in ("1", "L", "P"):
        per_pixel = 1
    elif image.mode.startswith("I;16"):
        per_pixel = 2
    else:
        per_pixel = 4
    return image.width * image.height * per_pixel


def decode_images(
    samples: Sequence[Sample], budget_bytes: float, threads: int = 4
) -> dict[int, Image.Image]:
    """The decoded RGB images of ``samples`` by index, as many as fit in ``budget_bytes`` (in
    sample order; the rest stay on disk and are decoded when drawn). Decoding runs in threads:
    PIL releases the GIL while it decodes."""
    decoded: dict[int, Image.Image] = {}
    if budget_bytes <= 0:
        return decoded
    used = 0
    with ThreadPoolExecutor(threads) as pool:
        for i, image in enumerate(pool.map(lambda s: load_rgb(s.path), samples)):
            used += held_bytes(image)
            if used > budget_bytes:
                break
            decoded[i] = image
    return decoded


@dataclass
class DecodedImages:
    """The training images of an experiment, decoded once (on first use) and shared by its runs;
    the random crop and flip then apply to the decoded image as they would to a fresh one.

    Under torchrun each process holds its own copy of every image, not its shard: the sampler
    draws a new permutation each epoch, so a rank draws a share 1 - (1 - 1/world)^epochs of the
    images over a run (88% for 8 ranks and 16 epochs), the runs of a comparison sharing this
    cache have other seeds, and LP-FT's probe reads every training image on each rank."""

    images: dict[int, Image.Image] | None = None

    def get(self, samples: Sequence[Sample], budget_gb: float) -> dict[int, Image.Image]:
        if self.images is None:
            self.images = decode_images(samples, budget_gb * 2**30)
        return self.images


@dataclass
class FrozenFeatures:
    """Features of the pretrained image tower, computed once per set of images.

    Every evaluation of a model whose image tower still holds the pretrained weights (zero-shot,
    the linear probe, their WiSE-FT points and soups, the probe of LP-FT) reuses them instead
    of running the tower again. ``reference`` holds the image tower's pretrained tensors (its
    parameters and every buffer); a model matches when each is equal, bit for bit.
    """

    reference: dict[str, Tensor]
    features: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @classmethod
    def of(cls, pretrained: dict[str, Tensor], model: nn.Module, image_names: set[str]) -> FrozenFeatures:
        buffers = {name for name, _ in model.named_buffers()}
        return cls({k: v for k, v in pretrained.items() if k in image_names or k in buffers})

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model``'s image tower holds the pretrained tensors. The reference moves to
        the model's device once (on a GPU the comparison then runs there, with no copy of the
        tower to the host per call)."""
        state = model.state_dict()
        if any(k not in state for k in self.reference):
            return False
        device = state[next(iter(self.reference))].device if self.reference else None
        if self.reference and next(iter(self.reference.values())).device != device:
            self.reference = {k: v.to(device) for k, v in self.reference.items()}
        return all(torch.equal(state[k], v) for k, v in self.reference.items())

    def get(self, key: str, compute: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(features, labels) of the set ``key``, computed by ``compute`` the first time."""
        if key not in self.features:
            features, labels = compute()
            self.features[key] = (features.cpu(), labels.cpu())
        return self.features[key]
