"""Hugging Face datasets (a save_to_disk folder, Parquet files) and WebDataset shards as data:
built here on the fly from a few images per class, read through `--data` by `flyp data`,
`finetune`, `compare` and `predict`."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from fakes import COLOURS
from flyp.cli import main

datasets = pytest.importorskip("datasets")
pytest.importorskip("webdataset")
datasets.disable_progress_bars()  # building the fake datasets writes nothing to stderr

CLASSES = ["cat", "dog", "fox"]
TINY = ["--model", "tiny", "--set", "train.batch_size=6", "--set", "train.epochs=1"]


def _pngs(domains: list[str], per_class: int, size: int = 16) -> list[tuple[str, int, int, bytes]]:
    """(domain, class index, i, PNG bytes): a colour per class, a brightness per domain."""
    rng = np.random.default_rng(0)
    out = []
    for d, domain in enumerate(domains):
        for c in range(len(CLASSES)):
            for i in range(per_class):
                base = np.array(COLOURS[c], dtype=float) * (1 - 0.25 * d)
                pixels = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255)
                buf = io.BytesIO()
                Image.fromarray(pixels.astype(np.uint8)).save(buf, "PNG")
                out.append((domain, c, i, buf.getvalue()))
    return out


def make_shards(root: Path, domains=("clean", "corrupt"), per_class=8, per_shard=5, label="cls"):
    """<domain>-000.tar ... with <key>.png and <key>.cls (or .txt / .json), and classes.txt."""
    root.mkdir(parents=True, exist_ok=True)
    if label == "cls":
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for domain in domains:
        mine = [x for x in _pngs(list(domains), per_class) if x[0] == domain]
        for start in range(0, len(mine), per_shard):
            with tarfile.open(root / f"{domain}-{start // per_shard:03d}.tar", "w") as tar:
                for _, c, i, data in mine[start : start + per_shard]:
                    tag = {"cls": str(c), "txt": CLASSES[c], "json": json.dumps({"label": CLASSES[c]})}
                    for name, blob in ((f"{c}_{i:04d}.png", data), (f"{c}_{i:04d}.{label}", tag[label].encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(blob)
                        tar.addfile(info, io.BytesIO(blob))
    return root


def _dataset(per_class=8):
    items = _pngs(["clean", "corrupt"], per_class)
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "label": datasets.ClassLabel(names=CLASSES),
            "domain": datasets.Value("string"),
        }
    )
    rows = {
        "img": [{"bytes": x[3], "path": None} for x in items],
        "label": [x[1] for x in items],
        "domain": [x[0] for x in items],
    }
    return datasets.Dataset.from_dict(rows, features=features)


def make_parquet(root: Path) -> Path:
    """A dataset as the Hub stores it: data/train-00000-of-00001.parquet, a domain column."""
    _dataset().to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def make_saved(root: Path) -> Path:
    """A save_to_disk DatasetDict with the splits 'train' (clean) and 'test' (corrupt)."""
    d = _dataset()
    train = d.select([i for i, x in enumerate(d["domain"]) if x == "clean"])
    test = d.select([i for i, x in enumerate(d["domain"]) if x == "corrupt"])
    datasets.DatasetDict(train=train, test=test).save_to_disk(str(root))
    return root


def test_shards_are_domains_by_name_trained_on_and_predicted(tmp_path, capsys):
    shards = make_shards(tmp_path / "shards")
    assert main(["data", "--data", str(shards)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the domains clean, corrupt" in err[0], err
    assert main(["data", "--data", str(shards), "--id-domain", "clean"]) == 0
    out = capsys.readouterr().out
    assert "benchmark wds: 3 classes" in out and "ID clean, OOD corrupt" in out
    # 8 per class: 5 train, 1 validation, 2 test; corrupt whole (24)
    assert out.splitlines()[-2].split() == ["total", "15", "3", "6", "24"]
    run = tmp_path / "run"
    pattern = str(shards / "clean-{000..004}.tar")  # one domain by a brace pattern
    assert main(["finetune", "--data", pattern, *TINY, "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["id_name"] == "clean" and metrics["sets"]["clean"]["n"] == 6
    predictions = tmp_path / "p.csv"
    ood = str(shards / "corrupt-{000..001}.tar")
    assert main(["predict", str(run), ood, "--out", str(predictions)]) == 0
    assert "10 images classified" in capsys.readouterr().out
    rows = predictions.read_text().splitlines()[1:]
    assert rows[0].startswith(str(shards / "corrupt-000.tar") + "::")


@pytest.mark.parametrize("label", ["txt", "json"])
def test_shard_labels_by_name_or_json(label, tmp_path, capsys):
    shards = make_shards(tmp_path / "s", domains=("photo",), label=label)
    assert main(["data", "--data", str(shards)]) == 0
    out = capsys.readouterr().out
    assert "3 classes" in out and out.splitlines()[2].split()[0] == "cat"


def test_parquet_with_a_domain_column_and_saved_splits_named_train_and_test(tmp_path, capsys):
    pq = make_parquet(tmp_path / "pq")
    args = ["--set", "data.domain_column=domain", "--id-domain", "clean"]
    assert main(["data", "--data", str(pq), *args]) == 0
    out = capsys.readouterr().out
    assert "benchmark hf: 3 classes" in out and "ID clean, OOD corrupt" in out
    assert out.splitlines()[2].split() == ["cat", "5", "1", "2", "8"]  # the ClassLabel's names
    saved = make_saved(tmp_path / "saved")
    run = tmp_path / "run"
    assert main(["finetune", "--data", str(saved), "--id-domain", "train", *TINY, "--out", str(run)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    # splits named like flyp's own sets are shown as '<split> split'
    assert metrics["id_name"] == "train split" and metrics["ood_names"] == ["test split"]
    assert metrics["sets"]["test split"]["n"] == 24


@pytest.mark.slow  # a comparison of two methods: several seconds
def test_compare_reads_shards(tmp_path, capsys):
    shards = make_shards(tmp_path / "shards")
    out = tmp_path / "cmp"
    args = ["compare", "--data", str(shards), "--id-domain", "clean", *TINY]
    assert main([*args, "--methods", "zeroshot", "ft", "--seeds", "0", "--out", str(out)]) == 0
    assert "corrupt" in (out / "report.md").read_text()


def test_a_run_killed_mid_epoch_on_shards_resumes_to_the_uninterrupted_weights(tmp_path):
    shards = make_shards(tmp_path / "shards", domains=("clean",))
    base = ["finetune", "--data", str(shards), "--model", "tiny:0.5", "--set", "train.batch_size=6"]
    base += ["--set", "train.epochs=2", "--set", "train.checkpoint_every=1"]
    base += ["--set", "train.select_on=last"]  # the last weights, not a tie-broken best epoch
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    assert main([*base, "--set", "train.stop_after_steps=3", "--out", str(killed)]) == 0
    assert not (killed / "metrics.json").exists()  # stopped in epoch 2 of 2 steps each
    assert main(["finetune", "--resume", str(killed)]) == 0
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_building_reads_labels_only_and_the_image_check_samples(tmp_path, capsys, monkeypatch):
    import flyp.data.records as records
    import flyp.data.sets as sets
    from flyp.data import build_benchmark
    from flyp.recipe import load_recipe

    shards = make_shards(tmp_path / "shards")
    read = []
    real = records.open_image
    monkeypatch.setattr(records, "open_image", lambda p: read.append(p) or real(p))
    import flyp.data.folders as folders

    monkeypatch.setattr(folders, "open_image", records.open_image)
    monkeypatch.setattr(sets, "RECORD_CHECK", 5)
    overrides = ["data.benchmark=wds", f"data.root={shards}", "data.id_domain=clean"]
    bench = build_benchmark(load_recipe(None, [*overrides, "data.ood_domains=[corrupt]"]).data)
    assert len(bench.train) == 15 and len(read) == 5  # 48 images indexed, 5 decoded
    assert "a seeded sample of the 48 images" in bench.image_check.summary()


def test_a_missing_extra_is_named_in_one_line(tmp_path, capsys, monkeypatch):
    saved = make_saved(tmp_path / "saved")
    monkeypatch.setitem(sys.modules, "datasets", None)
    assert main(["data", "--data", str(saved), "--id-domain", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'flyp[hf]'" in err[0], err


@pytest.mark.parametrize(
    "setup, extra, fragment",
    [
        ("no-names", [], "no class names were found"),
        ("bad-column", ["--set", "data.image_column=picture"], "has no column 'picture'"),
        ("bad-split", ["--id-domain", "trian"], "did you mean 'train'"),
    ],
)
def test_bad_record_data_is_refused_in_one_line(setup, extra, fragment, tmp_path, capsys):
    if setup == "no-names":
        data = make_shards(tmp_path / "s", domains=("photo",))
        (data / "classes.txt").unlink()
    else:
        data = make_saved(tmp_path / "saved")
        if setup == "bad-column":
            extra = [*extra, "--id-domain", "train"]
    rc = main(["data", "--data", str(data), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0], err


def test_sweep_reads_a_saved_dataset(tmp_path):
    saved = make_saved(tmp_path / "saved")
    out = tmp_path / "sweep"
    argv = ["sweep", "--data", str(saved), "--id-domain", "train", *TINY]
    assert main([*argv, "--grid", "train.lr=1e-4,1e-5", "--out", str(out)]) == 0
    assert len(json.loads((out / "sweep.json").read_text())["runs"]) == 2
