"""A run sized before it starts, and its progress with an ETA while it runs.

- :func:`plan` says, before the first run, what a comparison (or one ``finetune``) will do:
  runs, training steps, evaluations and the images they read.
- The training loop calls :func:`step` after every step and the evaluation :func:`images` after
  every batch; from their measured times, after the first :data:`ESTIMATE_AFTER` steps, one line
  gives the estimated total and remaining time, and again (at most once a minute) whenever the
  estimated total moves by more than a fifth.
- Off a terminal (a piped log, nohup, CI), a line at least every :data:`EVERY_S` seconds while
  training or evaluating: what runs, step k/N (or images k/N of the set), and the ETA. On a
  terminal the progress bars show this.

Only the main process (rank 0 under torchrun) speaks. Estimates are estimates: a step's time is
the mean over the steps measured so far (every method's), and an evaluation's per-image time is
taken from a training step's until evaluations have been timed.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

from flyp import tracking

EVERY_S = 30.0  # at most this long without a progress line off a terminal (issue 23)
ESTIMATE_AFTER = 5  # training steps timed before the first estimate
EVAL_PER_STEP_IMAGE = 0.35  # an image evaluated, as a share of a training step's time per image


@dataclass
class _State:
    runs: int = 0
    steps_total: int = 0
    eval_total: int = 0  # images evaluated in all (every set, every evaluation)
    batch_size: int = 1
    steps_done: int = 0
    step_seconds: float = 0.0
    steps_timed: int = 0
    eval_done: int = 0
    eval_seconds: float = 0.0
    eval_timed: int = 0
    started: float = field(default_factory=time.time)
    mark: float = field(default_factory=time.perf_counter)  # the last step or batch ended here
    where: str = ""  # what the next progress line says: "step 12/40", "eval val 64/300"
    active: bool = False  # training or evaluating now
    last_line: float = field(default_factory=time.time)
    said_estimate: float | None = None  # the total time last said, and when
    said_at: float = 0.0
    outer: bool = False  # a comparison's plan: its runs do not plan again


P = ParamSpec("P")
R = TypeVar("R")

_state: _State | None = None
_lock = threading.Lock()
_beat: threading.Thread | None = None


def _main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def plan(
    runs: int,
    steps: int,
    evaluations: int,
    eval_images: int,
    batch_size: int,
    what: str = "",
    outer: bool = False,
) -> None:
    """Start sizing: say the plan in one line and start the progress lines. ``outer``: a
    comparison's plan, which the runs inside it keep (:func:`run_plan` is then a no-op)."""
    global _state
    with _lock:
        _state = _State(runs, steps, eval_images, max(1, batch_size), outer=outer)
    if _main_process():
        extra = f" ({what})" if what else ""
        tracking.say(
            f"plan: {runs} run{'s' * (runs != 1)}{extra}, {steps} training steps (batch "
            f"{batch_size}), {evaluations} evaluations of {eval_images} images in all; an "
            f"estimate of the time follows the first {ESTIMATE_AFTER} steps"
        )
        _start_beat()


def run_plan(steps: int, evaluations: int, eval_images: int, batch_size: int) -> None:
    """One ``finetune`` run's plan, unless a comparison planned it already."""
    if _state is not None and _state.outer:
        return
    plan(1, steps, evaluations, eval_images, batch_size)


def done() -> None:
    """The plan is carried out: no more progress lines."""
    global _state
    with _lock:
        _state = None


def _count(seconds_key: str, timed_key: str, done_key: str, amount: int, where: str) -> _State | None:
    """Add the time since the last mark to one counter of the plan; None without a plan."""
    state = _state
    if state is None:
        return None
    now = time.perf_counter()
    with _lock:
        setattr(state, seconds_key, getattr(state, seconds_key) + now - state.mark)
        setattr(state, timed_key, getattr(state, timed_key) + amount)
        setattr(state, done_key, getattr(state, done_key) + amount)
        state.mark, state.where, state.active = now, where, True
    return state


def run_done() -> None:
    """A run ended (finished, stopped or failed): its own plan ends; a comparison's goes on."""
    if _state is not None and not _state.outer:
        done()


def ends_plan(function: Callable[P, R]) -> Callable[P, R]:
    """``function`` (a comparison) ends the plan it made when it returns or raises, so no
    progress line outlives it."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        finally:
            done()

    return wrapper


def step(k: int, n: int) -> None:
    """A training step ended: step ``k`` of this run's ``n``."""
    state = _count("step_seconds", "steps_timed", "steps_done", 1, f"step {k}/{n}")
    if state is not None and state.steps_timed >= ESTIMATE_AFTER:
        _maybe_estimate(state)


