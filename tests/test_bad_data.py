"""Bad data given to the command line: one line naming the file or key and the fix, exit 2, and
no run directory left behind. Two look-alikes of bad data (NFD class names, 16-bit images) must
work instead. Each row: id, how to spoil a fake tree, command, expected stderr fragment (regex),
expected exit code."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import make_domains, tiny_overrides
from flyp.cli import main
from flyp.data.folders import load_rgb

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "pacs.yaml"
DOMAINS, CLASSES = ["photo", "art", "sketch"], ["dog", "horse", "house"]
SKIP = r"set data\.on_bad_image=skip to leave bad images out$"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The image-check manifest goes to this test's folder, never the home folder."""
    monkeypatch.setenv("FLYP_CACHE", str(tmp_path / "cache"))


def tree(tmp: Path) -> Path:
    return make_domains(tmp / "data", DOMAINS, CLASSES, per_class=4)


def folders(tmp: Path, *extra: str) -> list[str]:
    return tiny_overrides(tree(tmp), *extra)


def csv_tree(tmp: Path, a: str, b: str | None = None) -> list[str]:
    """Images of two classes plus a.csv (and b.csv) with the given text."""
    make_domains(tmp / "img", ["x"], ["cat", "dog"], per_class=4)
    (tmp / "a.csv").write_text(a)
    if b is not None:
        (tmp / "b.csv").write_text(b)
    return [
        "model.spec=tiny",
        "data.benchmark=csv",
        f"data.root={tmp}",
        "data.id_domain=a",
        f"data.ood_domains={'[b]' if b is not None else '[]'}",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
    ]


CSV_GOOD = "path,label\n" + "".join(
    f"img/x/{c}/00{i}.png,{c}\n" for c in ["cat", "dog"] for i in range(4)
)


def missing_root(tmp, mp):
    return tiny_overrides(tmp / "nowhere")


def root_is_a_file(tmp, mp):
    (tmp / "data.txt").write_text("not a folder")
    return tiny_overrides(tmp / "data.txt")


def domain_typo(tmp, mp):
    return folders(tmp, "data.ood_domains=[art, sketchs]")


def class_folders_differ(tmp, mp):
    args = folders(tmp)
    (tmp / "data" / "art" / "horse").rename(tmp / "data" / "art" / "hrose")
    return args


def empty_class_folder(tmp, mp):
    args = folders(tmp)
    for f in (tmp / "data" / "sketch" / "house").iterdir():
        f.unlink()
    return args


def one_class_only(tmp, mp):
    return tiny_overrides(make_domains(tmp / "data", DOMAINS, ["dog"], per_class=4))


def truncated_jpeg(tmp, mp):
    args = folders(tmp)
    path = tmp / "data" / "art" / "dog" / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return args


def text_named_png(tmp, mp):
    args = folders(tmp)
    (tmp / "data" / "sketch" / "horse" / "notes.png").write_text("shopping list")
    return args


def bomb(tmp, mp, *extra):
    """A 64x64 image while PIL's limit is 1000 pixels: over twice the limit, so PIL refuses it
    as a possible decompression bomb (the fake tree's 24x24 images stay under it)."""
    args = folders(tmp, *extra)
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp / "data" / "art" / "dog" / "bomb.png")
    mp.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    return args


def bomb_skipped(tmp, mp):
    return bomb(tmp, mp, "data.on_bad_image=skip")


def csv_missing_columns(tmp, mp):
    return csv_tree(tmp, "file,class\nimg/x/cat/000.png,cat\n")


def csv_unknown_label(tmp, mp):
    return csv_tree(tmp, CSV_GOOD, "path,label\nimg/x/cat/000.png,cta\n")


def csv_header_only(tmp, mp):
    return csv_tree(tmp, CSV_GOOD, "path,label\n")


def csv_one_label(tmp, mp):
    return csv_tree(tmp, "path,label\nimg/x/cat/000.png,cat\nimg/x/cat/001.png,cat\n")


def pacs_env_wrong(tmp, mp):
    mp.setenv("FLYP_PACS_ROOT", str(tmp / "no-pacs"))
    return ["model.spec=tiny"]


