"""Reading labelled images from disk: domain/class folders and CSV files, with checks that name
the file or folder at fault and the fix.

Names are compared in Unicode NFC: macOS writes folder names decomposed (NFD), so 'café' from a
Mac and 'café' typed in a recipe or a CSV are different strings until normalised. Two names that
differ only in case, spaces or underscores ('Dog', ' dog', 'dog') are refused rather than made two
classes (or domains): they become the same caption, and one image listed under both would land in
two splits.

Text files (CSVs) are read as UTF-8, with or without the byte-order mark Excel writes, or as
UTF-16/32 with a byte-order mark; anything else is refused in one line rather than guessed.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageOps

from flyp.data.records import is_record, open_image
from flyp.paths import link_fault

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
SKIP_HINT = "set data.on_bad_image=skip to leave bad images out"
LINK_FIX = "point it at what exists, or remove it"


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


def name_key(name: str) -> str:
    """What two names must differ in to be two classes or domains: not case, Unicode form,
    surrounding or repeated whitespace, or underscores (folder names show '_' as a space)."""
    folded = unicodedata.normalize("NFKC", name).casefold().replace("_", " ")
    return " ".join(folded.split())


# flyp's own set names: the ID splits, keys of the evaluation sets (``Benchmark.eval_sets``), the
# columns of ``flyp data`` and of metrics.json's "sets". A domain may not be called like one.
OWN_SETS = {
    "train": "the ID training split",
    "val": "the ID validation split",
    "test": "the ID test split",
}
# The columns next to one per set in a comparison's report.md and results.csv
# (flyp.report.table_rows); the ID set's column is '<id> (ID)'.
REPORT_COLUMNS = ("method", "OOD mean", "WiSE α", "WiSE ID", "WiSE OOD mean")


def reserved_names(id_name: str) -> dict[str, str]:
    """{name_key: what it is} of the names that flyp's own sets and columns take, next to which
    set names become keys: a set named like one would replace it or read as it."""
    reserved = {key: f"flyp's own '{key}' set ({what})" for key, what in OWN_SETS.items()}
    reserved |= {name_key(c): f"the report's '{c}' column" for c in REPORT_COLUMNS}
    reserved[name_key(f"{id_name} (ID)")] = f"the report's column of the ID set '{id_name} (ID)'"
    return reserved


def check_domain_names(names: Sequence[str]) -> None:
    """Refuse a domain named like one of flyp's own sets or report columns (an OOD domain 'val'
    would replace the ID validation split that epochs, WiSE-FT's alpha and the probe's C are
    chosen on), and two domains whose names differ only in case, spaces or underscores.
    ``names``: the ID domain first."""
    reserved = reserved_names(names[0]) if names else {}
    seen: dict[str, str] = {}
    for name in names:
        key = name_key(name)
        if key in reserved:
            raise DataError(
                f"domain '{name}' has the name of {reserved[key]}, and their results would be "
                "mixed up; rename the domain (its folder or CSV file, and data.id_domain / "
                "data.ood_domains)"
            )
        if key in seen:
            raise DataError(
                f"domains '{seen[key]}' and '{name}' differ only in case, spaces or underscores; "
                "rename one so the two sets cannot be mistaken for each other"
            )
        seen[key] = name


def read_text(path: Path, what: str = "file") -> str:
    """The text of ``path``: UTF-8 (a byte-order mark, as Excel writes, is dropped), or UTF-16 /
    UTF-32 with a byte-order mark. Other bytes are refused in one line naming the fix."""
    data = Path(path).read_bytes()
    encoding = "utf-8-sig"
    for bom, name in (
        (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16: its mark starts with UTF-16 LE's
        (codecs.BOM_UTF32_BE, "utf-32"),
        (codecs.BOM_UTF16_LE, "utf-16"),
        (codecs.BOM_UTF16_BE, "utf-16"),
    ):
        if data.startswith(bom):
            encoding = name
            break
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        raise DataError(
            f"{what} {path} is not {encoding.upper().replace('-SIG', '')} text (byte "
            f"0x{data[err.start]:02x} at offset {err.start}); save it as UTF-8 (or UTF-16 with "
            "a byte-order mark)"
        ) from None
    if "\x00" in text:
        raise DataError(
            f"{what} {path} holds NUL characters (UTF-16 without a byte-order mark?); save it "
            "as UTF-8"
        )
    return text


def near_hint(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require_dir(path: Path, what: str, fix: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        why = link_fault(path)
        if why:
            raise DataError(f"{what} {path} is {why}; {LINK_FIX} ({fix})")
        raise DataError(f"{what} {path} does not exist or is not a folder; {fix}")
    return path


def account_links(folder: Path, skipped: dict[str, str] | None, what: str) -> None:
    """Every visible link in ``folder`` that leads nowhere is refused in one line naming it
    (``skipped`` None: data.on_bad_image=error) or recorded in ``skipped`` as {path: why} to be
    named and counted (skip): the folder or images it stood for would otherwise be dropped in
    silence. Links named like images are left to the image check, which names them the same
    way. ``what``: what such a link would be ("class folder", "folder")."""
    with os.scandir(folder) as entries:  # is_symlink from the listing: no call per image
        links = sorted(Path(e.path) for e in entries if e.is_symlink())
    for path in links:
        if path.name.startswith(".") or path.suffix.lower() in IMAGE_SUFFIXES:
            continue
        why = link_fault(path)
        if why is None:
            continue
        if skipped is None:
            raise DataError(
                f"{what} {path} is {why}, so its images cannot be read; {LINK_FIX}, or set "
                "data.on_bad_image=skip to leave it out"
            )
        skipped[str(path)] = why


def subfolder_paths(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted (a symbolic link that leads nowhere is none:
    :func:`account_links` names those where flyp reads)."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())


def _check_utf8(path: Path) -> None:
    """A folder name that is not UTF-8 (Python holds its bytes as surrogates): no caption or
    report can show it, and the tokenizers fail on it."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        shown = path.name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise DataError(
            f"folder name '{shown}' in {path.parent} is not valid UTF-8 (another encoding, such "
            "as Latin-1); rename it in UTF-8, e.g. with convmv -f latin1 -t utf8"
        ) from None


