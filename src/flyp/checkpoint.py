"""Weights as safetensors, a resumable checkpoint as one torch file; every write is atomic.

A write goes to a temporary file in the same folder and is renamed over the target, so a
killed process (or a full disk) leaves either the old file or the new one, never half of one.
Files get the permissions the user's umask gives (as ``open`` would), not mkstemp's 0600, so
a team can read a shared run directory. Nothing runs code on load: weights are safetensors and
the training state is read with ``torch.load(weights_only=True)`` (tensors, numbers, strings,
lists and dicts only).

A training checkpoint is one file (``state.pt``): the weights, the optimizer, the schedule, the
random generators and the counters, renamed into place together. Two files renamed one after
the other can be separated by a kill (the new weights beside the old optimizer: a resume then
applies a step twice, silently), one file cannot.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A weights or state file that cannot be read or written; the message names the file."""


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def _free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def _torch_save(obj: Any, path: str) -> None:
    torch.save(obj, path)


# A full disk, as the writers report it: the OS (ENOSPC, EDQUOT), safetensors ("No space left on
# device (os error 28)"); torch's zip writer says only "unexpected pos" or "file write failed",
# so a writer's error where the disk then has under FULL_BYTES free is taken as the full disk.
FULL_BYTES = 1 << 20


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after the write: some writers recreate the file
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        if isinstance(err, (SafetensorError, RuntimeError)):
            full = "os error 28" in str(err) or _free_bytes(path.parent) < FULL_BYTES
            if not full:
                raise CheckpointError(
                    f"could not write {path} ({str(err).splitlines()[0]})"
                ) from err
        if full:
            raise CheckpointError(
                f"no space left on device while writing {path}; free space or choose another --out"
            ) from err
        raise