def nfd_class_names(tmp, mp):
    """A Mac writes 'café' decomposed (NFD); the recipe's other domains have it composed."""
    make_domains(tmp / "data", ["photo", "sketch"], ["caf\u00e9", "tea"], per_class=4)
    make_domains(tmp / "data", ["art"], ["cafe\u0301", "tea"], per_class=4)
    return tiny_overrides(tmp / "data")


def sixteen_bit(tmp, mp):
    args = folders(tmp)
    grey = np.full((24, 24), 32896, dtype=np.uint16)
    Image.fromarray(grey).save(tmp / "data" / "photo" / "dog" / "wide.png")
    return args


CASES = [
    # id, spoil, command, stderr fragment (regex), exit code
    (missing_root, "finetune", r"data root .*nowhere does not exist .*set data\.root", 2),
    (root_is_a_file, "finetune", r"data root .*data\.txt does not exist or is not a folder", 2),
    (domain_typo, "finetune", r"domain 'sketchs' is not in .*\(did you mean 'sketch'\?\)", 2),
    (
        class_folders_differ,
        "finetune",
        r"class folder 'hrose' in art has no match in photo \(did you mean 'horse'\?\); rename",
        2,
    ),
    (empty_class_folder, "finetune", r"sketch/house holds no images; add images or remove", 2),
    (one_class_only, "finetune", r"data/photo has only one class folder \('dog'\); a class", 2),
    (
        truncated_jpeg,
        "finetune",
        r"art/dog/cut\.jpg \(OSError: image file is truncated.*" + SKIP,
        2,
    ),
    (text_named_png, "finetune", r"sketch/horse/notes\.png \(UnidentifiedImageError.*" + SKIP, 2),
    (bomb, "finetune", r"art/dog/bomb\.png \(possible decompression bomb.*" + SKIP, 2),
    (bomb_skipped, "data", r"skipped .*art/dog/bomb\.png \(possible decompression bomb", 0),
    (csv_missing_columns, "finetune", r"a\.csv needs a header with columns 'path' and 'label'", 2),
    (csv_unknown_label, "finetune", r"b\.csv has label 'cta' .*\(did you mean 'cat'\?\)", 2),
    (csv_header_only, "finetune", r"b\.csv has a header but no rows", 2),
    (csv_one_label, "finetune", r"a\.csv uses only one label \('cat'\)", 2),
    (pacs_env_wrong, "finetune", r"PACS not found: FLYP_PACS_ROOT=.*no-pacs is not a folder", 2),
    (nfd_class_names, "data", r"^$", 0),
    (sixteen_bit, "data", r"^$", 0),
]


@pytest.mark.parametrize(
    ("spoil", "command", "fragment", "code"), CASES, ids=[c[0].__name__ for c in CASES]
)
def test_bad_data_is_refused_in_one_line(
    spoil, command, fragment, code, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # a default run directory would land here
    overrides = spoil(tmp_path, monkeypatch)
    run = tmp_path / "run"
    argv = [command, str(RECIPE), *(x for o in overrides for x in ("--set", o))]
    if command == "finetune":
        argv += ["--out", str(run)]
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("error: ")
        assert not run.exists() and not (tmp_path / "runs").exists()
    assert re.search(fragment, err), err


def test_nfd_class_folder_is_the_nfc_class(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overrides = nfd_class_names(tmp_path, monkeypatch)
    assert main(["data", str(RECIPE), *(x for o in overrides for x in ("--set", o))]) == 0
    table = capsys.readouterr().out
    # one row per class, named in NFC, with 4 images in each OOD set (art is the NFD domain)
    assert "caf\u00e9 " in table and unicodedata.normalize("NFD", "caf\u00e9") not in table
    assert [line.split()[-2:] for line in table.splitlines()[2:4]] == [["4", "4"], ["4", "4"]]


def test_sixteen_bit_image_loads_grey_not_white(tmp_path, monkeypatch):
    sixteen_bit(tmp_path, monkeypatch)
    pixels = np.asarray(load_rgb(str(tmp_path / "data" / "photo" / "dog" / "wide.png")))
    assert pixels.shape == (24, 24, 3) and set(pixels.ravel().tolist()) == {128}
