"""Reading labelled images from disk: domain/class folders and CSV files, with checks that name
the file or folder at fault and the fix.

Names are compared in Unicode NFC: macOS writes folder names decomposed (NFD), so 'café' from a
Mac and 'café' typed in a recipe or a CSV are different strings until normalised.
"""

from __future__ import annotations

import csv
import difflib
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
SKIP_HINT = "set data.on_bad_image=skip to leave bad images out"


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file or folder and the fix."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker's DataError is raised again in the main process as
        # DataError("Caught DataError in DataLoader worker ...\n<traceback>\n...DataError: <ours>");
        # keep our one line.
        if message.startswith("Caught DataError") and "DataError: " in message:
            message = message.rsplit("DataError: ", 1)[1].strip()
        super().__init__(message)


class Sample(NamedTuple):
    path: str
    label: int


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def near_hint(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require_dir(path: Path, what: str, fix: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist or is not a folder; {fix}")
    return path


def subfolders(folder: Path) -> dict[str, str]:
    """Visible sub-folders of ``folder`` as {NFC name: name on disk}, sorted by NFC name."""
    found: dict[str, str] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        key = nfc(p.name)
        if key in found:
            raise DataError(
                f"folders '{found[key]}' and '{p.name}' in {folder} are the same name in two "
                "Unicode forms; merge them into one folder"
            )
        found[key] = p.name
    return dict(sorted(found.items()))


def class_folders(domain_dir: Path) -> list[str]:
    """Class folder names of one domain folder as on disk, sorted by their NFC form."""
    return list(subfolders(domain_dir).values())


def check_same_classes(root: Path, domains: Sequence[str]) -> list[str]:
    """All domains must have the same class folders (compared in NFC); the first is the reference.

    ``domains`` are folder names under ``root``. Returns the NFC class names, sorted.
    """
    reference = list(subfolders(root / domains[0]))
    if not reference:
        raise DataError(
            f"{root / domains[0]} has no class folders; expected <domain>/<class>/<image>"
        )
    if len(reference) == 1:
        raise DataError(
            f"{root / domains[0]} has only one class folder ('{reference[0]}'); a classifier "
            "needs at least two classes: add a folder per class"
        )
    for domain in domains[1:]:
        classes = list(subfolders(root / domain))
        unmatched = sorted(set(reference) - set(classes))  # what a misspelt folder could be
        for extra in sorted(set(classes) - set(reference)):
            raise DataError(
                f"class folder '{extra}' in {domain} has no match in {domains[0]}"
                f"{near_hint(extra, unmatched)}; "
                "rename it so every domain has the same class folders"
            )
        for missing in sorted(set(reference) - set(classes)):
            raise DataError(
                f"class folder '{missing}' of {domains[0]} is missing from {domain}"
                f"{near_hint(missing, classes)}; every domain needs the same class folders"
            )
    return reference


def list_domain(root: Path, domain: str, classes: Sequence[str]) -> list[Sample]:
    """Every image of one domain folder, labelled by its class's index in ``classes`` (NFC)."""
    on_disk = subfolders(root / domain)
    samples = []
    for label, name in enumerate(classes):
        folder = root / domain / on_disk[nfc(name)]
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(
                f"class folder {folder} holds no images; add images or remove the folder"
            )
        samples.extend(Sample(str(p), label) for p in files)
    return samples


def read_csv(path: Path) -> list[tuple[str, str]]:
    """Rows of (image path, class name in NFC) from a CSV with a header naming 'path' and 'label'.

    Relative image paths are resolved against the CSV file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"CSV file {path} does not exist; write it or fix data.root / the domain name"
        )
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "path" not in fields or "label" not in fields:
            raise DataError(
                f"{path} needs a header with columns 'path' and 'label', found {fields}; "
                "add the header line 'path,label'"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row["path"] or not row["label"]:
                raise DataError(
                    f"{path}, line {line}: empty path or label; fill it in or delete the line"
                )
            image = Path(row["path"])
            rows.append(
                (
                    str(image if image.is_absolute() else path.parent / image),
                    nfc(row["label"].strip()),
                )
            )
    if not rows:
        raise DataError(f"{path} has a header but no rows; add one 'path,label' line per image")
    return rows


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB the way a person would see the image.

    PIL's ``convert("RGB")`` clips wider modes instead of scaling them: a 16-bit grey image
    becomes white. So:

    - 16-bit grey (``I;16*``, and ``I``, as older Pillows open 16-bit PNGs; wider values
      are clipped to 16 bits) is scaled by 1/257, so 65535 -> 255 and 32896 -> 128;
    - float (``F``) is taken as 0..1 when its maximum is at most 1, else as 0..255;
    - transparency (RGBA, LA, PA, or a palette/grey/RGB image with a transparent colour) is
      composited on white: transparent pixels often store black, and a sketch drawn in black
      on them would otherwise vanish;
    - everything else (L, P, 1, CMYK, YCbCr...) goes through PIL's own conversion.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray(((wide + 128) // 257).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
        grey = np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(path: str) -> Image.Image:
    """Open, decode every pixel and convert to RGB; any failure raises (PIL's own exception)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def load_rgb(path: str) -> Image.Image:
    """The loader's read: the same decode the image check ran, so a checked image loads (a
    failure here means the file changed after the check)."""
    try:
        return decode_rgb(path)
    except Exception as err:  # noqa: BLE001 - any decode failure is this file's fault
        raise DataError(
            f"cannot read image {path} ({type(err).__name__}: {err}); remove or replace it, "
            f"or {SKIP_HINT}"
        ) from err
