"""Data trust (no silent wrong number): names that collide with flyp's own sets or with each
other, labels that differ only in case or spaces, caps that are caps, EXIF orientation, text
files in common encodings, and hostile folder layouts. Each refusal is one line on stderr, exit
status 2 and no run directory; each look-alike of bad data must work instead."""

from __future__ import annotations

import csv
import os
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import make_domains, tiny_overrides
from flyp.cli import main
from flyp.data import build_benchmark
from flyp.data.check import check_paths
from flyp.data.folders import Sample, load_rgb, to_rgb
from flyp.data.sets import finish
from flyp.data.splits import stratified_subsample
from flyp.recipe import load_recipe
from flyp.reuse import decode_images
from flyp.train import finetune

CLASSES = ["cat", "dog"]
RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "pacs.yaml")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYP_CACHE", str(tmp_path / "cache"))


def refused(args: list[str], capsys, run: Path | None = None) -> str:
    """Runs the CLI; asserts exit 2, exactly one line on stderr and no run directory."""
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), (rc, err)
    assert run is None or not run.exists()
    return err[0]


def finetune_args(tmp: Path, *extra: str) -> list[str]:
    return ["finetune", RECIPE, "--out", str(tmp / "run"), "--set", "train.epochs=1", *extra]


def sets(*pairs: str) -> list[str]:
    return [x for pair in pairs for x in ("--set", pair)]


def images_csv(tmp: Path) -> None:
    make_domains(tmp / "img", ["x"], CLASSES, per_class=4)


def csv_args(tmp: Path, ood: str = "[]", id_domain: str = "a") -> list[str]:
    return sets(
        "model.spec=tiny",
        "data.benchmark=csv",
        f"data.root={tmp}",
        f"data.id_domain={id_domain}",
        f"data.ood_domains={ood}",
        "data.val_fraction=0.25",
        "data.test_fraction=0.25",
    )


def good_rows(prefix: str = "") -> str:
    return "".join(f"{prefix}img/x/{c}/00{i}.png,{c}\n" for c in CLASSES for i in range(4))


# ---- 1. names that collide with flyp's own sets -----------------------------------------------


@pytest.mark.parametrize("ood", ["val", "Val", "VAL ", " train", "Test"])
def test_a_domain_named_like_flyps_own_sets_is_refused(ood, tmp_path, capsys):
    """An OOD domain 'val' (any case or spacing) would replace the ID validation split that the
    epoch, WiSE-FT's alpha and the probe's C are chosen on; 'train'/'test' would read as ID."""
    root = make_domains(tmp_path / "data", ["photo", ood], CLASSES, per_class=4)
    args = tiny_overrides(root, f"data.ood_domains=['{ood}']")
    line = refused(finetune_args(tmp_path, *sets(*args)), capsys, tmp_path / "run")
    key = ood.strip().lower()
    assert f"domain '{ood}' has the name of flyp's own '{key}' set" in line
    assert "rename the domain" in line


@pytest.mark.parametrize(
    "ood, column",
    [("ood_mean", "OOD mean"), ("Method", "method"), ("wise id", "WiSE ID"), ("photo (id)", None)],
)
def test_a_domain_named_like_a_report_column_is_refused(ood, column, tmp_path, capsys):
    """Set names become columns of report.md and results.csv next to 'method', 'OOD mean',
    'WiSE ...' and '<ID domain> (ID)': two columns of one name would be read as one."""
    root = make_domains(tmp_path / "data", ["photo", ood], CLASSES, per_class=4)
    args = tiny_overrides(root, f"data.ood_domains=['{ood}']")
    line = refused(finetune_args(tmp_path, *sets(*args)), capsys, tmp_path / "run")
    what = f"the report's '{column}' column" if column else "column of the ID set 'photo (ID)'"
    assert f"domain '{ood}' has the name of " in line and what in line


