"""Experiment tracking: the numbers of ``log.jsonl`` and ``metrics.json``, also sent to
TensorBoard and/or Weights & Biases (``train.log_to: [tensorboard, wandb]``).

``log.jsonl`` stays the source of truth (resume truncates it, reports read it); a tracker is a
view of it for people, written by rank 0 only:

- per step: ``train/loss``, ``train/lr``, ``train/temperature``;
- per epoch: ``val/<metric>`` (the benchmark's headline metric on ID validation);
- at the end: ``final/<set>/<metric>`` for every evaluation set and metric, ``final/id`` and
  ``final/ood_mean`` (as in ``metrics.json``).

TensorBoard writes event files to ``run_dir/tensorboard``; a resumed run drops the steps after
its checkpoint from the view (``purge_step``), as it drops them from ``log.jsonl``. W&B runs
offline unless ``WANDB_MODE`` says otherwise (training machines often have no network; ``wandb
sync run_dir/wandb/offline-run-*`` uploads later), one W&B run per run directory, named after
it (``flyp compare``: ``<method>-s<seed>``), in the project named after the recipe.

Both packages are optional extras, imported only when a recipe asks for them;
:func:`check_trackers` refuses a missing one before anything is built or written.

Progress for the person running flyp goes to stderr (stdout keeps the results): on a terminal,
progress bars named after what runs (:func:`bar`: "ft seed 0 epoch 1/3", "ft seed 0 WiSE
α=0.5 eval sketch"); anywhere else (a log file, nohup, CI) one plain line per phase and per
epoch (:func:`note`), since a bar written to a file is either nothing or noise.
"""

from __future__ import annotations

import atexit
import importlib
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flyp.recipe import Recipe, RecipeError


def on_terminal() -> bool:
    """Whether progress goes to a terminal (stderr is one): bars there, plain lines elsewhere."""
    return sys.stderr.isatty()


# What is running now, outermost first ("ft seed 0", "WiSE α=0.5"): it names every progress
# line and bar, so a log says which method, seed and set each line is about.
_RUNNING: list[str] = []


@contextmanager
def running(what: str) -> Iterator[None]:
    """Name the progress lines and bars written inside this block after ``what``."""
    _RUNNING.append(what)
    try:
        yield
    finally:
        _RUNNING.pop()


def named(what: str = "") -> str:
    """``what``, preceded by the names of what is running ("ft seed 0: evaluating val")."""
    where = " ".join(_RUNNING)
    return f"{where}: {what}" if where and what else where or what


def say(what: str) -> None:
    """One line on stderr, terminal or not: a choice the user should know was made for them."""
    print(f"{time.strftime('%H:%M:%S')} {named(what)}", file=sys.stderr, flush=True)


def note(what: str) -> None:
    """One progress line on stderr off a terminal (on a terminal the bars show it)."""
    if not on_terminal():
        say(what)


def bar(iterable: Iterable, what: str, **options: Any):
    """A tqdm progress bar named after what is running, on a terminal only."""
    from tqdm.auto import tqdm

    disable = options.pop("disable", False) or not on_terminal()
    return tqdm(iterable, desc=named(what), disable=disable, **options)


def clock(seconds: float) -> str:
    """A duration as H:MM:SS."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


# What each tracker imports; its extra (pip install 'flyp[<name>]') has the same name.
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


def check_trackers(recipe: Recipe) -> None:
    """Refuse, in one line, a tracker whose package is not installed (call before the run
    directory is made: a run that cannot log as asked should not start)."""
    for name in recipe.train.log_to:
        try:
            importlib.import_module(MODULES[name])
        except ImportError:
            raise RecipeError(
                f"train.log_to={name} needs the {name} package: pip install 'flyp[{name}]'"
            ) from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tracker scalars of one ``log.jsonl`` record: a training step or a validation."""
    if "loss" in record:
        return {f"train/{key}": record[key] for key in ("loss", "lr", "temperature")}
    if "val" in record:
        return {f"val/{record['val_metric']}": record["val"]}
    return {}


