"""Reading labelled images from disk: domain/class folders and CSV files, with checks that name
the file or folder at fault and the fix."""

from __future__ import annotations

import csv
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DataError(ValueError):
    """Data that cannot be used as given; the message names the file or folder and the fix."""


class Sample(NamedTuple):
    path: str
    label: int


def _near(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require_dir(path: Path, what: str, fix: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist or is not a folder; {fix}")
    return path


def class_folders(domain_dir: Path) -> list[str]:
    return sorted(p.name for p in domain_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_same_classes(root: Path, domains: Sequence[str]) -> list[str]:
    """All domains must have the same class folders; the first domain is the reference."""
    reference = class_folders(root / domains[0])
    if not reference:
        raise DataError(
            f"{root / domains[0]} has no class folders; expected <domain>/<class>/<image>"
        )
    for domain in domains[1:]:
        classes = class_folders(root / domain)
        for extra in sorted(set(classes) - set(reference)):
            raise DataError(
                f"class folder '{extra}' in {domain} has no match in {domains[0]}{_near(extra, reference)}; "
                "rename it so every domain has the same class folders"
            )
        for missing in sorted(set(reference) - set(classes)):
            raise DataError(
                f"class folder '{missing}' of {domains[0]} is missing from {domain}"
                f"{_near(missing, classes)}; every domain needs the same class folders"
            )
    return reference


def list_domain(root: Path, domain: str, classes: Sequence[str]) -> list[Sample]:
    """Every image of one domain folder, labelled by its class folder's index in ``classes``."""
    samples = []
    for label, name in enumerate(classes):
        folder = root / domain / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataError(
                f"class folder {folder} holds no images; add images or remove the folder"
            )
        samples.extend(Sample(str(p), label) for p in files)
    return samples


def read_csv(path: Path) -> list[tuple[str, str]]:
    """Rows of (image path, class name) from a CSV with a header naming 'path' and 'label'.

    Relative image paths are resolved against the CSV file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file {path} does not exist")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "path" not in fields or "label" not in fields:
            raise DataError(
                f"{path} needs a header with columns 'path' and 'label', found {fields}"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row["path"] or not row["label"]:
                raise DataError(f"{path}, line {line}: empty path or label")
            image = Path(row["path"])
            rows.append(
                (str(image if image.is_absolute() else path.parent / image), row["label"].strip())
            )
    if not rows:
        raise DataError(f"{path} has a header but no rows")
    return rows


def check_images(
    samples: Sequence[Sample], on_bad_image: str = "error", full_decode: bool = False
) -> tuple[list[Sample], int]:
    """Open every image; a bad one is an error naming it, or (``skip``) is dropped and counted.

    ``verify()`` reads headers and checksums cheaply; ``full_decode`` also decodes the pixels,
    which catches truncated files (used when skipping, since a skip cannot happen mid-batch).
    """
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"data.on_bad_image must be 'error' or 'skip', got '{on_bad_image}'")
    kept, bad = [], 0
    for sample in samples:
        try:
            with Image.open(sample.path) as img:
                if full_decode or on_bad_image == "skip":
                    img.load()
                else:
                    img.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
            if on_bad_image == "skip":
                bad += 1
                continue
            raise DataError(
                f"cannot read image {sample.path} ({err}); remove or replace it, or set "
                "data.on_bad_image=skip to leave bad images out"
            ) from err
        kept.append(sample)
    return kept, bad


def load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(
            f"cannot read image {path} ({err}); remove it or set data.on_bad_image=skip"
        ) from err