def subfolders(folder: Path) -> dict[str, str]:
    """Visible sub-folders of ``folder`` as {NFC name: name on disk}, sorted by NFC name.

    Two folders whose names differ only in Unicode form, case, spaces or underscores ('Dog/'
    and 'dog/') are refused: as classes they would be one caption split in two labels."""
    found: dict[str, str] = {}
    keys: dict[str, str] = {}
    for p in subfolder_paths(folder):
        _check_utf8(p)
        key = nfc(p.name)
        if key in found:
            raise DataError(
                f"folders '{found[key]}' and '{p.name}' in {folder} are the same name in two "
                "Unicode forms; merge them into one folder"
            )
        if not name_key(key):
            raise DataError(
                f"folder '{p.name}' in {folder} has no name but spaces or underscores; "
                "rename it after its class or domain"
            )
        if name_key(key) in keys:
            raise DataError(
                f"folders '{keys[name_key(key)]}' and '{p.name}' in {folder} differ only in "
                "case, spaces or underscores; merge them into one folder (or rename one)"
            )
        found[key] = keys[name_key(key)] = p.name
    return dict(sorted(found.items()))


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted; hidden ones ('.DS_Store', macOS's
    '._photo.jpg' resource forks, which end in .jpg but hold no image) are not images."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def class_folders(domain_dir: Path) -> list[str]:
    """Class folder names of one domain folder as on disk, sorted by their NFC form (a class
    folder that is a link leading nowhere is refused: :func:`account_links`)."""
    account_links(domain_dir, None, "class folder")
    return list(subfolders(domain_dir).values())