def final_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Every number of ``metrics.json`` a comparison is about: each set's metrics (not its
    image count ``n``), the ID value and the OOD mean. Metrics a set lacks (None) are left out."""
    scalars = {
        f"final/{name}/{key}": value
        for name, values in metrics["sets"].items()
        for key, value in values.items()
        if key != "n" and _number(value)
    }
    for key in ("id", "ood_mean"):
        if _number(metrics.get(key)):
            scalars[f"final/{key}"] = metrics[key]
    return scalars


class _TensorBoard:
    def __init__(self, run_dir: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events a killed run wrote after its checkpoint, so
        # the resumed steps replace them instead of being drawn twice.
        self.writer = SummaryWriter(
            log_dir=str(run_dir / "tensorboard"),
            purge_step=start_step + 1 if start_step else None,
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def summary(self, scalars: dict[str, float], step: int) -> None:
        self.log(scalars, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, recipe: Recipe, run_dir: Path) -> None:
        import wandb

        self.run = wandb.init(
            mode=os.environ.get("WANDB_MODE", "offline"),
            dir=str(run_dir),
            project=recipe.name,
            name=run_dir.name,
            config=recipe.to_dict(),
        )

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def summary(self, scalars: dict[str, float], step: int) -> None:
        self.run.summary.update(scalars)

    def close(self) -> None:
        self.run.finish()


class Tracker:
    """The trackers of one run (none: every call does nothing)."""

    def __init__(self, writers: list[Any], start_step: int = 0) -> None:
        self.writers = writers
        self.step = start_step  # the last step logged: where the final metrics are drawn

    def log(self, record: dict[str, Any], step: int) -> None:
        """Send one ``log.jsonl`` record (a training step or a validation)."""
        self.step = step
        scalars = step_scalars(record)
        for writer in self.writers:
            writer.log(scalars, step)

    def summary(self, metrics: dict[str, Any]) -> None:
        """Send the final metrics (``metrics.json``)."""
        scalars = final_scalars(metrics)
        for writer in self.writers:
            writer.summary(scalars, self.step)

    def close(self) -> None:
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.close()


# The open tracker of each run directory: opened in the training loop, given the final metrics
# and closed by finish_tracker when the run writes metrics.json.
_OPEN: dict[Path, Tracker] = {}


def open_tracker(recipe: Recipe, run_dir: Path, is_main: bool, start_step: int = 0) -> Tracker:
    """The trackers ``train.log_to`` asks for, for the run in ``run_dir`` (rank 0 only; other
    ranks and an empty ``log_to`` get a tracker that does nothing). ``start_step``: the step a
    resumed run continues from."""
    if not is_main or not recipe.train.log_to:
        return Tracker([])
    check_trackers(recipe)
    # A tracker left open by a run that failed in this process: one W&B run at a time (a new
    # wandb.init would hand back the unfinished one).
    _close_all()
    writers: list[Any] = []
    try:
        for name in recipe.train.log_to:
            if name == "tensorboard":
                writers.append(_TensorBoard(run_dir, start_step))
            else:
                writers.append(_WandB(recipe, run_dir))
    except BaseException:
        Tracker(writers).close()
        raise
    tracker = _OPEN[run_dir.resolve()] = Tracker(writers, start_step)
    return tracker


def finish_tracker(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Send the final metrics to the run's open tracker, if any, and close it."""
    tracker = _OPEN.pop(run_dir.resolve(), None)
    if tracker is not None:
        try:
            tracker.summary(metrics)
        finally:
            tracker.close()


def close_tracker(run_dir: Path) -> None:
    """Close the run's tracker if it is still open (a run stopped or failed before its end)."""
    tracker = _OPEN.pop(run_dir.resolve(), None)
    if tracker is not None:
        tracker.close()


@atexit.register
def _close_all() -> None:
    while _OPEN:
        _OPEN.popitem()[1].close()
