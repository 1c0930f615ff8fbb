import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fakes import make_domains
from flyp.data import benchmarks as benchmarks_module
from flyp.data.benchmarks import build_benchmark, pacs_default_root
from flyp.data.check import manifest_path
from flyp.data.folders import DataError, Sample, load_rgb, to_rgb
from flyp.data.loader import EpochSampler, ImageDataset, eval_loader
from flyp.data.splits import stratified_split, stratified_subsample
from flyp.recipe import DataConfig


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The image-check manifest goes to this test's folder, never the home folder."""
    monkeypatch.setenv("FLYP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def cfg(root, **kw):
    base = dict(
        benchmark="folders", root=str(root), id_domain="photo", ood_domains=["art", "sketch"]
    )
    return DataConfig(**(base | kw))


def test_folders_benchmark_splits(fake_pacs):
    bench = build_benchmark(cfg(fake_pacs, val_fraction=0.25, test_fraction=0.25))
    assert bench.class_names == ["dog", "horse", "house"]
    assert list(bench.tests) == ["photo", "art", "sketch"]
    # 12 per class: 3 val, 3 test, 6 train, per class
    assert len(bench.train) == 18 and len(bench.val) == 9 and len(bench.tests["photo"]) == 9
    assert len(bench.tests["art"]) == 36
    paths = [set(s.path for s in part) for part in (bench.train, bench.val, bench.tests["photo"])]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    assert all("/photo/" in s.path for s in bench.train)


def test_split_is_seeded_and_stratified():
    samples = [Sample(f"{c}/{i}", c) for c in range(3) for i in range(20)]
    a = stratified_split(samples, [0.1, 0.2], seed=1)
    b = stratified_split(samples, [0.1, 0.2], seed=1)
    c = stratified_split(samples, [0.1, 0.2], seed=2)
    assert a == b and a != c
    assert [sum(s.label == k for s in a[1]) for k in range(3)] == [2, 2, 2]
    assert [sum(s.label == k for s in a[2]) for k in range(3)] == [4, 4, 4]
    sub = stratified_subsample(samples, 9, seed=0)
    assert [sum(s.label == k for s in sub) for k in range(3)] == [3, 3, 3]


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*data.root"):
        build_benchmark(cfg(tmp_path / "nowhere"))


def test_unknown_domain_is_named(fake_pacs):
    with pytest.raises(DataError, match=r"domain 'sketches' is not in .*did you mean 'sketch'"):
        build_benchmark(cfg(fake_pacs, ood_domains=["sketches"]))


def test_class_folders_that_differ_suggest_the_near_match(tmp_path):
    make_domains(tmp_path, ["photo"], ["dog", "giraffe"], per_class=2)
    make_domains(tmp_path, ["art"], ["dog", "girafe"], per_class=2)
    with pytest.raises(
        DataError,
        match=r"class folder 'girafe' in art has no match in photo \(did you mean 'giraffe'\?\)",
    ):
        build_benchmark(cfg(tmp_path, ood_domains=["art"]))


def test_empty_class_folder(tmp_path):
    make_domains(tmp_path, ["photo", "art"], ["dog", "cat"], per_class=2)
    for f in (tmp_path / "art" / "cat").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"art/cat holds no images"):
        build_benchmark(cfg(tmp_path, ood_domains=["art"]))


def test_corrupt_image_is_named_or_skipped_and_counted(fake_pacs):
    bad = fake_pacs / "art" / "dog" / "000.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot read image .*art/dog/000.png.*on_bad_image=skip"):
        build_benchmark(cfg(fake_pacs))
    bench = build_benchmark(cfg(fake_pacs, on_bad_image="skip"))
    assert bench.skipped_images == 1
    assert len(bench.tests["art"]) == 35


def test_truncated_image_skipped(fake_pacs):
    path = fake_pacs / "sketch" / "house" / "001.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(path)
    path.write_bytes(path.read_bytes()[:60])
    bench = build_benchmark(cfg(fake_pacs, on_bad_image="skip"))
    assert bench.skipped_images == 1


def test_csv_benchmark(tmp_path):
    make_domains(tmp_path / "img", ["a", "b"], ["cat", "dog"], per_class=10)
    for domain in ["a", "b"]:
        lines = ["path,label"] + [
            f"img/{domain}/{c}/{i:03d}.png,{c}" for c in ["cat", "dog"] for i in range(10)
        ]
        (tmp_path / f"{domain}.csv").write_text("\n".join(lines) + "\n")
    bench = build_benchmark(
        DataConfig(
            benchmark="csv",
            root=str(tmp_path),
            id_domain="a",
            ood_domains=["b"],
            val_fraction=0.2,
            test_fraction=0.2,
        )
    )
    assert bench.class_names == ["cat", "dog"]
    assert len(bench.train) == 12 and len(bench.tests["b"]) == 20
    assert {s.label for s in bench.tests["b"]} == {0, 1}


