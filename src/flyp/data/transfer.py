"""Transfer and few-shot benchmarks, read from the folders torchvision downloads into
(``data.root`` is the folder given to torchvision as ``root``; the dataset folder inside it, or
the dataset folder itself, both work):

  caltech101      caltech101/101_ObjectCategories/<category>/*.jpg (BACKGROUND_Google is no class);
                  no official split: seeded, stratified val_fraction / test_fraction
  stanford_cars   stanford_cars/devkit/{cars_meta,cars_train_annos}.mat, cars_train/,
                  cars_test/, cars_test_annos_withlabels.mat; a seeded val slice of train
  flowers102      flowers-102/jpg/image_00001.jpg, imagelabels.mat, setid.mat (official split)
  pcam            pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5 (needs h5py);
                  the patches are written once as PNG files to pcam/png/<split>/
  sst2            rendered-sst2/{train,valid,test}/{negative,positive}/*.png

Few-shot: ``data.k_shot`` keeps exactly k training images per class (:func:`k_shot`).
"""

from __future__ import annotations

from pathlib import Path

from flyp.data import templates as tpl
from flyp.data.folders import DataError, Sample, class_folders, require_dir
from flyp.data.paper import images_in, labelled_folders
from flyp.data.sets import Benchmark, finish, k_shot
from flyp.data.splits import stratified_split
from flyp.recipe import DataConfig

__all__ = ["build_caltech101", "build_flowers102", "build_pcam", "build_stanford_cars", "build_sst2", "k_shot"]

# Caltech101 folders named as the reference names their classes (locuslab/FLYP,
# src/datasets/caltech101.py); every other folder: underscores as spaces, lower case.
CALTECH_NAMES = {
    "Faces": "off-center face",
    "Faces_easy": "centered face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
    "airplanes": "airplane",
    "car_side": "side of a car",
    "cougar_body": "body of a cougar cat",
    "cougar_face": "face of a cougar cat",
    "crocodile_head": "head of a crocodile",
    "flamingo_head": "head of a flamingo",
    "snoopy": "snoopy (cartoon beagle)",
    "yin_yang": "yin and yang symbol",
}
# torchvision's Flowers102 names that the reference (OpenAI's CLIP list) spells otherwise.
FLOWERS_NAMES = {
    "globe-flower": "globe flower",
    "pink-yellow dahlia?": "pink and yellow dahlia",
    "ball moss": "air plant",
}
PCAM_CLASSES = ["lymph node", "lymph node containing metastatic tumor tissue"]
SST2_CLASSES = ["negative", "positive"]


def _folder(cfg: DataConfig, name: str, marker: str) -> Path:
    """The dataset folder: ``<root>/<name>`` when it holds ``marker``, else ``<root>`` itself."""
    if cfg.root is None:
        raise DataError(f"set data.root to the folder holding {name}/ (torchvision's root)")
    root = require_dir(Path(cfg.root), "data root", f"it must hold {name}/{marker}")
    for candidate in (root / name, root):
        if (candidate / marker).exists():
            return candidate
    raise DataError(f"neither {root / name / marker} nor {root / marker} exists; is data.root the torchvision root?")


def _loadmat(path: Path) -> dict:
    from scipy.io import loadmat

    if not path.is_file():
        raise DataError(f"{path} does not exist")
    return loadmat(path, squeeze_me=True)


def _split_train(cfg: DataConfig, samples: list[Sample]) -> tuple[list[Sample], list[Sample]]:
    train, val = stratified_split(samples, [cfg.val_fraction], cfg.split_seed)
    return train, val


def build_caltech101(cfg: DataConfig) -> Benchmark:
    folder = _folder(cfg, "caltech101", "101_ObjectCategories") / "101_ObjectCategories"
    folders = [c for c in class_folders(folder) if c != "BACKGROUND_Google"]
    samples = [Sample(str(p), label) for label, c in enumerate(folders) for p in images_in(folder / c)]
    train, val, test = stratified_split(samples, [cfg.val_fraction, cfg.test_fraction], cfg.split_seed)
    names = [CALTECH_NAMES.get(c, c.replace("_", " ").lower()) for c in folders]
    return finish(
        cfg, "caltech101", names, tpl.CALTECH101, train, val, {"test": test}, id_name="test"
    )


