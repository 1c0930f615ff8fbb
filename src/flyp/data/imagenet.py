"""ImageNet and its distribution shifts, read from their usual on-disk layouts.

Every set is labelled in the 1000-class ImageNet space (``imagenet_wnids()`` order):

  imagenet         <imagenet>/train/<wnid>/*.JPEG and <imagenet>/val/<wnid>/*.JPEG
  imagenet-v2      <imagenetv2-matched-frequency-format-val>/<0..999>/*.jpeg (folder = class index)
  imagenet-sketch  <sketch>/<wnid>/*.JPEG (1000 classes)
  imagenet-r       <imagenet-r>/<wnid>/*.jpg (200 classes: logits restricted to them)
  imagenet-a       <imagenet-a>/<wnid>/*.jpg (200 classes: logits restricted to them)
  objectnet        <objectnet-1.0>/images/<objectnet folder>/*.png (the 113 classes shared with
                   ImageNet; logits restricted to their 125 ImageNet classes)

A set's folder is ``data.roots[<set name>]`` or ``<data.root>/<folder above>``. The ID set is
ImageNet: a seeded ``val_fraction`` slice of train is the validation set (model selection),
ImageNet val is the ID test set. The OOD sets are those of ``data.ood_domains`` whose folder
exists (a warning names the missing ones; ``Benchmark.ood_names`` records those used).
"""

from __future__ import annotations

import warnings
from functools import cache
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from flyp.data.folders import DataError, Sample, account_links, require_dir
from flyp.data.imagenet_meta import IMAGENET_A_WNIDS, IMAGENET_R_WNIDS, OBJECTNET_TO_IMAGENET
from flyp.data.paper import images_in, labelled_folders, set_root
from flyp.data.sets import Benchmark, finish
from flyp.data.splits import stratified_split
from flyp.recipe import DataConfig

FOLDERS = {
    "imagenet": "imagenet",
    "imagenet-v2": "imagenetv2-matched-frequency-format-val",
    "imagenet-sketch": "sketch",
    "imagenet-r": "imagenet-r",
    "imagenet-a": "imagenet-a",
    "objectnet": "objectnet-1.0",
}
SHIFTS = [name for name in FOLDERS if name != "imagenet"]
OBJECTNET_FOLDERS = sorted(OBJECTNET_TO_IMAGENET)  # the 113 ObjectNet classes, in this order


@cache
def imagenet_wnids() -> list[str]:
    """The 1000 WordNet ids in the standard class-index order (timm's copy of the list)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_label_name(i) for i in range(info.num_classes())]


def imagenet_class_names() -> list[str]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return list(IMAGENET_CLASSNAMES)


def imagenet_templates(kind: str = "openai") -> list[str]:
    """open_clip's ImageNet prompts ("openai": 80, "simple": 7) as ``str.format`` templates."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    prompts = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}[kind]
    return [make("{}") for make in prompts]


def class_index() -> dict[str, int]:
    return {w: i for i, w in enumerate(imagenet_wnids())}


def subset_indices(wnids: list[str]) -> list[int]:
    index = class_index()
    return sorted(index[w] for w in wnids)


def objectnet_groups() -> list[list[int]]:
    """ImageNet class indices of each ObjectNet class (``OBJECTNET_FOLDERS`` order)."""
    index = class_index()
    return [[index[w] for w in OBJECTNET_TO_IMAGENET[f]] for f in OBJECTNET_FOLDERS]


def objectnet_logits(logits: Tensor) -> Tensor:
    """1000-class logits to the 113 ObjectNet classes: each takes its best ImageNet class.

    This is the usual ObjectNet protocol; ``objectnet_label_of`` maps a 1000-space label back.
    """
    return torch.stack([logits[:, group].max(dim=1).values for group in objectnet_groups()], dim=1)


def objectnet_label_of(imagenet_label: int) -> int:
    for i, group in enumerate(objectnet_groups()):
        if imagenet_label in group:
            return i
    raise ValueError(f"ImageNet class {imagenet_label} is not mapped to an ObjectNet class")


def crop_border(image: Image.Image, pixels: int = 1) -> Image.Image:
    """ObjectNet images carry a 1-pixel red border; crop it off before the model's transform."""
    width, height = image.size
    return image.crop((pixels, pixels, width - pixels, height - pixels))


