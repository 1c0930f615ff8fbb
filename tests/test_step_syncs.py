"""No host-device synchronisation inside a training step (issue 15, part 3).

On a GPU, every Python-side read of a device tensor (``item``, ``float()``, ``int()``,
``bool()``, ``tolist``, ``.cpu()``) makes the host wait until the device has caught up, which
stalls the pipeline. The training loop reads the loss back only every ``train.log_every``
steps (and at epoch ends and checkpoints), builds captions from the loader's host labels,
and tells distinct captions apart on the host.

These tests run on the CPU, where there is no device to wait for, so they count instead:
every conversion, per step (step k runs from the arrival of its batch to the fetch of the
next), and every conversion of a tensor the step "moved to the device". To tell those
apart on the CPU, where ``.to("cpu")`` returns the tensor itself, ``Tensor.to`` with a device
returns a marked copy, as a real move would.
"""

from __future__ import annotations

import json
import sys
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flyp.train as train_mod
from fakes import error_lines, tiny_overrides
from flyp.cli import main
from flyp.recipe import load_recipe
from flyp.train import finetune

CONVERSIONS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "cpu", "numpy")
STEPS_PER_EPOCH = 9  # 18 training images of the fake tree, batch 2
LOG_EVERY = 4


def overrides(root: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        root,
        "train.batch_size=2",
        "train.epochs=1",
        f"train.log_every={LOG_EVERY}",
        "data.num_workers=0",  # batches made in this process: the fetch is left out of the count
        *extra,
    )


class StepCounter:
    """Counts tensor conversions per training step, and those of tensors moved to the device."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.step = 0  # 0: before the first step
        self.counting = False
        self.all: dict[int, Counter] = {}
        self.of_moved: dict[int, Counter] = {}
        self.unique_of_moved = 0
        self.blocking_moves: Counter = Counter()  # per step
        self.moved: dict[int, weakref.ref] = {}
        self.losses: list[torch.Tensor] = []
        for name in CONVERSIONS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.Tensor, "to", self._moving(torch.Tensor.to))
        real_unique = torch.unique

        def unique(t, *args, **kwargs):
            self.unique_of_moved += self.counting and self._is_moved(t)
            return real_unique(t, *args, **kwargs)

        monkeypatch.setattr(torch, "unique", unique)
        real_step, real_loader = train_mod.forward_backward, train_mod.train_loader

        def forward_backward(*args, **kwargs):
            loss = real_step(*args, **kwargs)
            self.losses.append(loss.detach().clone())
            return loss

        monkeypatch.setattr(train_mod, "forward_backward", forward_backward)
        monkeypatch.setattr(
            train_mod, "train_loader", lambda *a, **k: PausedFetch(real_loader(*a, **k), self)
        )

    def _is_moved(self, t: torch.Tensor) -> bool:
        for candidate in (t, t._base):
            ref = self.moved.get(id(candidate)) if candidate is not None else None
            if ref is not None and ref() is candidate:
                return True
        return False

    def _counted(self, name, real):
        def conversion(t, *args, **kwargs):
            if self.counting:
                self.counting = False  # a conversion's own work is not counted again
                try:
                    self.all.setdefault(self.step, Counter())[name] += 1
                    if self._is_moved(t):
                        self.of_moved.setdefault(self.step, Counter())[name] += 1
                finally:
                    self.counting = True
            return real(t, *args, **kwargs)

        return conversion

    def _moving(self, real):
        def to(t, *args, **kwargs):
            out = real(t, *args, **kwargs)
            to_device = "device" in kwargs or any(isinstance(a, torch.device | str) for a in args)
            # flyp's own moves take host tensors to the device (torch's, within the device)
            by_flyp = sys._getframe(1).f_globals.get("__name__", "").startswith("flyp")
            if self.counting and to_device and out is t and by_flyp:  # a move: a copy
                out = t.clone()
                self.moved[id(out)] = weakref.ref(out)
                # a blocking copy from the host waits for the device's queue (memcpy and sync)
                self.blocking_moves[self.step] += not kwargs.get("non_blocking", False)
            return out

        return to


class PausedFetch:
    """The training loader, with the counting paused while it makes a batch (host work): step k
    runs from the k-th batch's arrival to the next fetch."""

    def __init__(self, loader, counter: StepCounter):
        self.loader, self.counter = loader, counter

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            self.counter.counting = False
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.counter.step += 1
            self.counter.counting = True
            yield batch


def logging_steps(total: int, *checkpoints: int) -> set[int]:
    return {
        s
        for s in range(1, total + 1)
        if s % LOG_EVERY == 0 or s % STEPS_PER_EPOCH == 0 or s in checkpoints
    }


# The host work a step may do, reading host tensors (never moved to the device): FLYP's
# FLYP's captions are rows of the run's token table, indexed by host tensors (none read back);
# lipsum-ft checks its random token ids (made on the host); ce-both reads its template picks (a
# CPU generator's).
HOST_READS = {
    "flyp": Counter(),
    "ft": Counter(),
    "lipsum-ft": Counter(__bool__=1),
    "ce-both": Counter(tolist=1),
}


