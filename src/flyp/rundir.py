"""The run directory: what a run owns on disk besides its weights.

Claiming it (an exclusive lock, held until the run ends or its process dies, removed when it
ends), clearing what a run that never reached its first checkpoint wrote, the step log
(``log.jsonl``: appended per record, cut back to the checkpoint a resumed run restarts from),
the random generators' state saved with each checkpoint, and the settings a finished or killed
run was made with (checked before a run directory is reused or resumed).

What the verbs ask of a run directory is here too: where a run goes by default, its
recipe.yaml (or why the folder holds no run), its data folders, whether it finished, the
recipe a resumed run continues with and the one an evaluation may use, and what a run or a
comparison interrupted by Ctrl-C kept (with the command that continues it).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flyp.checkpoint import CheckpointError, atomic_write_text, load_state, read_json
from flyp.errors import RunError
from flyp.outputs import data_folders, unfinished
from flyp.paths import broken_link, link_fault
from flyp.recipe import (
    RESUME_SETTABLE,
    Recipe,
    RecipeError,
    changes,
    differences,
    flat,
    load_recipe,
    recipe_differences,
    run_settings,
)

LOCK_NAME = ".flyp.lock"


def lock_file(path: Path) -> Any:
    """Open and exclusively lock ``path`` (held until closed, so a killed run frees it).

    A run removes its lock file when it ends. A process that opened the file just before that
    may then lock a file no longer in the folder: it checks that the file it holds is still
    the one at ``path``, and opens the new one if not, so two live runs never hold two files."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, the emptiness check of claim still applies
        return open(path, "a+")
    while True:
        lock = open(path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise RunError(
                f"run directory {path.parent} is in use by another flyp process; wait for it "
                "to finish, or pick another --out"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(lock.fileno()).st_ino:
                return lock
        except FileNotFoundError:
            pass
        lock.close()  # removed (or replaced) by the run that held it: lock the file there now


def release(run_dir: Path, lock: Any) -> None:
    """Remove the lock file, then let go of it: a finished (or failed) run leaves no lock."""
    try:
        (run_dir / LOCK_NAME).unlink(missing_ok=True)
    finally:
        lock.close()


def is_temporary(path: Path) -> bool:
    """A file flyp.checkpoint's atomic writes make before renaming it into place (a kill
    between the two leaves it behind)."""
    return path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file()


def claim(run_dir: Path, resume: bool) -> Any:
    """Claim ``run_dir`` for this process (an exclusive lock held until the run ends or the
    process dies) and check it can be used as asked. Returns the open lock file.

    The temporary files of a killed run's unfinished writes are removed first: they are no
    part of the run, and a folder holding only them (a kill while the first recipe.yaml was
    being written) is taken as empty."""
    why = link_fault(run_dir)
    if why:  # mkdir would say only "File exists"
        raise RunError(f"run directory {run_dir} is {why}; remove the link or pass another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_file(run_dir / LOCK_NAME)
    for path in run_dir.iterdir():
        if is_temporary(path):
            path.unlink(missing_ok=True)
    if not resume and any(p.name != LOCK_NAME for p in run_dir.iterdir()):
        release(run_dir, lock)
        raise RunError(
            f"run directory {run_dir} is not empty; pick a new one, or pass --resume to continue it"
        )
    return lock


def tidy_finished(run_dir: Path) -> None:
    """Remove what a kill after a run's results were written left in its folder: the last
    checkpoint, temporary files, the lock. Left as it is while another process holds it."""
    try:
        lock = claim(run_dir, resume=True)
    except RunError:
        return
    try:
        (run_dir / "state.pt").unlink(missing_ok=True)
    finally:
        release(run_dir, lock)


def clear_run_dir(run_dir: Path) -> None:
    """Remove what a run that never reached its first checkpoint wrote (the lock stays)."""
    for path in run_dir.iterdir():
        if path.name != LOCK_NAME:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def saved_settings(run_dir: Path) -> tuple[dict[str, Any] | None, Path | None]:
    """The run settings (flyp.recipe.run_settings) of the run in ``run_dir``, and the file they
    come from: a finished run's metrics.json, else its recipe.yaml (a killed run, or a run
    from before metrics.json held them); (None, None) for a folder that holds no run."""
    metrics = run_dir / "metrics.json"
    why = link_fault(metrics)
    if why:  # not a killed run's missing file: the finished run's settings are out of reach
        raise RunError(f"{metrics} is {why}; restore it, or remove it to treat the run as unfinished")
    if metrics.is_file():
        settings = read_json(metrics, ("sets",)).get("settings")
        if settings is not None:
            return settings, metrics
    path = run_dir / "recipe.yaml"
    if path.is_file():
        return run_settings(load_recipe(path)), path
    return None, None


def check_same_run(run_dir: Path, recipe: Recipe, seed_free: bool = False) -> None:
    """A run directory about to be reused or resumed must hold a run of ``recipe``: a rerun
    with other settings into the same --out would otherwise report the old run as the new one.
    Only what a resumed run may change (flyp.recipe.RESUME_SETTABLE: paths, device, speed) and
    what does not change the run's numbers may differ; ``seed_free``: the seed too (zeroshot and
    lp do not depend on it)."""
    saved, source = saved_settings(Path(run_dir))
    if saved is None:
        return
    ignore = ("train.seed",) if seed_free else ()
    diff = differences(saved, run_settings(recipe), ignore)
    if diff:
        raise RunError(
            f"{run_dir} holds a run made with other settings ({diff}; from its {source.name}): "
            "it belongs to another experiment; pass a new --out (or the settings it used)"
        )


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator a step draws from, as tensors and plain lists (state.pt loads with
    ``weights_only=True``: nothing in it can run code)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def append_log(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a resumed run restarts from, and a last
    line cut short by the kill (written after that checkpoint: each step logs, then saves)."""
    if not path.exists():
        return
    lines, kept = path.read_text().splitlines(), []
    for number, line in enumerate(lines, 1):
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except (json.JSONDecodeError, AttributeError):
            if number < len(lines):
                raise CheckpointError(
                    f"{path} line {number} is not a log record, so the run's log is damaged; "
                    "delete that line to resume, or start the run again in a new run directory"
                ) from None
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def default_run_dir(recipe_name: str, method: str, seed: int) -> Path:
    """Where ``flyp finetune`` without --out writes a run: runs/<recipe>-<method>-s<seed>."""
    return Path("runs") / f"{recipe_name}-{method}-s{seed}"


def run_recipe_path(run_dir: Path, what: str) -> Path:
    """``run_dir``/recipe.yaml, or a one-line error saying what the folder is not."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist; pass {what}")
    path = run_dir / "recipe.yaml"
    refusal = broken_link(path)
    if refusal:
        raise FileNotFoundError(refusal)
    if not path.is_file():
        raise FileNotFoundError(
            f"{run_dir} has no recipe.yaml, so it is not a flyp run; pass {what}"
        )
    return path


def run_data_folders(run_dir: Path) -> list[str]:
    """The data folders of the run in ``run_dir`` (none when its recipe.yaml does not load: the
    verb reading the run says why)."""
    try:
        return data_folders(load_recipe(run_dir / "recipe.yaml"))
    except (RecipeError, OSError):
        return []


def check_finished(run_dir: Path, allowed: bool) -> None:
    """Refuse the weights of an unfinished run, or with --unfinished warn on stderr."""
    reason = unfinished(run_dir)
    if reason and not allowed:
        raise RunError(
            f"{reason}; finish it with flyp finetune --resume {run_dir}, or pass --unfinished "
            "to use those weights anyway"
        )
    if reason:
        print(f"warning: {reason}; the numbers are not the finished run's", file=sys.stderr)


# What evaluating a finished run (flyp evaluate, flyp wise) may change in its recipe: which OOD
# sets and how many images are evaluated, and how (besides where the data lives, the device and
# speed: RESUME_SETTABLE). Anything else would split, build or load another model than the one
# trained: another data.split_seed or test_fraction tests on images the run trained on.
EVAL_SETTABLE = ("data.ood_domains", "data.max_eval", "data.on_bad_image", "eval.")


def check_as_trained(run_dir: Path, recipe: Recipe, verb: str) -> None:
    """Refuse a recipe (its --set / --recipe changes, or a recipe.yaml edited by hand) that
    reads ``run_dir`` as another run: compared with the settings the run stored when it finished
    (its metrics.json), else with its recipe.yaml."""
    saved, source = saved_settings(run_dir)
    if saved is None:
        saved = run_settings(load_recipe(run_dir / "recipe.yaml"))
    # where the data lives and what is evaluated may differ; so may the flyp that evaluates and
    # the machine (auto precisions are what the run resolved them to)
    ignore = tuple(k for k in {**saved, **run_settings(recipe)} if k.startswith(EVAL_SETTABLE))
    diff = recipe_differences(saved, recipe, ignore)
    if diff:
        raise RecipeError(
            f"{verb} {run_dir} with other settings than it was trained with ({diff}), as its "
            f"{source.name if source else 'recipe.yaml'} records them: other "
            "splits would score images it trained on, another model or head is not this run; "
            "drop those changes (only data.ood_domains, data.max_eval, eval.* and where the data "
            "lives may differ)"
        )


def resume_recipe(run_dir: Path, overrides: list[str]) -> tuple[Recipe, list[str]]:
    """The recipe of a killed run, with the ``--set`` overrides that leave the run the same run
    applied; one that would change it (train.lr, data.max_train, ...) is refused by name."""
    path = run_recipe_path(run_dir, "the run directory of a killed run")
    saved = load_recipe(path, ["train.stop_after_steps="])
    recipe = load_recipe(path, ["train.stop_after_steps=", *overrides])
    changed, refused = changes(saved, recipe)
    if refused:
        key = refused[0]
        before, after = flat(saved.to_dict()), flat(recipe.to_dict())
        raise RecipeError(
            f"--resume {run_dir} cannot change {key} ({before.get(key)!r} -> {after[key]!r}): "
            f"the rest of the run would differ from its start; start a new run with --out, "
            f"or change only {', '.join(RESUME_SETTABLE)}"
        )
    return recipe, changed


def _command(argv: list[str]) -> str:
    """The command line a user typed, quoted so that it can be pasted back."""
    return shlex.join(["flyp", *argv])


def checkpoint_step(state_path: Path) -> int | None:
    """The step of a run's last checkpoint, or None if its state cannot be read."""
    try:
        return int(load_state(state_path)["step"])
    except Exception:  # a message about an interrupted run must not fail on a bad state file
        return None


def kept_run(run_dir: Path) -> str:
    """What an interrupted ``flyp finetune`` kept, and how to go on."""
    state = run_dir / "state.pt"
    if (run_dir / "metrics.json").is_file():
        return f"the run had finished: its results are in {run_dir / 'metrics.json'}"
    if not state.is_file():
        return "nothing was kept (no checkpoint yet); start it again with the same command"
    step = checkpoint_step(state)
    at = f" (step {step})" if step is not None else ""
    resume = _command(["finetune", "--resume", str(run_dir)])
    return f"kept {shlex.quote(str(run_dir))} at its last checkpoint{at}; resume with: {resume}"


def kept_runs(out: Path, argv: list[str]) -> str:
    """What an interrupted ``flyp compare`` or ``flyp sweep`` kept under ``out``, and how to go
    on: rerunning the same command reuses finished runs and resumes killed ones."""
    finished = sorted(p.parent.name for p in out.glob("**/metrics.json"))
    partial = sorted(p.parent.name for p in out.glob("**/state.pt"))
    kept = f"kept {len(finished)} finished run{'s' * (len(finished) != 1)} in {out}"
    if partial:
        their = "its last checkpoint" if len(partial) == 1 else "their last checkpoints"
        kept += f" and {', '.join(partial)} at {their}"
    return f"{kept}; continue with the same command: {_command(argv)}"
