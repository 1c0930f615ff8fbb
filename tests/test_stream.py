"""Training streamed from WebDataset shards (data.stream: true): no listing of the training
shards, a stream fixed by the seed, each rank on its own shards, a bitwise resume mid-epoch, and
the refusals. Shards are built here on the fly (tests/test_record_data.make_shards)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

import flyp.data.shards as shards_module
import flyp.data.stream as stream_module
from fakes import leave_process_group
from flyp.cli import main
from flyp.data import build_benchmark
from flyp.data.stream import ShardStream, stream_loader
from flyp.errors import RunError
from flyp.recipe import load_recipe
from test_record_data import make_shards

pytest.importorskip("webdataset")

STREAM = ["--set", "data.stream=true", "--id-domain", "clean"]


def stream_shards(root: Path, sizes: bool = True, **kw) -> Path:
    """clean-000..007.tar (3 samples each) and corrupt-000..007.tar, classes.txt, sizes.json."""
    make_shards(root, per_class=8, per_shard=3, **kw)
    if sizes:
        counts = {p.name: sum(m.name.endswith(".png") for m in tarfile.open(p)) for p in root.glob("*.tar")}
        (root / "sizes.json").write_text(json.dumps(counts))
    return root


def _overrides(root: Path, *extra: str) -> list[str]:
    return ["data.benchmark=wds", f"data.root={root}", "data.id_domain=clean",
            "data.ood_domains=[corrupt]", "data.stream=true", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return stream_shards(tmp_path_factory.mktemp("stream") / "shards")


def _opened(monkeypatch) -> list[str]:
    """The shards the stream opens, in order."""
    opened: list[str] = []
    real = stream_module._open_tar
    monkeypatch.setattr(stream_module, "_open_tar", lambda s: opened.append(Path(s).name) or real(s))
    return opened


def _epoch(stream: ShardStream, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, int, int]]:
    stream.set_epoch(epoch, start)
    return list(stream)


def test_the_stream_is_fixed_by_the_seed_and_each_rank_opens_only_its_own_shards(shards, monkeypatch):
    spec = build_benchmark(load_recipe(None, _overrides(shards)).data).stream
    assert len(spec.shards) == 5 and spec.samples == 15  # 8 shards less 1 validation, 2 test
    to_tensor = __import__("torchvision").transforms.PILToTensor()

    def ranks(world: int, spec=spec) -> list[ShardStream]:
        return [ShardStream(spec, to_tensor, 0, 2, r, world, buffer=4) for r in range(world)]

    opened = _opened(monkeypatch)
    first = [_epoch(s, 1) for s in ranks(2)]
    per_rank = []
    again = build_benchmark(load_recipe(None, _overrides(shards)).data).stream
    for rank, stream in enumerate(ranks(2, again)):  # a second build: the same stream
        del opened[:]
        samples = _epoch(stream, 1)
        per_rank.append(set(opened))
        assert set(opened) == {Path(s).name for s in stream.shards_of()}
        assert [(y, s) for _, y, s in samples] == [(y, s) for _, y, s in first[rank]]
        assert all(a[0].equal(b[0]) for a, b in zip(samples, first[rank], strict=True))
        assert len(samples) == 15 // 4 * 2  # its share of the 3 full global batches of 4
    assert not per_rank[0] & per_rank[1]  # rank 0 and rank 1 open disjoint shards
    assert per_rank[0] | per_rank[1] == {Path(s).name for s in spec.shards}
    other_epoch = [(y, s) for _, y, s in _epoch(ranks(2)[0], 2)]
    assert other_epoch != [(y, s) for _, y, s in first[0]]
    # resumed at step 1 of the epoch: the rest of the uninterrupted stream
    resumed = _epoch(ranks(2)[0], 1, start=1)
    assert [(y, s) for _, y, s in resumed] == [(y, s) for _, y, s in first[0]][2:]
    with pytest.raises(RunError, match="5 shards cannot serve 6 processes"):
        stream_loader(ShardStream(spec, to_tensor, 0, 1, 0, 6), 0, "cpu")
    with pytest.raises(RunError, match="resume it with 1 "):  # another world, another stream
        stream_loader(ranks(2)[0], 0, "cpu", saved={"world": 1, "lanes": 1})


def test_the_training_shards_are_never_indexed(shards, monkeypatch):
    indexed = []
    real = shards_module.index_shard
    monkeypatch.setattr(shards_module, "index_shard", lambda s, *a: indexed.append(s) or real(s, *a))
    monkeypatch.setattr(stream_module, "index_shard", shards_module.index_shard)
    bench = build_benchmark(load_recipe(None, _overrides(shards)).data)
    spec = bench.stream
    assert bench.train == [] and bench.train_size() == 15
    assert not set(indexed) & set(spec.shards)
    assert set(indexed) == {*spec.val_shards, *spec.test_shards, *map(str, shards.glob("corrupt-*"))}


def test_a_streamed_run_killed_mid_epoch_resumes_to_the_uninterrupted_weights(shards, tmp_path, capsys):
    base = ["finetune", "--data", str(shards), *STREAM, "--model", "tiny:0.5"]
    base += ["--set", "train.batch_size=4", "--set", "train.epochs=2", "--set", "train.checkpoint_every=1"]
    base += ["--set", "train.select_on=last", "--set", "data.num_workers=2", "--set", "data.shuffle_buffer=4"]
    assert main([*base, "--out", str(tmp_path / "whole")]) == 0
    err = capsys.readouterr().err
    assert "training set streamed from 5 shards (15 samples per sizes.json)" in err
    killed = tmp_path / "killed"
    # step 4: epoch 2's step 1 of 3, an odd step with 2 lanes (the lanes turn at a resume)
    assert main([*base, "--set", "train.stop_after_steps=4", "--out", str(killed)]) == 0
    assert not (killed / "metrics.json").exists()
    # resumed with other workers: the stream keeps the 2 lanes it started with
    assert main(["finetune", "--resume", str(killed), "--set", "data.num_workers=0"]) == 0
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert main(["data", "--data", str(shards), *STREAM]) == 0
    out = capsys.readouterr().out
    assert "class" in out and "train" not in out.splitlines()[1]  # no indexed training column
    assert "ID validation shards: " in out and "never indexed" in out


def _rank(rank: int, world: int, init_file: str, overrides: list[str], tmp: str) -> None:
    from flyp.train import finetune

    torch.set_num_threads(1)
    opened = Path(tmp) / f"opened-{rank}.txt"
    real = stream_module._open_tar

    def recorded(shard: str):
        with opened.open("a") as f:
            f.write(Path(shard).name + "\n")
        return real(shard)

    stream_module._open_tar = recorded
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        finetune(load_recipe(None, overrides), Path(tmp) / "run")
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_process_group()


@pytest.mark.slow  # two processes
def test_under_two_processes_each_rank_reads_its_own_shards(shards, tmp_path):
    overrides = _overrides(
        shards, "model.spec=tiny", "train.batch_size=4", "train.epochs=1", "train.device=cpu",
        "data.num_workers=0", "train.select_on=last",
    )
    mp.spawn(_rank, args=(2, str(tmp_path / "pg"), overrides, str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "run" / "metrics.json").is_file()
    reads = [set((tmp_path / f"opened-{r}.txt").read_text().split()) for r in range(2)]
    assert reads[0] and reads[1] and not reads[0] & reads[1]


@pytest.mark.parametrize(
    "setup, extra, fragment",
    [
        ("folders", ["--set", "data.benchmark=folders"], "data.stream streams WebDataset shards"),
        ("ok", ["--set", "data.max_train=4"], "set data.max_train=null"),
        ("ok", ["--set", "train.method=lp"], "leave lp out (train.method, --methods)"),
        ("no-sizes", [], "or set data.train_samples"),
        ("no-classes", [], "or set data.classes_file"),
        ("few-shards", [], "write it as more shards (at least 3)"),
    ],
)
def test_streaming_is_refused_in_one_line_where_it_cannot_run(setup, extra, fragment, tmp_path, capsys):
    if setup == "few-shards":
        root = make_shards(tmp_path / "s", per_class=2, per_shard=3)  # clean-000, clean-001
        (root / "sizes.json").write_text(json.dumps({"clean-000.tar": 3, "clean-001.tar": 3}))
    else:
        root = stream_shards(tmp_path / "s", sizes=setup != "no-sizes", label="txt" if setup == "no-classes" else "cls")
    verb = "finetune" if "train.method=lp" in extra else "data"
    argv = [verb, "--data", str(root), *STREAM, *extra, "--model", "tiny", "--out", str(tmp_path / "r")]
    if verb == "data":
        argv = argv[:-4]
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "r").exists()


def test_a_stream_given_its_length_needs_no_sizes_json(tmp_path, capsys):
    root = stream_shards(tmp_path / "s", sizes=False)
    assert main(["data", "--data", str(root), *STREAM, "--set", "data.train_samples=12"]) == 0
    assert "(12 samples per data.train_samples)" in capsys.readouterr().out


def test_a_comparison_with_a_probe_method_is_refused_before_any_run(shards, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "--data", str(shards), *STREAM, "--model", "tiny", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    # the --data notice, then the refusal in one line
    assert rc == 2 and "method lp fits its probe" in err[-1] and "--data without" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("label", ["txt", "json"])
def test_a_shard_read_in_sequence_gives_the_labels_its_index_gives(label, tmp_path):
    from flyp.data.shards import index_shard
    from flyp.data.stream import read_shard
    from test_record_data import CLASSES

    root = stream_shards(tmp_path / "s", label=label)
    for shard in sorted(map(str, root.glob("clean-*.tar"))):
        streamed = [(where.rsplit(" ", 1)[-1], y) for where, _, y in read_shard(shard, tuple(CLASSES), "clean")]
        indexed = [(key, CLASSES.index(y)) for key, _, y in index_shard(shard)]
        assert [y for _, y in streamed] == [y for _, y in indexed] and len(streamed) == 3
        assert [w.split(".")[0] for w, _ in streamed] == [k for k, _ in indexed]