@pytest.mark.parametrize(
    ("method", "extra"),
    [
        ("flyp", []),
        ("flyp", ["train.micro_batch=1"]),  # the gradient cache
        ("flyp", ["train.unique_captions=false", "train.collisions=soft"]),
        ("ft", []),
        ("lipsum-ft", []),
        ("ce-both", []),
    ],
)
def test_a_step_between_log_points_reads_nothing_back_from_the_device(
    fake_pacs, tmp_path, monkeypatch, method, extra
):
    """Between two log points a step converts no tensor to a Python value but a few host ones
    (HOST_READS): no item/float/bool of the
    loss, no int() per label; it never converts, nor runs torch.unique on, a tensor moved to
    the device (labels, caption tokens); and it moves nothing to the device with a blocking
    copy (which waits for the device's queue)."""
    counter = StepCounter(monkeypatch)
    finetune(load_recipe(None, overrides(fake_pacs, f"train.method={method}", *extra)), tmp_path / "r")
    assert counter.step == STEPS_PER_EPOCH
    quiet = sorted(set(range(1, STEPS_PER_EPOCH + 1)) - logging_steps(STEPS_PER_EPOCH))
    assert quiet == [1, 2, 3, 5, 6, 7]
    for step in quiet:
        counts = counter.all.get(step, Counter())
        assert counts <= HOST_READS[method], f"step {step}: {counts}"
    assert counter.of_moved == {} and counter.unique_of_moved == 0
    assert all(counter.blocking_moves[step] == 0 for step in quiet), counter.blocking_moves
    # the log points read the losses back: all at once
    assert counter.all[LOG_EVERY]["tolist"] == HOST_READS[method]["tolist"] + 1


def test_the_log_holds_each_step_s_own_loss_whatever_train_log_every(fake_pacs, tmp_path, monkeypatch):
    """The log's numbers are those read back at every step before (log_every=1 reads each
    step's loss as it comes, as the loop did): the same file for log_every 1, 4 and 100, each
    loss the step's own, rounded to 6 places."""
    counter = StepCounter(monkeypatch)
    logs = []
    for every in (1, 4, 100):
        run = tmp_path / f"every{every}"
        finetune(load_recipe(None, overrides(fake_pacs, f"train.log_every={every}")), run)
        logs.append((run / "log.jsonl").read_text())
    assert logs[0] == logs[1] == logs[2]
    records = [json.loads(line) for line in logs[0].splitlines() if "loss" in json.loads(line)]
    assert [r["step"] for r in records] == list(range(1, STEPS_PER_EPOCH + 1))
    own = [round(loss.item(), 6) for loss in counter.losses[:STEPS_PER_EPOCH]]
    assert [r["loss"] for r in records] == own


def test_a_non_finite_loss_between_log_points_is_named_by_its_own_step(
    fake_pacs, tmp_path, monkeypatch, capsys
):
    """A loss that becomes nan at step 5 stops the run at the next check (step 6: a checkpoint,
    which waits for the check) naming step 5, not 6; the log keeps steps 1-4, and the last
    checkpoint is step 3's: none is saved after a non-finite loss."""
    real = train_mod.forward_backward
    calls = {"n": 0}

    def diverging(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 5 else loss

    monkeypatch.setattr(train_mod, "forward_backward", diverging)
    run = tmp_path / "run"
    (tmp_path / "r.yaml").write_text("name: r\n")
    argv = ["finetune", str(tmp_path / "r.yaml"), "--out", str(run)]
    argv += [f"--set={o}" for o in overrides(fake_pacs, "train.checkpoint_every=3")]
    assert main(argv) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "the loss is nan at step 5:" in err[0] and "train.lr" in err[0]
    assert calls["n"] == 6  # it ran on to the check
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert torch.load(run / "state.pt", weights_only=False)["step"] == 3
    assert not (run / "metrics.json").exists()


def test_a_resume_may_change_train_log_every_and_logs_the_same(fake_pacs, tmp_path):
    """train.log_every changes no number of the run: a run stopped mid-window (step 6) and
    resumed with another log_every writes the log and weights of an uninterrupted run."""
    whole = tmp_path / "whole"
    finetune(load_recipe(None, overrides(fake_pacs)), whole)
    parted = tmp_path / "parted"
    finetune(load_recipe(None, overrides(fake_pacs, "train.stop_after_steps=6")), parted)
    assert len((parted / "log.jsonl").read_text().splitlines()) == 6  # flushed at the stop
    finetune(load_recipe(None, overrides(fake_pacs, "train.log_every=1")), parted, resume=True)
    assert (parted / "log.jsonl").read_text() == (whole / "log.jsonl").read_text()
    weights, resumed = load_file(whole / "model.safetensors"), load_file(parted / "model.safetensors")
    assert weights.keys() == resumed.keys()
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_train_log_every_below_one_is_refused_in_one_line(tmp_path, capsys, value):
    """train.log_every must be >= 1: one line naming the key, exit status 2, no run left."""
    out, recipe = tmp_path / "run", tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    assert main(["finetune", str(recipe), f"--set=train.log_every={value}", "--out", str(out)]) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "train.log_every" in err[0] and ">= 1" in err[0]
    assert not out.exists()