def _write_text(tmp: str, text: str) -> None:
    with open(tmp, "w") as f:
        f.write(text)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: _write_text(tmp, text))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path, keys: Sequence[str] = ()) -> dict[str, Any]:
    """A JSON mapping flyp wrote and now rereads (a run's metrics.json, wise.json, ...). One
    cut short by a killed process, or that is not flyp's (no mapping, or without ``keys``), is
    named with its fix instead of a traceback."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problem = (
            f"{err.msg} at line {err.lineno}"
            if isinstance(err, json.JSONDecodeError)
            else "not UTF-8 text"
        )
        raise CheckpointError(
            f"{path} is not valid JSON ({problem}), maybe cut short by a killed process; "
            "delete it and rerun to write it again"
        ) from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if not isinstance(data, dict) or missing:
        kind = type(data).__name__
        what = f"lacks '{missing[0]}'" if isinstance(data, dict) else f"holds a {kind}"
        raise CheckpointError(
            f"{path} {what}, so flyp did not write it; delete it and rerun to write it again"
        )
    if path.name in ("metrics.json", "wise.json"):
        check_results(data, path)
    return data


# The scores of an evaluation set that are fractions (accuracies, F1, ECE), and a run's
# summaries of them; metrics.json and wise.json hold them as numbers in [0, 1].
FRACTION_SCORES = (
    "accuracy", "macro_f1", "balanced_accuracy", "worst_class_accuracy", "worst_group_accuracy",
    "ece", "ece_ts",
)  # fmt: skip
FRACTION_SUMMARIES = ("id", "ood_mean", "val", "alpha", "best_alpha")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_results(data: dict[str, Any], path: Path) -> None:
    """A run's ``metrics.json`` or ``wise.json`` as flyp writes it, field by field: every score
    a number in [0, 1] (NaN passes: a score of an empty class), set sizes whole numbers, names
    text, ``sets`` a non-empty mapping, ``settings`` a mapping, ``points`` a list of them. A file
    edited by hand or by another tool is named with its field, in one line."""

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: '{field}' {problem}, so it is not as flyp wrote it; rerun that run (or "
            "delete the file and rerun to write it again)"
        )

    def fraction(value: Any, field: str) -> None:
        if value is None:
            return
        if not _is_number(value):
            raise bad(field, f"is {value!r} ({type(value).__name__}), not a number")
        if not (0 <= value <= 1 or value != value):
            raise bad(field, f"is {value!r}, outside [0, 1] (flyp stores fractions, not %)")

    def scores(sets: Any, field: str) -> None:
        if not isinstance(sets, dict) or not sets:
            raise bad(field, "is not a mapping of evaluation sets" if sets else "is empty")
        for name, numbers in sets.items():
            if not isinstance(numbers, dict):
                raise bad(f"{field}.{name}", f"is {type(numbers).__name__}, not a mapping")
            for key in FRACTION_SCORES:
                if key in numbers:
                    fraction(numbers[key], f"{field}.{name}.{key}")
            n = numbers.get("n")
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
                raise bad(f"{field}.{name}.n", f"is {n!r}, not a count")

    for key in FRACTION_SUMMARIES:
        if key in data:
            fraction(data[key], key)
    if "sets" in data:
        scores(data["sets"], "sets")
    for key in ("method", "metric", "id_name", "recipe", "fingerprint"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise bad(key, f"is {data[key]!r}, not text")
    names = data.get("ood_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise bad("ood_names", "is not a list of set names")
    if data.get("settings") is not None and not isinstance(data["settings"], dict):
        raise bad("settings", f"is {type(data['settings']).__name__}, not a mapping")
    seed = data.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad("seed", f"is {seed!r}, not a whole number")
    if "points" in data:
        points = data["points"]
        if not isinstance(points, list) or not points:
            raise bad("points", "is not a list of WiSE-FT points")
        for i, point in enumerate(points):
            if not isinstance(point, dict):
                raise bad(f"points[{i}]", f"is {type(point).__name__}, not a mapping")
            for key in FRACTION_SUMMARIES:
                if key in point:
                    fraction(point[key], f"points[{i}].{key}")
            if "sets" in point:
                scores(point["sets"], f"points[{i}].sets")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    _atomic(path, write)


METADATA_KEY = "flyp"  # safetensors metadata key holding the JSON that describes the weights


def save_weights(
    model: torch.nn.Module,
    path: Path,
    metadata: dict[str, Any] | None = None,
    keep: Callable[[str], bool] | None = None,
) -> None:
    """Save a model's state dict as safetensors (shared tensors are stored once per name).

    ``metadata`` (JSON-able) is stored in the file's header under ``"flyp"``, so the weights
    say what model they belong to. ``keep`` stores only the tensors it accepts: a run that
    changed nothing but a head need not copy the pretrained towers; such a file must say
    ``"tensors": "changed"`` in its metadata (:func:`load_weights` checks).
    """
    if keep is not None and (metadata or {}).get("tensors") != "changed":
        raise ValueError("a file that keeps only some tensors needs metadata tensors='changed'")
    state = {
        k: v.detach().contiguous().clone()
        for k, v in model.state_dict().items()
        if keep is None or keep(k)
    }
    header = None if metadata is None else {METADATA_KEY: json.dumps(metadata)}
    _atomic(path, lambda tmp: save_file(state, tmp, metadata=header))


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The flyp metadata a weights file carries, or None (a file written before it had any)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}); "
            "pass the model.safetensors of a finished run"
        ) from None
    if METADATA_KEY not in header:
        return None
    try:
        meta = json.loads(header[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise CheckpointError(
            f"{path}: its flyp metadata is not JSON ({err}); pass the run directory instead "
            "(its recipe.yaml gives the model spec)"
        ) from None
    if not isinstance(meta, dict):  # the fields are checked by flyp.metadata.check_metadata
        raise CheckpointError(
            f"{path}: its flyp metadata is a JSON {type(meta).__name__}, not a mapping; pass "
            "the run directory instead (its recipe.yaml gives the model spec)"
        )
    return meta


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is not one is named, not a traceback."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({str(err).splitlines()[0]}); "
            "pass the model.safetensors of a finished run"
        ) from None


def load_weights(model: torch.nn.Module, path: Path, method: str | None = None) -> None:
    """Load weights strictly: every tensor of the model must be in the file and fit.

    ``method``: the method of the run the weights are read for; weights whose metadata says
    another method made them (another run's file copied in) are refused, not evaluated as
    this run's.

    The one exception: a file whose metadata says ``"tensors": "changed"`` (a zeroshot or lp
    run) holds only what differs from the pretrained model, so the model's own tensors stay
    where the file has none. ``model`` must then hold the pretrained weights, as a model just
    loaded from its spec does.
    """
    state = read_weights(path)
    meta = read_metadata(path) or {}
    made_by = meta.get("method")
    if method is not None and made_by is not None and made_by != method:
        raise CheckpointError(
            f"{path} holds the weights of a {made_by} run, but this run is {method}: put back "
            "the run's own model.safetensors (or evaluate that file with its own run's recipe)"
        )
    changed_only = meta.get("tensors") == "changed"
    fix = "load it with the model spec it was trained with (see the run's recipe.yaml)"
    load_tensors(model, state, path, fix, changed_only)


def load_tensors(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    fix: str,
    changed_only: bool = False,
) -> None:
    """Load ``state`` (read from ``path``) into ``model`` strictly; a mismatch or a non-finite
    parameter is named with ``path`` and ``fix``."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # same names, other shapes: another size of the architecture
        raise CheckpointError(
            f"{path} does not fit this model ({str(err).splitlines()[-1].strip()}); {fix}"
        ) from None
    if changed_only:  # only the towers may be left out, never a head the model expects
        missing = [k for k in missing if not k.startswith("model.")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            f"{fix}"
        )
    # A NaN or inf weight makes every probability NaN and every argmax class 0: predictions
    # printed as "nan" and an accuracy of 1/classes, with no error. Parameters are never
    # legitimately non-finite (buffers may be: -inf attention masks), so those are refused.
    for name, param in model.named_parameters():
        if name in state and param.is_floating_point() and not torch.isfinite(param).all():
            raise CheckpointError(
                f"{path} holds non-finite values (NaN or inf) in {name}; these weights cannot "
                "classify: use the weights of a run that finished, or retrain"
            )


def save_state(state: dict[str, Any], path: Path) -> None:
    _atomic(path, lambda tmp: _torch_save(state, tmp))


# A training checkpoint's fields and what each must be (flyp.train writes them): the weights
# travel in the same file as the state that goes with them.
CHECKPOINT_FIELDS: dict[str, tuple[type, ...]] = {
    "weights": (dict,),
    "optimizer": (dict,),
    "scheduler": (dict,),
    "rng": (dict,),
    "step": (int,),
    "best": (dict,),
    "validated": (int,),
    "train_seconds": (int, float),
    "images_seen": (int,),
    "settings": (dict,),
}
RNG_FIELDS = {"torch": torch.Tensor, "python": list, "numpy": list}


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint (``state.pt``), checked field by field: one that is not whole, or
    not flyp's, is named with its file and field in one line instead of a traceback at resume."""
    path = Path(path)
    state = load_state(path)
    if "weights" not in state and (path.parent / "last.safetensors").exists():
        raise CheckpointError(
            f"{path} was written by an older flyp that kept the weights apart, in "
            "last.safetensors: a kill between the two writes pairs one step's weights with "
            "another's optimizer, which cannot be told afterwards, so it is not resumed; "
            "start the run again in a new run directory"
        )

    def bad(field: str, problem: str) -> CheckpointError:
        return CheckpointError(
            f"{path}: '{field}' {problem}, so it is not a checkpoint flyp wrote; the run "
            "cannot be resumed: start it again in a new run directory"
        )

    for field, types in CHECKPOINT_FIELDS.items():
        if field not in state:
            raise bad(field, "is missing")
        value = state[field]
        if not isinstance(value, types) or isinstance(value, bool):
            kinds = " or ".join(t.__name__ for t in types)
            raise bad(field, f"is {_a(type(value).__name__)}, not {_a(kinds)}")
    if state["step"] < 0 or state["images_seen"] < 0 or state["validated"] < 0:
        raise bad("step", "or a counter is negative")
    for name, value in state["weights"].items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise bad("weights", f"holds {name!r}: {type(value).__name__}, not a tensor")
    for name, kind in RNG_FIELDS.items():
        if not isinstance(state["rng"].get(name), kind):
            raise bad(f"rng.{name}", f"is not {_a(kind.__name__)}")
    if not isinstance(state["best"].get("epoch"), int) or not isinstance(
        state["best"].get("val"), (int, float)
    ):
        raise bad("best", "lacks its epoch or validation score")
    for field in ("state", "param_groups"):
        if field not in state["optimizer"]:
            raise bad(f"optimizer.{field}", "is missing")
    return state


def load_state(path: Path) -> dict[str, Any]:
    """The resumable state, read without running code (``weights_only=True``)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} is not a flyp training state ({str(err).splitlines()[0]}); "
            f"the run cannot be resumed: start it again in a new run directory"
        ) from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(
            f"{path} is not a flyp training state (no step); "
            "the run cannot be resumed: start it again in a new run directory"
        )
    return state