def check_same_classes(
    root: Path, domains: Sequence[str], skipped: dict[str, str] | None = None
) -> list[str]:
    """Every domain's class folders must be among the first domain's (compared in NFC): the
    first (the ID domain) is the reference and defines the classes; another domain may cover a
    subset of them, as ImageNet-R covers 200 of ImageNet's 1000 (it is then scored on its own
    classes: :func:`covered_classes`), but not add one, nor cover a single class.

    ``domains`` are folder names under ``root``. Returns the NFC class names, sorted. An image
    directly in a domain folder is refused: no class folder labels it. A link in a domain
    folder that leads nowhere is refused, or recorded in ``skipped`` (:func:`account_links`).
    """
    for domain in domains:
        account_links(root / domain, skipped, "class folder")
        stray = [p.name for p in image_files(root / domain) if p.is_file() or link_fault(p)]
        if stray:
            more = f" and {len(stray) - 3} more" if len(stray) > 3 else ""
            raise DataError(
                f"{root / domain} holds image files directly ({', '.join(stray[:3])}{more}), "
                "outside any class folder; expected <domain>/<class>/<image>: move them into "
                "their class folder or remove them"
            )
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
            why = link_fault(root / domains[0] / extra)
            raise DataError(
                f"class folder '{extra}' in {domain} has no match in {domains[0]}"
                f"{f' (there it is {why})' if why else near_hint(extra, unmatched)}; rename it "
                f"after one of {domains[0]}'s classes or remove it (a domain may lack some of "
                f"{domains[0]}'s classes, not add any)"
            )
        if len(classes) == 1:
            gone = [f"'{m}' is {why}" for m in unmatched if (why := link_fault(root / domain / m))]
            raise DataError(
                f"{root / domain} has only one class folder ('{classes[0]}'"
                f"{''.join(f'; {g}' for g in gone[:2])}): scored on its own "
                f"classes, every prediction would be right; add folders of more of "
                f"{domains[0]}'s classes or leave the domain out"
            )
    return reference


def covered_classes(root: Path, domain: str, classes: Sequence[str]) -> list[int] | None:
    """The indices in ``classes`` of the class folders ``domain`` has, or None when it has all
    of them: a domain covering a subset is scored with the logits restricted to its classes
    (flyp.evaluate.restrict), as ImageNet-R and -A are."""
    present = set(subfolders(root / domain))
    covered = [i for i, name in enumerate(classes) if nfc(name) in present]
    return None if len(covered) == len(classes) else covered


def list_domain(
    root: Path, domain: str, classes: Sequence[str], skipped: dict[str, str] | None = None
) -> list[Sample]:
    """Every image of one domain folder, labelled by its class's index in ``classes`` (NFC).
    A link in a class folder that leads nowhere (but one named like an image: the image check
    names it) is refused, or recorded in ``skipped`` (:func:`account_links`)."""
    on_disk = subfolders(root / domain)
    samples = []
    for label, name in enumerate(classes):
        if nfc(name) not in on_disk:  # a domain covering a subset of the classes
            continue
        folder = root / domain / on_disk[nfc(name)]
        account_links(folder, skipped, "folder")
        nested = [p.name for p in subfolder_paths(folder) if image_files(p)]
        if nested:
            raise DataError(
                f"class folder {folder} holds folders of images ({', '.join(sorted(nested)[:3])})"
                "; only the images directly in a class folder are read: move them up into it "
                "or remove them"
            )
        files = image_files(folder)
        if not files:
            raise DataError(
                f"class folder {folder} holds no images; add images or remove the folder "
                f"(image files end in {', '.join(sorted(IMAGE_SUFFIXES))})"
            )
        samples.extend(Sample(str(p), label) for p in files)
    return samples