def images(name: str, k: int, n: int | None, count: int) -> None:
    """An evaluation batch of ``count`` images ended: ``k`` of the set ``name``'s ``n``."""
    where = f"evaluating {name} {k}/{n if n is not None else '?'} images"
    _count("eval_seconds", "eval_timed", "eval_done", count, where)


def working(what: str) -> None:
    """Work that is neither a step nor an evaluated batch (decoding a set, the probe's or the
    frozen tower's features) is going on: ``what`` is said in the next progress line. Its time
    counts as evaluation time (with no image counted): an evaluation from decoded images or
    frozen features is fast only because this work was done for it."""
    state = _state
    if state is not None:
        now = time.perf_counter()
        with _lock:
            state.eval_seconds += now - state.mark
            state.mark, state.where, state.active = now, what, True


def begin() -> None:
    """Time from now (a loop starts: what ran before it is no step's or batch's time)."""
    state = _state
    if state is not None:
        state.mark = time.perf_counter()


def idle() -> None:
    """Neither training nor evaluating: no progress lines until the next step or batch."""
    state = _state
    if state is not None:
        state.active = False


def remaining(state: _State) -> float | None:
    """Seconds left by the measured times, or None before any step is timed."""
    if not state.steps_timed and not state.eval_timed:
        return None
    per_step = state.step_seconds / state.steps_timed if state.steps_timed else None
    if state.eval_timed:
        per_image = state.eval_seconds / state.eval_timed
    else:
        per_image = per_step / state.batch_size * EVAL_PER_STEP_IMAGE
    if per_step is None:
        per_step = per_image * state.batch_size / EVAL_PER_STEP_IMAGE
    steps_left = max(0, state.steps_total - state.steps_done)
    images_left = max(0, state.eval_total - state.eval_done)
    return steps_left * per_step + images_left * per_image


def _maybe_estimate(state: _State) -> None:
    left = remaining(state)
    if left is None or not _main_process():
        return
    elapsed = time.time() - state.started
    total, said = elapsed + left, state.said_estimate
    if said is not None and (abs(total - said) <= 0.2 * said or time.time() - state.said_at < 60):
        return
    per_step = state.step_seconds / state.steps_timed
    state.said_estimate, state.said_at = total, time.time()
    tracking.say(
        f"estimate: {tracking.clock(elapsed + left)} in all, {tracking.clock(left)} left "
        f"({per_step:.2f} s a training step over {state.steps_timed} steps"
        + (
            f", {state.eval_timed / max(state.eval_seconds, 1e-9):.0f} images/s evaluating)"
            if state.eval_timed
            else ")"
        )
    )


def line() -> str | None:
    """The progress line now (None without a plan)."""
    state = _state
    if state is None:
        return None
    where = state.where if state.active else f"working (last: {state.where or 'starting'})"
    left = remaining(state)
    eta = f"ETA {tracking.clock(left)}" if left is not None else "ETA after the first steps"
    return f"{where}, {state.steps_done}/{state.steps_total} steps in all, {eta}"


def _beat_loop() -> None:
    while True:
        time.sleep(min(1.0, EVERY_S / 4))
        state = _state
        if state is None or tracking.on_terminal():
            continue
        if time.time() - state.last_line >= EVERY_S:
            text = line()
            state.last_line = time.time()
            if text:
                tracking.say(text)


def _start_beat() -> None:
    global _beat
    if _beat is None or not _beat.is_alive():
        _beat = threading.Thread(target=_beat_loop, name="flyp-progress", daemon=True)
        _beat.start()


def run_size(recipe, benchmark, trains: bool, wise_alphas=()) -> tuple[int, int, int]:
    """(training steps, evaluations, images evaluated) of one run of ``recipe``: its steps, its
    validation after each epoch (when it selects on it), its final evaluation of every set, and
    a WiSE-FT sweep over ``wise_alphas`` (0 and 1 are the runs' own numbers: not evaluated)."""
    sets = benchmark.eval_sets()
    every = sum(len(s) for s in sets.values())
    steps = recipe.train.epochs * (benchmark.train_size() // recipe.train.batch_size) if trains else 0
    evaluations, images_ = len(sets), every
    if trains and recipe.train.select_on == "val" and recipe.eval.every_epoch:
        evaluations += recipe.train.epochs
        images_ += recipe.train.epochs * len(benchmark.val)
    mixed = [a for a in wise_alphas if a not in (0.0, 1.0)] if trains else []
    return steps, evaluations + len(mixed) * len(sets), images_ + len(mixed) * every
