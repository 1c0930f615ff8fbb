"""Training streamed from a Hugging Face dataset's data files (data.stream with data.benchmark
hf): the ID split's Parquet files are the shards, whole files are held out for validation and
test, an epoch's length comes from the files' own metadata, no training row is read before the
run, and a run killed mid-epoch resumes to the uninterrupted run's weights bitwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

import flyp.data.hf as hf_module
from flyp.cli import main
from flyp.data import build_benchmark
from flyp.data.stream import read_source
from flyp.recipe import RecipeError, load_recipe

datasets = pytest.importorskip("datasets")

from test_record_data import CLASSES, _dataset  # noqa: E402


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """data/train-0000k-of-00008.parquet (the 'clean' rows, 3 each) and
    data/test-00000-of-00001.parquet (the 'corrupt' rows), as the Hub stores a dataset."""
    root = tmp_path_factory.mktemp("hub")
    d = _dataset()
    clean = d.select([i for i, x in enumerate(d["domain"]) if x == "clean"]).shuffle(seed=0)
    corrupt = d.select([i for i, x in enumerate(d["domain"]) if x == "corrupt"])
    for k in range(8):
        part = clean.select(range(3 * k, 3 * k + 3))
        part.to_parquet(str(root / "data" / f"train-{k:05d}-of-00008.parquet"))
    corrupt.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def _overrides(root: Path, *extra: str) -> list[str]:
    return ["data.benchmark=hf", f"data.root={root}", "data.id_domain=train",
            "data.ood_domains=[test]", "data.stream=true", *extra]  # fmt: skip


def test_the_training_files_are_never_read_before_the_run(hub, monkeypatch):
    read = []
    real = hf_module._column
    monkeypatch.setattr(hf_module, "_column", lambda f, c: read.append(f) or real(f, c))
    bench = build_benchmark(load_recipe(None, _overrides(hub)).data)
    spec = bench.stream
    assert len(spec.shards) == 5 and spec.samples == 15  # 8 files less 1 validation, 2 test
    assert spec.source == "the files' row counts" and bench.train == []
    assert not set(read) & set(spec.shards)
    assert set(read) == {*spec.val_shards, *spec.test_shards, str(hub / "data" / "test-00000-of-00001.parquet")}
    assert len(bench.val) == 3 and [len(s) for s in bench.tests.values()] == [6, 24]
    assert "streamed from 5 files (15 samples per the files' row counts)" in spec.summary()


def test_a_file_read_in_sequence_gives_the_rows_and_labels_the_index_gives(hub):
    spec = build_benchmark(load_recipe(None, _overrides(hub)).data).stream
    for file in spec.shards:
        streamed = list(read_source(file, spec))
        labels = hf_module._column(file, "label")
        assert [label for _, _, label in streamed] == labels
        images = hf_module._column(file, "img")
        assert [data for _, data, _ in streamed] == [cell["bytes"] for cell in images]
        assert streamed[1][0] == f"{file} row 1"


def test_a_streamed_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(hub, tmp_path, capsys):
    base = ["finetune", "--data", str(hub), "--id-domain", "train", "--set", "data.stream=true"]
    base += ["--model", "tiny:0.5", "--set", "train.batch_size=4", "--set", "train.epochs=2"]
    base += ["--set", "train.checkpoint_every=1", "--set", "train.select_on=last"]
    base += ["--set", "data.num_workers=2", "--set", "data.shuffle_buffer=4"]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    assert "training set streamed from 5 files (15 samples" in capsys.readouterr().err
    killed = tmp_path / "killed"
    assert main([*base, "--set", "train.stop_after_steps=4", "--out", str(killed)]) == 0
    assert not (killed / "metrics.json").exists()
    assert main(["finetune", "--resume", str(killed), "--set", "data.num_workers=0"]) == 0
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_streaming_a_table_is_refused_where_it_cannot_run(hub, tmp_path):
    with pytest.raises(RecipeError, match="a file mixes domains; write each domain as its own split"):
        load_recipe(None, _overrides(hub, "data.domain_column=domain"))
    few = tmp_path / "few"
    _dataset().to_parquet(str(few / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(Exception, match="its 1 files leave none to train on; write it as more files"):
        build_benchmark(load_recipe(None, _overrides(few, "data.ood_domains=[]")).data)
    named = tmp_path / "named"
    d = _dataset().cast_column("label", datasets.Value("int64"))
    for k in range(4):
        d.select(range(k, len(d), 4)).to_parquet(str(named / "data" / f"train-{k:05d}-of-00004.parquet"))
    with pytest.raises(Exception, match="the class names must be known first"):
        build_benchmark(load_recipe(None, _overrides(named, "data.ood_domains=[]")).data)
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(CLASSES) + "\n")
    cfg = load_recipe(None, _overrides(named, "data.ood_domains=[]", f"data.classes_file={names}")).data
    assert build_benchmark(cfg).stream.class_names == tuple(CLASSES)