def test_training_on_a_domain_named_train_is_refused_and_flyp_data_shows_nothing_wrong(
    tmp_path, capsys
):
    """The issue's case: --id-domain train with an OOD domain val. `flyp data` refuses rather
    than print the OOD domain's counts as the validation split."""
    root = make_domains(tmp_path / "d", ["train", "val"], CLASSES, per_class=4)
    line = refused(["data", "--data", str(root), "--id-domain", "train"], capsys)
    assert "domain 'train' has the name of flyp's own 'train' set (the ID training split)" in line


def test_csv_domains_are_checked_too_and_differ_in_more_than_case(tmp_path, capsys):
    images_csv(tmp_path)
    (tmp_path / "a.csv").write_text("path,label\n" + good_rows())
    (tmp_path / "val.csv").write_text("path,label\n" + good_rows())
    line = refused(["data", RECIPE, *csv_args(tmp_path, "[val]")], capsys)
    assert "domain 'val' has the name of flyp's own 'val' set" in line
    (tmp_path / "A.csv").write_text("path,label\n" + good_rows())
    line = refused(["data", RECIPE, *csv_args(tmp_path, "[A]")], capsys)
    assert "domains 'a' and 'A' differ only in case, spaces or underscores" in line


def test_every_builder_keeps_its_set_names_apart_from_val_and_train(tmp_path):
    """The one place every benchmark passes (finish): a test set named like 'val' or 'train',
    or two alike, is refused; the transfer benchmarks' own ID set 'test' is fine."""
    from flyp.data.folders import DataError
    from flyp.recipe import DataConfig

    make_domains(tmp_path, ["x"], CLASSES, per_class=4)
    files = sorted(str(p) for p in tmp_path.glob("x/*/*.png"))
    part = [[Sample(f, int("/dog/" in f)) for f in files[i::4]] for i in range(4)]
    cfg = DataConfig(benchmark="folders", root=str(tmp_path))
    bench = finish(cfg, "t", CLASSES, ["{}"], part[0], part[1], {"test": part[2]}, "test")
    assert list(bench.eval_sets()) == ["val", "test"]
    for tests in ({"Val ": part[2]}, {"TRAIN": part[2]}, {"a": part[2], "A": part[3]}):
        with pytest.raises(DataError, match="has the name of"):
            finish(cfg, "t", CLASSES, ["{}"], part[0], part[1], tests, next(iter(tests)))


def test_an_image_in_two_sets_is_refused(tmp_path, capsys):
    """A CSV domain listing the ID domain's images would test on what was trained on."""
    images_csv(tmp_path)
    (tmp_path / "a.csv").write_text("path,label\n" + good_rows())
    (tmp_path / "b.csv").write_text("path,label\n" + good_rows("./"))  # same files, other spelling
    line = refused(["data", RECIPE, *csv_args(tmp_path, "[b]")], capsys)
    assert "img/x/" in line and "set; an image may be in one set only" in line
    assert "and the 'b' set" in line


# ---- 2. labels that differ only in case or whitespace -----------------------------------------


@pytest.mark.parametrize(
    "rows, fragment",
    [
        (
            "img/x/dog/000.png,dog\nimg/x/dog/000.png,cat\n",
            "lines 2 and 3: image img/x/dog/000.png is listed as 'dog' and as 'cat'",
        ),
        (
            "img/x/dog/000.png,dog\nimg/x/dog/000.png, dog \n",
            "lines 2 and 3: image img/x/dog/000.png is listed twice",
        ),
        (
            "img/x/dog/000.png,dog\nimg/x/dog/001.png,Dog\n",
            "lines 2 and 3: labels 'dog' and 'Dog' differ only in case, spaces or underscores",
        ),
        (
            "img/x/dog/000.png,ice_cream\nimg/x/dog/001.png,Ice  Cream\n",
            "labels 'ice_cream' and 'Ice  Cream' differ only in case",
        ),
    ],
)
def test_one_image_or_one_class_under_two_labels_is_refused(rows, fragment, tmp_path, capsys):
    """The issue's case: one path labelled 'dog', ' dog' and 'Dog' put the same image in train
    and test and made a one-image class."""
    images_csv(tmp_path)
    (tmp_path / "a.csv").write_text("path,label\n" + rows + good_rows())
    line = refused(finetune_args(tmp_path, *csv_args(tmp_path)), capsys, tmp_path / "run")
    assert fragment in line and "a.csv" in line