def build_stanford_cars(cfg: DataConfig) -> Benchmark:
    folder = _folder(cfg, "stanford_cars", "devkit")
    # "Ram C/V Cargo Van Minivan 2012" is "Ram C-V ..." in the reference's class list.
    meta = _loadmat(folder / "devkit" / "cars_meta.mat")["class_names"].tolist()
    names = [str(n).replace("/", "-") for n in meta]

    def read(annotations: Path, images: Path) -> list[Sample]:
        return [Sample(str(images / str(a["fname"])), int(a["class"]) - 1) for a in _loadmat(annotations)["annotations"]]

    train, val = _split_train(cfg, read(folder / "devkit" / "cars_train_annos.mat", folder / "cars_train"))
    test = read(folder / "cars_test_annos_withlabels.mat", folder / "cars_test")
    return finish(
        cfg, "stanford_cars", names, tpl.STANFORD_CARS, train, val, {"test": test}, id_name="test"
    )


def build_flowers102(cfg: DataConfig) -> Benchmark:
    from torchvision.datasets import Flowers102

    folder = _folder(cfg, "flowers-102", "setid.mat")
    labels = _loadmat(folder / "imagelabels.mat")["labels"].tolist()
    ids = _loadmat(folder / "setid.mat")

    def part(key: str) -> list[Sample]:
        return [Sample(str(folder / "jpg" / f"image_{i:05d}.jpg"), int(labels[i - 1]) - 1) for i in ids[key].tolist()]

    return finish(
        cfg, "flowers102", [FLOWERS_NAMES.get(c, c) for c in Flowers102.classes], tpl.FLOWERS102,
        part("trnid"), part("valid"), {"test": part("tstid")}, id_name="test",
    )


def _pcam_split(folder: Path, split: str) -> list[Sample]:
    """The patches of one split as PNG files, written once (with labels.txt) from the HDF5."""
    out = folder / "png" / split
    if not (out / ".complete").exists():
        _export_pcam(folder, split, out)
    labels = [int(v) for v in (out / "labels.txt").read_text().split()]
    return [Sample(str(out / f"{i:06d}.png"), label) for i, label in enumerate(labels)]


def _export_pcam(folder: Path, split: str, out: Path) -> None:
    try:
        import h5py
    except ImportError as err:
        raise DataError("PatchCamelyon is stored as HDF5 files: pip install h5py") from err
    from PIL import Image

    x_path = folder / f"camelyonpatch_level_2_split_{split}_x.h5"
    y_path = folder / f"camelyonpatch_level_2_split_{split}_y.h5"
    for path in (x_path, y_path):
        if not path.is_file():
            raise DataError(f"{path} does not exist (torchvision's PCAM layout)")
    out.mkdir(parents=True, exist_ok=True)
    with h5py.File(y_path, "r") as f:
        labels = [int(v) for v in f["y"][:].reshape(-1)]
    with h5py.File(x_path, "r") as f:
        images = f["x"]
        if images.shape[0] != len(labels):
            raise DataError(f"{x_path} has {images.shape[0]} patches but {y_path} {len(labels)} labels")
        for i in range(len(labels)):
            Image.fromarray(images[i]).save(out / f"{i:06d}.png")
    (out / "labels.txt").write_text("\n".join(map(str, labels)) + "\n")
    (out / ".complete").touch()


def build_pcam(cfg: DataConfig) -> Benchmark:
    try:
        folder = _folder(cfg, "pcam", "camelyonpatch_level_2_split_train_y.h5")
    except DataError:
        folder = _folder(cfg, "pcam", "png/train/.complete")  # already exported, h5 files gone
    return finish(
        cfg, "pcam", PCAM_CLASSES, tpl.PCAM,
        _pcam_split(folder, "train"), _pcam_split(folder, "valid"), {"test": _pcam_split(folder, "test")}, id_name="test",
    )


def build_sst2(cfg: DataConfig) -> Benchmark:
    folder = _folder(cfg, "rendered-sst2", "train")
    index = {c: i for i, c in enumerate(SST2_CLASSES)}

    def part(split: str) -> list[Sample]:
        return labelled_folders(require_dir(folder / split, "rendered SST2 split", "expected train/, valid/, test/"), index, "rendered SST2")

    return finish(
        cfg, "sst2", SST2_CLASSES, tpl.SST2, part("train"), part("valid"), {"test": part("test")}, id_name="test",
    )