def read_wnid_folders(folder: Path, what: str, allowed: list[str] | None = None) -> list[Sample]:
    """<folder>/<wnid>/<image>, labelled by ImageNet class index; files next to the class
    folders (README.txt of ImageNet-A) are ignored."""
    index = class_index()
    if allowed is not None:
        index = {w: index[w] for w in allowed}
    return labelled_folders(folder, index, what)


def read_imagenet_v2(folder: Path) -> list[Sample]:
    """ImageNetV2 (any of its three variants): class folders named by class index 0..999."""
    return labelled_folders(folder, {str(i): i for i in range(1000)}, "ImageNetV2 (folders 0..999)")


def read_objectnet(folder: Path) -> list[Sample]:
    """ObjectNet images of the classes shared with ImageNet; the label is the first ImageNet
    class of the ObjectNet class (see ``objectnet_logits`` for the exact protocol)."""
    images = folder / "images" if (folder / "images").is_dir() else folder
    index = class_index()
    account_links(images, None, "class folder")  # a class folder that leads nowhere: refused
    samples = []
    for name in OBJECTNET_FOLDERS:
        sub = images / name
        if sub.is_dir():
            label = index[OBJECTNET_TO_IMAGENET[name][0]]
            samples.extend(Sample(str(p), label) for p in images_in(sub))
    if not samples:
        raise DataError(f"{images} holds none of ObjectNet's ImageNet classes (e.g. {images / 'alarm_clock'})")
    return samples


def read_shift(name: str, folder: Path) -> tuple[list[Sample], list[int] | None]:
    """Samples of one shift set and the classes its logits are restricted to (None: all)."""
    if name == "imagenet-v2":
        return read_imagenet_v2(folder), None
    if name == "imagenet-sketch":
        return read_wnid_folders(folder, "ImageNet-Sketch"), None
    if name == "imagenet-r":
        return read_wnid_folders(folder, "ImageNet-R", IMAGENET_R_WNIDS), subset_indices(IMAGENET_R_WNIDS)
    if name == "imagenet-a":
        return read_wnid_folders(folder, "ImageNet-A", IMAGENET_A_WNIDS), subset_indices(IMAGENET_A_WNIDS)
    if name == "objectnet":
        return read_objectnet(folder), sorted(i for g in objectnet_groups() for i in g)
    raise DataError(f"unknown ImageNet shift '{name}'; known: {', '.join(SHIFTS)}")


def build_imagenet(cfg: DataConfig) -> Benchmark:
    root = set_root(cfg, "imagenet", FOLDERS["imagenet"])
    if root is None:
        raise DataError("set data.root to the folder holding imagenet/ (and the shift sets), or data.roots.imagenet")
    root = require_dir(root, "ImageNet folder", "it must hold train/<wnid>/ and val/<wnid>/")
    train_all = read_wnid_folders(require_dir(root / "train", "ImageNet train", "expected train/<wnid>/*.JPEG"), "ImageNet")
    test = read_wnid_folders(require_dir(root / "val", "ImageNet val", "expected val/<wnid>/*.JPEG (sorted into class folders)"), "ImageNet")
    train, val = stratified_split(train_all, [cfg.val_fraction], cfg.split_seed)
    tests: dict[str, list[Sample]] = {"imagenet": test}
    subsets: dict[str, list[int]] = {}
    missing = []
    for name in cfg.ood_domains:
        if name not in FOLDERS or name == "imagenet":
            raise DataError(f"data.ood_domains: '{name}' is not an ImageNet shift; known: {', '.join(SHIFTS)}")
        folder = set_root(cfg, name, FOLDERS[name])
        if folder is None or not folder.is_dir():
            missing.append(f"{name} ({folder})")
            continue
        tests[name], subset = read_shift(name, folder)
        if subset is not None:
            subsets[name] = subset
    if missing:
        warnings.warn(f"ImageNet shift sets not found, left out: {', '.join(missing)}", stacklevel=2)
    bench = finish(
        cfg,
        "imagenet",
        imagenet_class_names(),
        imagenet_templates("openai"),
        train,
        val,
        tests,
        id_name="imagenet",
        class_subsets=subsets,
    )
    if "objectnet" in bench.tests:
        bench.label_groups["objectnet"] = objectnet_groups()
        bench.preprocess["objectnet"] = crop_border
    return bench