def test_whitespace_around_csv_cells_and_header_is_stripped(tmp_path, capsys):
    """Decided: surrounding whitespace is dropped, never part of a label ('path, label' and
    'img.png, dog' as people type them), consistently in every cell and the header."""
    images_csv(tmp_path)
    rows = "".join(f" img/x/{c}/00{i}.png ,  {c} \n" for c in CLASSES for i in range(4))
    (tmp_path / "a.csv").write_text("path, label \n" + rows)
    assert main(["data", RECIPE, *csv_args(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 classes" in out and "\ncat " in out and "\ndog " in out and "total" in out


def test_a_class_folder_named_only_spaces_or_underscores_is_refused(tmp_path, capsys):
    root = make_domains(tmp_path / "data", ["photo", "art"], ["cat", "dog", "_ "], per_class=4)
    line = refused(
        finetune_args(tmp_path, *sets(*tiny_overrides(root, "data.ood_domains=[art]"))),
        capsys,
        tmp_path / "run",
    )
    assert "folder '_ ' in" in line and "has no name but spaces or underscores" in line


@pytest.mark.parametrize("pair", [("Dog", "dog"), ("ice_cream", "ice cream"), ("cat", " cat")])
def test_class_folders_that_differ_only_in_case_spaces_or_underscores_are_refused(
    pair, tmp_path, capsys
):
    root = make_domains(tmp_path / "data", ["photo", "art"], [*pair, "fox"], per_class=4)
    line = refused(
        finetune_args(tmp_path, *sets(*tiny_overrides(root, "data.ood_domains=[art]"))),
        capsys,
        tmp_path / "run",
    )
    assert f"'{sorted(pair)[0]}' and '{sorted(pair)[1]}'" in line
    assert "differ only in case, spaces or underscores; merge them" in line


# ---- 3. caps are caps ------------------------------------------------------------------------


def _samples(sizes: list[int]) -> list[Sample]:
    return [Sample(f"{c}/{i:03d}", c) for c, n in enumerate(sizes) for i in range(n)]


@pytest.mark.parametrize("sizes", [[40, 25, 7, 3], [12, 12, 12], [99, 1], [5, 4, 3, 2, 1]])
@pytest.mark.parametrize("cap", [1, 2, 3, 4, 5, 7, 10, 30, 31, 64, 65, 74])
def test_a_cap_gives_exactly_that_many_images_stratified(sizes, cap):
    """data.max_train / data.max_eval: at most the cap, exactly the cap when the set is larger;
    a cap below the class count keeps one image of as many classes (the largest) as fit; else
    every class keeps one and the rest follow the class shares."""
    samples = _samples(sizes)
    sub = stratified_subsample(samples, cap, seed=3)
    total = sum(sizes)
    assert len(sub) == min(cap, total) and len(set(sub)) == len(sub) and set(sub) <= set(samples)
    counts = Counter(s.label for s in sub)
    if cap >= total:
        assert counts == Counter(s.label for s in samples)
    elif cap < len(sizes):
        assert sorted(counts.values()) == [1] * cap
        assert min(sizes[c] for c in counts) >= max(
            (sizes[c] for c in range(len(sizes)) if c not in counts), default=0
        )
    else:
        assert set(counts) == set(range(len(sizes)))  # every class keeps one
        shares = [cap * n / total for n in sizes]
        if min(shares) >= 1:  # no class lifted to one image: each within one of its share
            assert all(abs(counts[c] - share) < 1 for c, share in enumerate(shares))
    assert stratified_subsample(samples, cap, seed=3) == sub  # deterministic by seed


def test_cap_allocation_is_largest_remainder_and_seeded():
    sub = stratified_subsample(_samples([40, 25, 7, 3]), 30, seed=0)
    # shares 16, 10, 2.8, 1.2: floors 16+10+2+1 = 29, the 30th to the largest remainder (2.8)
    assert [Counter(s.label for s in sub)[c] for c in range(4)] == [16, 10, 3, 1]
    rare = stratified_subsample(_samples([99, 1]), 10, seed=0)
    assert [Counter(s.label for s in rare)[c] for c in range(2)] == [9, 1]
    picks = {tuple(stratified_subsample(_samples([6, 6, 6]), 1, seed=s)) for s in range(12)}
    assert len({p[0].label for p in picks}) > 1  # which class a cap of one keeps is seeded


def test_caps_through_flyp_data_are_exact(tmp_path, capsys):
    """The issue's cases, on disk: max_train 7 of 18 gave 6 and max_eval 1 gave one image per
    class of every evaluation set."""
    root = make_domains(tmp_path / "data", ["photo", "art", "sketch"], ["a", "b", "c"], 12)
    args = tiny_overrides(root, "data.max_train=7", "data.max_eval=1")
    assert main(["data", RECIPE, *sets(*args)]) == 0
    total = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("total"))
    assert total.split()[1:] == ["7", "1", "1", "1", "1"]
    bench = build_benchmark(load_recipe(None, tiny_overrides(root, "data.max_eval=20")).data)
    assert [len(v) for v in bench.eval_sets().values()] == [9, 9, 20, 20]


# ---- 4. EXIF orientation ---------------------------------------------------------------------


def _upright() -> Image.Image:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)
    pixels[:8, :12] = (255, 0, 0)  # a red corner: any turn or mirror moves it
    return Image.fromarray(pixels)


def _tagged(path: Path, upright: Image.Image, tag: int) -> Path:
    """``upright`` stored as a phone stores it: turned, with the orientation tag that turns
    it back (6: show turned 90 degrees clockwise, 8: counter-clockwise, 3: 180, 2: mirrored)."""
    stored = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,
        8: Image.Transpose.ROTATE_270,
    }[tag]
    exif = Image.Exif()
    exif[0x0112] = tag
    upright.transpose(stored).save(path, exif=exif)
    return path


