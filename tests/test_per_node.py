"""Under torchrun the image check runs once per node, not once per rank; the decoded-image cache
stays per process, and holds every training image (each rank draws nearly all of them).

Two gloo processes on the CPU, spawned with torchrun's LOCAL_RANK: one node of two ranks
(LOCAL_RANK 0 and 1), or two nodes of one rank each (LOCAL_RANK 0 on both, each with its own
cache folder, as two machines have). Every full decode of the image check writes one file, so
the test counts decodes across processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import uuid
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fakes import error_lines, leave_process_group, tiny_overrides
from flyp.data import build_benchmark, check
from flyp.data.loader import EpochSampler
from flyp.recipe import load_recipe
from flyp.reuse import DecodedImages

ONE_NODE = (0, 1)  # LOCAL_RANK of global ranks 0 and 1
TWO_NODES = (0, 0)


def _join(rank: int, local_ranks: tuple[int, int], tmp: str) -> None:
    """This rank as torchrun would start it, its image-check decodes counted under tmp/decodes."""
    torch.set_num_threads(1)
    os.environ["LOCAL_RANK"] = str(local_ranks[rank])
    node = rank if local_ranks == TWO_NODES else 0
    os.environ["FLYP_CACHE"] = str(Path(tmp, f"cache-node{node}"))  # a node's own disk
    decodes = Path(tmp, "decodes")
    decodes.mkdir(exist_ok=True)
    real = check.decode_rgb

    def counted(path):
        Path(decodes, f"rank{rank}-{uuid.uuid4().hex}").write_text(str(path))
        return real(path)

    check.decode_rgb = counted
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=2)


def _decodes(tmp: Path) -> dict[int, list[str]]:
    """The paths each rank's image check decoded."""
    found: dict[int, list[str]] = {0: [], 1: []}
    for f in (tmp / "decodes").glob("rank*"):
        found[int(f.name[4])].append(f.read_text())
    return found


def _benchmark_worker(
    rank: int, local_ranks: tuple[int, int], tmp: str, data: str, extra: tuple[str, ...] = ()
) -> None:
    _join(rank, local_ranks, tmp)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            bench = build_benchmark(load_recipe(None, tiny_overrides(Path(data), *extra)).data)
        Path(tmp, f"rank{rank}.err").write_text(err.getvalue())
        report = bench.image_check
        train = [s.path for s in bench.train]
        cached = sorted(DecodedImages().get(bench.train, budget_gb=1.0))  # this rank's cache
        Path(tmp, f"rank{rank}.json").write_text(
            json.dumps([report.images, report.decoded, report.cached, report.bad, train, cached])
        )
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_process_group()


@pytest.mark.parametrize("local_ranks", [ONE_NODE, TWO_NODES], ids=["one-node", "two-nodes"])
def test_the_image_check_decodes_each_image_once_per_node(
    local_ranks, fake_pacs, tmp_path, monkeypatch
):
    """One node of 2 ranks: local rank 0 decodes every image once, rank 1 none, and both hold
    its report. Two nodes of one rank: each node checks its own disk and keeps its own answer.
    The nodes differ: node 1 checked these images before (its manifest knows them all), node 0
    never did, so a node that took the other node's report (a wrong node/rank mapping) would
    say it decoded what it only looked up, or the reverse."""
    if local_ranks == TWO_NODES:  # node 1's own cache, warmed by an earlier check there
        monkeypatch.setenv("FLYP_CACHE", str(tmp_path / "cache-node1"))
        build_benchmark(load_recipe(None, tiny_overrides(fake_pacs)).data)
    mp.spawn(
        _benchmark_worker, args=(local_ranks, str(tmp_path), str(fake_pacs)), nprocs=2, join=True
    )
    zero = json.loads((tmp_path / "rank0.json").read_text())
    one = json.loads((tmp_path / "rank1.json").read_text())
    assert zero[3:] == one[3:]  # the same bad images and training samples on every rank
    assert zero[5] == list(range(len(zero[4])))  # each rank's decoded-image cache: all of them
    images = zero[0]
    decodes = _decodes(tmp_path)
    assert len(decodes[0]) == len(set(decodes[0])) == images == zero[1] > 0
    assert decodes[1] == []  # node 0's rank 1 waits for its node; node 1 decodes nothing new
    if local_ranks == ONE_NODE:
        assert zero == one  # rank 1 holds its node's report: images, decoded, cached
    else:  # each node its own answer: node 0 decoded every image, node 1 looked each one up
        assert zero[:3] == [images, images, 0] and one[:3] == [images, 0, images]


def test_a_skipped_image_is_left_out_on_every_rank_and_named_once_per_node(fake_pacs, tmp_path):
    """data.on_bad_image=skip under 2 processes of one node: both ranks leave the same image out,
    and only local rank 0 names it on stderr."""
    bad = fake_pacs / "photo" / "dog" / "000.png"
    bad.write_bytes(bad.read_bytes()[:60])
    args = (ONE_NODE, str(tmp_path), str(fake_pacs), ("data.on_bad_image=skip",))
    mp.spawn(_benchmark_worker, args=args, nprocs=2, join=True)
    zero = json.loads((tmp_path / "rank0.json").read_text())
    one = json.loads((tmp_path / "rank1.json").read_text())
    assert zero == one and list(zero[3]) == [str(bad)]
    assert all(str(bad) not in part for part in (zero[4], one[4]))
    assert f"image check: skipped {bad} (" in (tmp_path / "rank0.err").read_text()
    assert "skipped" not in (tmp_path / "rank1.err").read_text()
    assert _decodes(tmp_path)[1] == []