def test_csv_unknown_label(tmp_path):
    make_domains(tmp_path / "img", ["a"], ["cat", "dog"], per_class=2)
    (tmp_path / "a.csv").write_text("path,label\nimg/a/cat/000.png,cat\nimg/a/dog/001.png,dog\n")
    (tmp_path / "b.csv").write_text("path,label\nimg/a/cat/000.png,cta\n")
    with pytest.raises(DataError, match=r"label 'cta'.*did you mean 'cat'"):
        build_benchmark(
            DataConfig(
                benchmark="csv",
                root=str(tmp_path),
                id_domain="a",
                ood_domains=["b"],
                val_fraction=0.0,
                test_fraction=0.0,
            )
        )


def test_csv_missing_columns(tmp_path):
    (tmp_path / "a.csv").write_text("file,class\nx.png,cat\n")
    with pytest.raises(DataError, match=r"columns 'path' and 'label'"):
        build_benchmark(
            DataConfig(benchmark="csv", root=str(tmp_path), id_domain="a", ood_domains=[])
        )


def test_sampler_redraws_seeds_each_epoch_and_resumes_mid_epoch():
    full = list(EpochSampler(20, 4, seed=3, epoch=1))
    again = list(EpochSampler(20, 4, seed=3, epoch=1))
    other_epoch = list(EpochSampler(20, 4, seed=3, epoch=2))
    assert full == again and len(full) == 20
    assert {s for _, s in full}.isdisjoint({s for _, s in other_epoch})
    assert list(EpochSampler(20, 4, seed=3, epoch=1, start=2)) == full[8:]
    # two ranks together cover exactly the single-process global batches
    r0 = list(EpochSampler(20, 2, seed=3, epoch=1, rank=0, world=2))
    r1 = list(EpochSampler(20, 2, seed=3, epoch=1, rank=1, world=2))
    assert sorted(r0 + r1) == sorted(full)


def test_k_shot_applies_to_folder_benchmarks(fake_pacs):
    bench = build_benchmark(cfg(fake_pacs, k_shot=2))
    assert sorted(s.label for s in bench.train) == [0, 0, 1, 1, 2, 2]
    with pytest.raises(DataError, match="k_shot"):
        build_benchmark(cfg(fake_pacs, k_shot=50))