@pytest.mark.parametrize("tag", [6, 8, 3, 2])
def test_an_exif_orientation_tag_is_applied_wherever_images_are_read(tag, tmp_path):
    """Training and evaluation (load_rgb), the decoded-image cache, the image check and an
    image passed in memory (predict) all see the upright picture."""
    upright = _upright()
    path = _tagged(tmp_path / f"phone{tag}.png", upright, tag)
    want = np.asarray(upright)
    assert np.array_equal(np.asarray(load_rgb(str(path))), want)
    assert np.array_equal(np.asarray(decode_images([Sample(str(path), 0)], 1e9)[0]), want)
    with Image.open(path) as img:
        assert np.array_equal(np.asarray(to_rgb(img)), want)
    assert not check_paths([str(path)], workers=1).bad


def test_a_tagged_jpeg_decodes_as_the_untagged_one_turned(tmp_path):
    """A phone's JPEG: the same stored pixels, tagged 6, decode turned 90 degrees clockwise."""
    stored = _upright().transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    stored.save(tmp_path / "plain.jpg", quality=95)
    plain = load_rgb(str(tmp_path / "plain.jpg"))
    assert np.array_equal(
        np.asarray(load_rgb(str(tmp_path / "tagged.jpg"))),
        np.asarray(plain.transpose(Image.Transpose.ROTATE_270)),
    )


@pytest.fixture(scope="module")
def zeroshot_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("trust")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYP_CACHE", str(base / "cache"))
        root = make_domains(base / "data", ["photo", "art", "sketch"], ["dog", "horse"], 4)
        finetune(load_recipe(None, tiny_overrides(root, "train.method=zeroshot")), base / "run")
    return base / "run"


