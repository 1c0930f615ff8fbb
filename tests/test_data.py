import pytest
from PIL import Image

from fakes import make_domains
from flyp.data.benchmarks import build_benchmark
from flyp.data.folders import DataError, Sample
from flyp.data.loader import EpochSampler
from flyp.data.splits import stratified_split, stratified_subsample
from flyp.recipe import DataConfig


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
    make_domains(tmp_path / "img", ["a"], ["cat"], per_class=2)
    (tmp_path / "a.csv").write_text("path,label\nimg/a/cat/000.png,cat\nimg/a/cat/001.png,cat\n")
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