def read_csv(path: Path) -> list[tuple[str, str]]:
    """Rows of (image path, class name in NFC) from a CSV with a header naming 'path' and 'label'.

    Relative image paths are resolved against the CSV file's folder. Whitespace around a cell
    or a header name is dropped (``img.png, dog`` as people type it: `` dog`` is ``dog``).
    Refused, naming both lines: an image listed twice (under two labels it is one image in two
    classes; even under one, its copies could land in train and in test), and two labels that
    differ only in case, spaces or underscores ('dog' and 'Dog': one class split in two).
    """
    path = Path(path)
    if not path.is_file():
        why = link_fault(path)
        if why:
            raise DataError(f"CSV file {path} is {why}; {LINK_FIX}")
        what = "is a folder, not a CSV file" if path.is_dir() else "does not exist"
        raise DataError(f"CSV file {path} {what}; write it or fix data.root / the domain name")
    text = io.StringIO(read_text(path, "CSV file"), newline="")
    reader = csv.DictReader(text, skipinitialspace=True)
    fields = [name.strip() for name in reader.fieldnames or []]
    if "path" not in fields or "label" not in fields:
        raise DataError(
            f"{path} needs a header with columns 'path' and 'label', found {fields}; "
            "add the header line 'path,label'"
        )
    twice = [name for name in ("path", "label") if fields.count(name) > 1]
    if twice:  # csv.DictReader would keep the last column of that name without a word
        raise DataError(f"{path}: the header names the column '{twice[0]}' twice; keep one")
    reader.fieldnames = fields
    rows = []
    images: dict[str, tuple[int, str]] = {}  # normalised path -> (line, label)
    spellings: dict[str, tuple[int, str]] = {}  # name_key(label) -> (line, label)
    for row in reader:
        line = reader.line_num
        if None in row:  # more cells than the header: an unquoted comma in a path or label
            raise DataError(
                f"{path}, line {line}: more cells than the header has columns; quote a path or "
                'label that holds a comma ("hot, dog")'
            )
        cell, label = (row["path"] or "").strip(), nfc((row["label"] or "").strip())
        if not cell or not label:
            raise DataError(
                f"{path}, line {line}: empty path or label; fill it in or delete the line"
            )
        image = Path(cell)
        full = str(image if image.is_absolute() else path.parent / image)
        before, before_label = images.setdefault(os.path.normpath(full), (line, label))
        if before != line:
            how = "twice" if before_label == label else f"as '{before_label}' and as '{label}'"
            raise DataError(
                f"{path}, lines {before} and {line}: image {cell} is listed {how}; list each "
                "image once, under its one label"
            )
        before, spelt = spellings.setdefault(name_key(label), (line, label))
        if spelt != label:
            raise DataError(
                f"{path}, lines {before} and {line}: labels '{spelt}' and '{label}' differ only "
                "in case, spaces or underscores; spell each class one way"
            )
        rows.append((full, label))
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
    - everything else (L, P, 1, CMYK, YCbCr...) goes through PIL's own conversion;

    and turned upright first as its EXIF orientation tag says (:func:`upright`).
    """
    img = upright(img)
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


def upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: phones store a photo as the sensor read it and tag
    its rotation (EXIF orientation); shown untagged it is sideways or mirrored. An unreadable
    EXIF block leaves the pixels as stored: it says nothing about the orientation."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to refuse the pixels
        return img
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


# The most elongated image flyp takes: resizing the shorter side to the model's resolution
# scales the longer one by the same factor, so a 1 x 300,000 strip (a 957-byte PNG) became
# 224 x 67 million pixels in evaluation. A 20:1 panorama at 224 px is 1 M pixels (12 MB).
MAX_ASPECT = 20


class ImageShapeError(ValueError):
    """An image too elongated to resize for a model (see MAX_ASPECT)."""


def decode_rgb(path: str) -> Image.Image:
    """Open, decode every pixel, turn upright and convert to RGB; any failure raises (PIL's own
    exception, or ImageShapeError past MAX_ASPECT). Every image flyp reads goes through here:
    training, evaluation, the decoded-image cache, the image check and predict."""
    return decode_source(open_image(path) if is_record(path) else path)


def decode_source(source) -> Image.Image:
    """:func:`decode_rgb` of a file name or a file object (a streamed shard member's bytes)."""
    with Image.open(source) as img:
        width, height = img.size
        if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
            raise ImageShapeError(
                f"{width}x{height} pixels, an aspect ratio over {MAX_ASPECT}:1: resized for the "
                "model its longer side would hold millions of pixels; crop it"
            )
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


def class_names_file(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.classes_file {file} does not exist; write one class name per line")
    names = [nfc(line.strip()) for line in read_text(file, "class names file").splitlines()]
    return [n for n in names if n]