def _probabilities(csv_path: Path) -> dict[str, list[tuple[str, str]]]:
    rows: dict[str, list[tuple[str, str]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(Path(row["path"]).name, []).append((row["class"], row["probability"]))
    return rows


def test_predict_sees_a_phone_photo_upright(zeroshot_run, tmp_path, capsys):
    upright = _upright()
    upright.save(tmp_path / "upright.png")
    _tagged(tmp_path / "phone.png", upright, 6)
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png")
    out = tmp_path / "p.csv"
    assert main(["predict", str(zeroshot_run), str(tmp_path), "--out", str(out)]) == 0
    probs = _probabilities(out)
    assert probs["phone.png"] == probs["upright.png"]
    assert probs["sideways.png"] != probs["upright.png"]  # the tiny model does see the turn


# ---- 5. text files in common encodings -------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32", "utf-8"])
def test_csv_files_in_common_encodings_are_read(encoding, tmp_path, capsys):
    """Excel's UTF-8 with a byte-order mark and UTF-16/32 with one are read as UTF-8 is."""
    images_csv(tmp_path)
    (tmp_path / "a.csv").write_bytes(("path,label\n" + good_rows()).encode(encoding))
    assert main(["data", RECIPE, *csv_args(tmp_path)]) == 0
    assert "2 classes" in capsys.readouterr().out


@pytest.mark.parametrize(
    "data, fragment",
    [
        ("path,label\nimg/x/cat/000.png,café\n".encode("cp1252"), "is not UTF-8 text (byte 0xe9"),
        (("path,label\n" + good_rows()).encode("utf-16-le"), "holds NUL characters"),
    ],
)
def test_undecodable_csv_is_one_line(data, fragment, tmp_path, capsys):
    images_csv(tmp_path)
    (tmp_path / "a.csv").write_bytes(data)
    line = refused(finetune_args(tmp_path, *csv_args(tmp_path)), capsys, tmp_path / "run")
    assert fragment in line and "a.csv" in line and "save it as UTF-8" in line


def test_class_template_and_image_list_files_in_utf16_or_with_a_bom(zeroshot_run, tmp_path, capsys):
    make_domains(tmp_path / "img", ["x"], ["dog"], per_class=2)
    (tmp_path / "classes.txt").write_text("zebra\nokapi\n", encoding="utf-16")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n", encoding="utf-8-sig")
    (tmp_path / "list.csv").write_text("path\nimg/x/dog/000.png\n", encoding="utf-8-sig")
    out = tmp_path / "p.csv"
    args = ["predict", str(zeroshot_run), str(tmp_path / "list.csv"), "--out", str(out)]
    files = [
        "--classes-file",
        str(tmp_path / "classes.txt"),
        "--templates-file",
        str(tmp_path / "templates.txt"),
    ]
    assert main([*args, *files]) == 0, capsys.readouterr().err
    rows = _probabilities(out)
    assert list(rows) == ["000.png"] and {c for c, _ in rows["000.png"]} == {"zebra", "okapi"}
    (tmp_path / "classes.txt").write_bytes("zèbre\nokapi\n".encode("latin-1"))
    assert main([*args, *files]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after predict's precision note
    assert line.startswith("error: --classes-file") and "is not UTF-8 text (byte 0xe8" in line


# ---- 6. and 7. layouts: stray images, hidden files, links, nested folders ---------------------


def test_a_stray_image_in_a_domain_folder_is_named(tmp_path, capsys):
    """It used to read "mixes class folders (photo) and domain folders (photo)"."""
    root = make_domains(tmp_path / "d", ["photo", "art"], CLASSES, per_class=4)
    _upright().save(root / "photo" / "stray.png")
    line = refused(["data", "--data", str(root), "--id-domain", "photo"], capsys)
    assert "photo holds image files (stray.png)" in line and "mixes" not in line
    assert "DIR/<domain>/<class>/<image>" in line and "move those images" in line
    args = tiny_overrides(root, "data.ood_domains=[art]")  # the same tree through a recipe
    line = refused(["data", RECIPE, *sets(*args)], capsys)
    assert "photo holds image files directly (stray.png)" in line
    assert "expected <domain>/<class>/<image>" in line


def test_a_stray_image_next_to_the_class_or_domain_folders_is_named(tmp_path, capsys):
    root = make_domains(tmp_path / "d", ["photo", "art"], CLASSES, per_class=4)
    _upright().save(root / "loose.jpg")
    line = refused(["data", "--data", str(root), "--id-domain", "photo"], capsys)
    assert "holds image files directly (loose.jpg), outside any class folder" in line
    single = root / "photo"
    _upright().save(single / "loose.png")
    line = refused(["data", "--data", str(single)], capsys)
    assert "holds image files directly (loose.png)" in line


def test_hidden_files_are_not_images(tmp_path, capsys):
    """.DS_Store and macOS's '._x.png' resource forks (no image inside) are left out, not
    refused as unreadable images; the counts are those of the real images."""
    root = make_domains(tmp_path / "d", ["photo", "art"], CLASSES, per_class=10)
    for domain in ("photo", "art"):
        (root / domain / ".DS_Store").write_bytes(b"\x00\x01")
        (root / domain / "dog" / "._000.png").write_bytes(b"\x00\x05\x16\x07")
        (root / domain / ".hidden").mkdir()
        _upright().save(root / domain / ".hidden" / "x.png")
    assert main(["data", "--data", str(root), "--id-domain", "photo"]) == 0
    out = capsys.readouterr().out
    total = next(x for x in out.splitlines() if x.startswith("total"))
    assert sum(int(v) for v in total.split()[1:]) == 40


def test_nested_folders_and_looping_links_are_refused_or_ignored_clearly(tmp_path, capsys):
    root = make_domains(tmp_path / "d", ["photo", "art"], CLASSES, per_class=4)
    args = ["data", RECIPE, *sets(*tiny_overrides(root, "data.ood_domains=[art]"))]
    os.symlink("loop", root / "art" / "loop")  # a link to itself: named (tests/test_links.py)
    line = refused(args, capsys)
    assert "loop is a symbolic link that loops" in line
    (root / "art" / "loop").unlink()
    os.symlink("loop2.png", root / "art" / "dog" / "loop2.png")  # an image that loops: named
    line = refused(args, capsys)
    assert "cannot read image" in line and "loop2.png" in line
    (root / "art" / "dog" / "loop2.png").unlink()
    assert main(args) == 0
    capsys.readouterr()
    os.symlink(".", root / "art" / "dog" / "again")  # a link back up: the same images twice
    line = refused(args, capsys)
    assert "dog holds folders of images (again)" in line and "move them up" in line


def test_empty_class_folder_names_the_folder_and_what_an_image_is(tmp_path, capsys):
    root = make_domains(tmp_path / "d", ["photo", "art"], CLASSES, per_class=4)
    (root / "art" / "bird").mkdir()
    (root / "photo" / "bird").mkdir()
    (root / "photo" / "bird" / "notes.txt").write_text("x")
    line = refused(["data", RECIPE, *sets(*tiny_overrides(root, "data.ood_domains=[art]"))], capsys)
    assert "bird holds no images; add images or remove the folder (image files end in .bmp" in line


def test_names_in_nfc_and_nfd_are_one_class_across_domains_and_refused_within_one(tmp_path, capsys):
    nfc_name, nfd_name = "café", unicodedata.normalize("NFD", "café")
    make_domains(tmp_path / "d", ["photo"], [nfc_name, "tea"], per_class=4)
    make_domains(tmp_path / "d", ["art"], [nfd_name, "tea"], per_class=4)
    args = ["data", RECIPE, *sets(*tiny_overrides(tmp_path / "d", "data.ood_domains=[art]"))]
    assert main(args) == 0
    assert "café" in capsys.readouterr().out
    make_domains(tmp_path / "d", ["art"], [nfc_name], per_class=1)
    line = refused(args, capsys)
    assert "same name in two Unicode forms" in line


def test_predict_refuses_new_class_names_that_differ_only_in_case(zeroshot_run, tmp_path, capsys):
    """--classes 'dog,Dog' would be one caption twice: the same rule as class folders."""
    _upright().save(tmp_path / "x.png")
    args = ["predict", str(zeroshot_run), str(tmp_path / "x.png"), "--classes", "dog,cat,Dog"]
    assert main(args) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "class names 'dog', 'Dog' are one class given twice" in line
    assert main([*args[:-1], "dog,cat,hot_dog"]) == 0