def write_truncated_jpeg(path):
    """A noisy JPEG cut in half: its header is intact, half of its pixels are missing."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, format="JPEG", quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_jpeg_passes_verify_but_not_the_check(fake_pacs):
    bad = fake_pacs / "art" / "horse" / "cut.jpg"
    write_truncated_jpeg(bad)
    with Image.open(bad) as img:
        img.verify()  # what the old check relied on: it does not notice
    with pytest.raises(
        DataError, match=r"cannot read image .*art/horse/cut.jpg \(OSError: image file is truncated"
    ) as err:
        build_benchmark(cfg(fake_pacs))
    assert str(err.value).endswith("set data.on_bad_image=skip to leave bad images out")
    assert build_benchmark(cfg(fake_pacs, on_bad_image="skip")).skipped_images == 1


def test_manifest_remembers_good_images_and_rechecks_changed_ones(fake_pacs, own_cache):
    before = sorted(p for p in fake_pacs.rglob("*"))
    first = build_benchmark(cfg(fake_pacs)).image_check
    assert (first.images, first.decoded, first.cached, first.bad) == (108, 108, 0, {})
    assert first.manifest == str(manifest_path(str(fake_pacs)))
    assert Path(first.manifest).parent.parent == own_cache  # in the cache, not the dataset
    assert sorted(p for p in fake_pacs.rglob("*")) == before
    again = build_benchmark(cfg(fake_pacs)).image_check
    assert (again.decoded, again.cached) == (0, 108)
    # A file whose modification time changes is decoded again; one now broken is caught.
    touched = fake_pacs / "photo" / "dog" / "003.png"
    os.utime(touched, ns=(1, 1))
    broken = fake_pacs / "sketch" / "house" / "002.png"
    broken.write_bytes(broken.read_bytes()[:70])
    third = build_benchmark(cfg(fake_pacs, on_bad_image="skip")).image_check
    assert (third.decoded, third.cached, list(third.bad)) == (2, 106, [str(broken)])
    # The bad file was never recorded as good: it is decoded (and refused) every time.
    with pytest.raises(DataError, match=r"sketch/house/002.png"):
        build_benchmark(cfg(fake_pacs))
    assert build_benchmark(cfg(fake_pacs, on_bad_image="skip")).image_check.decoded == 1


def test_the_check_uses_the_given_number_of_threads(fake_pacs, monkeypatch):
    monkeypatch.setenv("FLYP_CHECK_WORKERS", "3")
    assert build_benchmark(cfg(fake_pacs)).image_check.workers == 3
    monkeypatch.setenv("FLYP_CHECK_WORKERS", "many")
    with pytest.raises(
        DataError, match="FLYP_CHECK_WORKERS must be a whole number >= 1, got 'many'"
    ):
        build_benchmark(cfg(fake_pacs))


def test_sixteen_bit_grey_is_scaled_not_white(tmp_path):
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(flat)
    with Image.open(flat) as img:
        assert img.mode == "I;16"
    assert np.asarray(load_rgb(str(flat)))[0, 0].tolist() == [128, 128, 128]
    ramp = tmp_path / "ramp.png"
    Image.fromarray(np.array([[0, 257, 32896, 65278, 65535]], dtype=np.uint16)).save(ramp)
    assert np.asarray(load_rgb(str(ramp)))[0, :, 0].tolist() == [0, 1, 128, 254, 255]


def test_float_alpha_and_cmyk_become_what_a_viewer_shows():
    grey = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(grey))[0, :, 0].tolist() == [0, 128, 255]
    wide_float = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert np.asarray(to_rgb(wide_float))[0, :, 0].tolist() == [0, 100, 255]
    # Transparent black composited on white is white; half-transparent black is mid grey.
    rgba = Image.fromarray(np.array([[[0, 0, 0, 0], [0, 0, 0, 128]]], dtype=np.uint8), "RGBA")
    assert np.asarray(to_rgb(rgba))[0].tolist() == [[255, 255, 255], [127, 127, 127]]
    palette = Image.new("P", (1, 1), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [255, 255, 255]
    cmyk = Image.new("CMYK", (1, 1), (0, 255, 255, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 0, 0]


def test_class_names_match_in_nfc(tmp_path):
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    make_domains(tmp_path, ["photo"], [composed, "tea"], per_class=4)
    make_domains(tmp_path, ["art"], [decomposed, "tea"], per_class=2)
    split = dict(val_fraction=0.25, test_fraction=0.25)
    bench = build_benchmark(cfg(tmp_path, ood_domains=["art"], **split))
    assert bench.class_names == [composed, "tea"]
    assert [s.label for s in bench.tests["art"]] == [0, 0, 1, 1]
    # each CSV lists its own domain's images: an image in two sets is refused
    for domain, label, folder, n in [("a", composed, "photo", 4), ("b", decomposed, "art", 2)]:
        rows = [f"{folder}/{label}/00{i}.png,{label}" for i in range(n)]
        rows += [f"{folder}/tea/00{i}.png,tea" for i in range(n)]
        (tmp_path / f"{domain}.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    csv_bench = build_benchmark(
        DataConfig(benchmark="csv", root=str(tmp_path), id_domain="a", ood_domains=["b"], **split)
    )
    assert csv_bench.class_names == [composed, "tea"]
    assert [s.label for s in csv_bench.tests["b"]] == [0, 0, 1, 1]


def test_pacs_is_found_by_env_or_next_to_the_checkout(tmp_path, monkeypatch):
    monkeypatch.delenv("FLYP_PACS_ROOT", raising=False)
    checkout = Path(benchmarks_module.__file__).resolve().parents[3]
    assert pacs_default_root() == checkout.parent / "shared" / "data" / "pacs"
    monkeypatch.setenv("FLYP_PACS_ROOT", str(tmp_path / "nowhere"))
    assert pacs_default_root() == tmp_path / "nowhere"
    with pytest.raises(
        DataError, match=r"PACS not found: FLYP_PACS_ROOT=.*nowhere is not a folder"
    ):
        build_benchmark(DataConfig(benchmark="pacs"))


def test_an_image_broken_after_the_check_is_named_in_one_line_by_loader_workers(fake_pacs):
    bench = build_benchmark(cfg(fake_pacs))
    broken = bench.val[0].path
    Path(broken).write_bytes(b"overwritten after the check")
    loader = eval_loader(ImageDataset(bench.val, lambda image: 0), batch_size=4, num_workers=1)
    with pytest.raises(DataError) as err:
        list(loader)
    assert str(err.value) == (
        f"cannot read image {broken} (UnidentifiedImageError: cannot identify image file "
        f"'{broken}'); remove or replace it, or set data.on_bad_image=skip to leave bad images out"
    )