def _finetune_worker(rank: int, tmp: str, argv: list[str]) -> None:
    from flyp.cli import main

    _join(rank, ONE_NODE, tmp)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            code = main(argv)
        Path(tmp, f"rank{rank}.json").write_text(json.dumps([code, err.getvalue()]))
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_process_group()


def _finetune_on_two_ranks(tmp_path: Path, data: Path, *extra: str) -> list[tuple[int, str]]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    sets = tiny_overrides(data, "train.epochs=1", "data.num_workers=0", *extra)
    argv = ["finetune", str(recipe), *[f"--set={s}" for s in sets], "--out", str(tmp_path / "run")]
    mp.spawn(_finetune_worker, args=(str(tmp_path), argv), nprocs=2, join=True)
    return [tuple(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]


def test_a_bad_image_is_refused_on_every_rank_with_the_same_line(fake_pacs, tmp_path):
    """A truncated image under 2 processes: both exit 2 with the same one-line error naming it,
    it was decoded once (by local rank 0), and no run folder is left behind."""
    bad = fake_pacs / "photo" / "dog" / "000.png"
    bad.write_bytes(bad.read_bytes()[:60])
    results = _finetune_on_two_ranks(tmp_path, fake_pacs)
    lines = [error_lines(err) for _, err in results]
    assert [code for code, _ in results] == [2, 2]
    assert lines[0] == lines[1] and len(lines[0]) == 1
    assert lines[0][0].startswith(f"error: cannot read image {bad} (")
    assert "data.on_bad_image=skip" in lines[0][0]
    decodes = _decodes(tmp_path)
    assert decodes[1] == [] and decodes[0].count(str(bad)) == 1
    assert not (tmp_path / "run").exists()


def test_an_error_of_the_node_check_is_raised_on_every_rank(fake_pacs, tmp_path, monkeypatch):
    """An error inside the check itself (here FLYP_CHECK_WORKERS, read by local rank 0 alone)
    reaches the node's other ranks: both exit 2 with local rank 0's one line, none waits."""
    monkeypatch.setenv("FLYP_CHECK_WORKERS", "many")
    results = _finetune_on_two_ranks(tmp_path, fake_pacs)
    assert [code for code, _ in results] == [2, 2]
    want = ["error: FLYP_CHECK_WORKERS must be a whole number >= 1, got 'many'"]
    assert [error_lines(err) for _, err in results] == [want, want]
    assert _decodes(tmp_path) == {0: [], 1: []} and not (tmp_path / "run").exists()


# --- the decoded-image cache: per process, every training image --------------------------------


def test_each_rank_draws_nearly_every_training_image_so_the_cache_holds_them_all(fake_pacs):
    """Why the decoded-image cache is not sharded: the sampler draws a new permutation each
    epoch, so over a run's epochs each rank draws most images (a share 1 - (1 - 1/world)^epochs:
    here half of the 18 in one epoch, all 18 within 5 epochs, on 2 ranks), the cache is shared
    by a comparison's runs, whose seeds differ, and LP-FT's probe reads every training image on
    each rank. Each process therefore decodes every training image (within data.cache_gb),
    under torchrun too."""
    bench = build_benchmark(load_recipe(None, tiny_overrides(fake_pacs)).data)
    n = len(bench.train)
    assert n == 18
    for rank in (0, 1):
        first = {i for i, _ in EpochSampler(n, 3, 0, 0, rank=rank, world=2)}
        drawn = {i for e in range(5) for i, _ in EpochSampler(n, 3, 0, e, rank=rank, world=2)}
        assert len(first) == n // 2 and drawn == set(range(n))
    decoded = DecodedImages().get(bench.train, budget_gb=1.0)
    assert sorted(decoded) == list(range(n))


def test_a_run_directory_rank_0_cannot_claim_is_refused_on_every_rank_at_once(fake_pacs, tmp_path):
    """Rank 0 alone claims the run directory; here another flyp process holds it. Every rank
    exits 2 with rank 0's line at once, not rank 1 after train.dist_timeout_s at a barrier."""
    from flyp.rundir import LOCK_NAME, lock_file

    (tmp_path / "run").mkdir()
    held = lock_file(tmp_path / "run" / LOCK_NAME)  # another live run's lock
    try:
        tick = time.time()
        results = _finetune_on_two_ranks(tmp_path, fake_pacs, "train.dist_timeout_s=30")
        seconds = time.time() - tick
    finally:
        held.close()
    want = [f"error: run directory {tmp_path / 'run'} is in use by another flyp process; "
            "wait for it to finish, or pick another --out"]  # fmt: skip
    assert [code for code, _ in results] == [2, 2]
    assert [error_lines(err) for _, err in results] == [want, want]
    assert seconds < 30
