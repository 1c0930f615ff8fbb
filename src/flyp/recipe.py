"""A recipe is the whole, typed description of one run: model, data, training, evaluation.

YAML files and ``--set section.key=value`` flags are two spellings of the same dataclasses;
both go through :func:`from_dict`, which refuses unknown keys and wrong types by name, then
:func:`validate`, which refuses bad choices and out-of-range numbers by name. Every entry point
(the CLI's subcommands, ``finetune``, ``compare``) loads recipes here, so a bad value is refused
before anything is built or written, and nothing downstream re-checks or silently defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be run, with the key at fault and the fix in the message."""


@dataclass
class ModelConfig:
    spec: str = "default"  # "default", "tiny", "open_clip:ViT-B-16:openai", "open_clip:ViT-B-16:/path.pt", "hf:/dir"
    image_size: int | None = None  # None keeps the model's own resolution
    context_length: int | None = None  # None: trim text to the longest caption of each batch


@dataclass
class DataConfig:
    benchmark: str = "pacs"
    root: str | None = None  # None: the benchmark's default location
    id_domain: str = "photo"
    ood_domains: list[str] = field(default_factory=lambda: ["art_painting", "cartoon", "sketch"])
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    max_train: int | None = None  # stratified subsample of the ID train split (for quick runs)
    max_eval: int | None = None  # stratified subsample of every evaluation set
    templates: str | None = None  # template set name; None: the benchmark's own
    on_bad_image: str = "error"  # "error" or "skip"
    num_workers: int = 0
    cache_gb: float = 2.0  # memory for training images decoded once and reused (0: off)
    # Paper benchmarks (flyp.data.imagenet / wilds / transfer): folder of each set by name,
    # e.g. {imagenet-r: /data/imagenet-r}; a set not named here is looked for under data.root.
    roots: dict[str, str] = field(default_factory=dict)
    k_shot: int | None = None  # few-shot: keep exactly k training images per class (paper builders)


@dataclass
class TrainConfig:
    method: str = "flyp"
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 20
    grad_clip: float | None = 1.0
    seed: int = 0
    batchnorm: str = "frozen"  # "frozen": running statistics kept, affine trained; "train": updated
    logit_scale_lr: float | None = None  # None: same as lr
    init_logit_scale: float | None = None  # None: keep the model's own
    max_logit_scale: float = 100.0
    l2sp_weight: float = 0.1  # lambda of the l2sp method
    lipsum_weight: float = 1.0  # lambda of lipsum-ft's regulariser (the paper's 1.0)
    lipsum_texts: int = 80  # M, random texts a step for lipsum-ft (the paper's 80)
    collisions: str = "none"  # "none", "mask" or "soft": same-class captions in a FLYP batch
    contrastive_loss: str = "auto"  # "auto" (the model's pretraining loss), "clip" or "siglip"
    checkpoint_every: int = 0  # also save resumable state every N steps (0: at epoch ends only)
    stop_after_steps: int | None = None  # end the process after N steps, as if killed (tests)
    select_on: str = "val"  # epoch selection: "val" (ID validation accuracy) or "last"
    # Scale and speed (docs/scale_and_speed.md). batch_size is the global batch over processes.
    device: str = "auto"  # "auto": this process's GPU if any, else CPU; or "cpu", "cuda", "cuda:1"
    precision: str = "fp32"  # "fp32" or "bf16" (autocast of the towers; weights stay fp32)
    micro_batch: int | None = None  # gradient cache: embed/backprop in chunks of this many
    compile: bool = False  # torch.compile the towers (first steps pay the compilation)
    fused_optimizer: bool = True  # AdamW in one fused kernel (false: torch's per-tensor loop)
    unique_captions: bool = True  # FLYP: encode each distinct caption of a batch once
    # Experiment trackers that also get log.jsonl's scalars (flyp.tracking): tensorboard, wandb
    log_to: list[str] = field(default_factory=list)


@dataclass
class EvalConfig:
    batch_size: int = 128
    every_epoch: bool = True  # evaluate on ID validation after each epoch (model selection)
    wise_alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    cache_gb: float = 4.0  # memory for evaluation images decoded once and reused (0: off)
    precision: str = "fp32"  # "fp32" or "bf16": autocast of the image tower (logits stay fp32)


@dataclass
class Recipe:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _suggest(key: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint, allowing int where float is expected."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as err:
                errors.append(str(err))
        raise RecipeError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {value!r}")
        return {
            _coerce(k, key_hint, where): _coerce(v, value_hint, f"{where}.{k}")
            for k, v in value.items()
        }
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool):
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise RecipeError(
            f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise RecipeError(f"unknown recipe key '{path}'{_suggest(key, names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Recipe:
    return validate(_build(Recipe, raw, ""))


# The allowed values of each choice key; train.method and train.device are checked apart.
CHOICES: dict[str, tuple[str, ...]] = {
    "train.batchnorm": ("frozen", "train"),
    "train.select_on": ("val", "last"),
    "train.precision": ("fp32", "bf16"),
    "eval.precision": ("fp32", "bf16"),
    "train.collisions": ("none", "mask", "soft"),
    "train.contrastive_loss": ("auto", "clip", "siglip"),
    "data.on_bad_image": ("error", "skip"),
}
LOG_TO = ("tensorboard", "wandb")  # the trackers train.log_to may list
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
# Lower bounds of the numeric keys; a None value means "not set" and is not checked.
AT_LEAST: dict[str, tuple[float, str]] = {
    "model.image_size": (1, ">= 1"),
    "model.context_length": (1, ">= 1"),
    "data.max_train": (1, ">= 1"),
    "data.max_eval": (1, ">= 1"),
    "data.k_shot": (1, ">= 1"),
    "data.num_workers": (0, ">= 0"),
    "data.cache_gb": (0, ">= 0"),
    "train.epochs": (1, ">= 1"),
    "train.batch_size": (1, ">= 1"),
    "train.micro_batch": (1, ">= 1"),
    "train.stop_after_steps": (1, ">= 1"),
    "train.lr": (0, ">= 0"),
    "train.weight_decay": (0, ">= 0"),
    "train.logit_scale_lr": (0, ">= 0"),
    "train.l2sp_weight": (0, ">= 0"),
    "train.lipsum_weight": (0, ">= 0"),
    "train.lipsum_texts": (1, ">= 1"),
    "train.warmup_steps": (0, ">= 0"),
    "train.checkpoint_every": (0, ">= 0"),
    "eval.batch_size": (1, ">= 1"),
    "eval.cache_gb": (0, ">= 0"),
}
POSITIVE = ("train.grad_clip", "train.max_logit_scale", "train.init_logit_scale")


def _get(recipe: Recipe, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(recipe, section), name)


def _check_finite(node: Any, where: str) -> None:
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            _check_finite(getattr(node, f.name), f"{where}.{f.name}" if where else f.name)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_finite(v, f"{where}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise RecipeError(f"{where}: {node} is not a finite number; give a plain number")


def _choice(key: str, value: str, allowed: typing.Sequence[str]) -> None:
    if value not in allowed:
        raise RecipeError(
            f"{key}: '{value}' is not one of {', '.join(allowed)}{_suggest(value, allowed)}"
        )


def validate(recipe: Recipe) -> Recipe:
    """Refuse choices, ranges and cross-field combinations that cannot run, naming the key."""
    from flyp.methods import METHODS  # flyp.methods imports this module

    _check_finite(recipe, "")
    for key, allowed in CHOICES.items():
        _choice(key, _get(recipe, key), allowed)
    _choice("train.method", recipe.train.method, list(METHODS))
    device = recipe.train.device
    if not DEVICE.fullmatch(device):
        hint = _suggest(device.replace("gpu", "cuda"), ["auto", "cpu", "cuda", "mps"])
        raise RecipeError(
            f"train.device: '{device}' is not a device; use auto, cpu, cuda, cuda:N or mps{hint}"
        )
    for i, tracker in enumerate(recipe.train.log_to):
        _choice(f"train.log_to[{i}]", tracker, LOG_TO)
        if recipe.train.log_to.count(tracker) > 1:
            raise RecipeError(f"train.log_to lists '{tracker}' twice; list each tracker once")
    for key, (low, text) in AT_LEAST.items():
        value = _get(recipe, key)
        if value is not None and value < low:
            raise RecipeError(f"{key}: {value} is out of range; it must be {text}")
    for key in POSITIVE:
        value = _get(recipe, key)
        if value is not None and value <= 0:
            raise RecipeError(f"{key}: {value} is out of range; it must be > 0")
    data = recipe.data
    for key in ("val_fraction", "test_fraction"):
        value = getattr(data, key)
        if not 0 < value < 1:
            raise RecipeError(f"data.{key}: {value} is out of range; it must be between 0 and 1")
    if data.val_fraction + data.test_fraction >= 1:
        raise RecipeError(
            f"data.val_fraction + data.test_fraction = {data.val_fraction + data.test_fraction:g} "
            "leaves no training images; their sum must be below 1"
        )
    repeated = sorted({d for d in data.ood_domains if data.ood_domains.count(d) > 1})
    if repeated:
        raise RecipeError(f"data.ood_domains lists '{repeated[0]}' twice; list each domain once")
    if data.id_domain in data.ood_domains:
        raise RecipeError(
            f"data.ood_domains holds the ID domain '{data.id_domain}' (data.id_domain); "
            "its test split is evaluated already, remove it from data.ood_domains"
        )
    alphas = recipe.eval.wise_alphas
    if not alphas:
        raise RecipeError("eval.wise_alphas is empty; give at least one alpha, e.g. [0, 0.5, 1]")
    for i, alpha in enumerate(alphas):
        if not 0 <= alpha <= 1:
            raise RecipeError(
                f"eval.wise_alphas[{i}]: {alpha} is out of range; it must be in [0, 1]"
            )
    return recipe


def _set(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise RecipeError(
            f"--set expects key=value, got '{assignment}' (for example train.lr=1e-5)"
        )
    key, text = assignment.split("=", 1)
    try:
        value = yaml.safe_load(text) if text else None
    except yaml.YAMLError as err:
        raise RecipeError(
            f"--set {assignment}: the value is not valid YAML ({_problem(err)}); "
            "quote it, e.g. --set 'data.ood_domains=[art, sketch]'"
        ) from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads "1e-5" as a string
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _fix_numbers(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_numbers(v) for v in node]
    if isinstance(node, str) and _looks_numeric(node) and any(c in node for c in "eE"):
        return float(node)
    return node


def _problem(err: yaml.YAMLError) -> str:
    return str(getattr(err, "problem", None) or err).splitlines()[0]


def _read_yaml(path: Path) -> Any:
    """The YAML in ``path``; a syntax error names the file and its line (1-based)."""
    try:
        return yaml.safe_load(path.read_text())
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text file; a recipe is YAML (see recipes/)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
        raise RecipeError(f"{where}: {_problem(err)}; fix the YAML syntax") from None


def load_recipe(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (or start from defaults) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise RecipeError(f"recipe file {path} is a folder; pass a YAML file (see recipes/)")
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist (see recipes/ for examples)")
        raw = _fix_numbers(_read_yaml(path)) or {}
        if not isinstance(raw, dict):
            raise RecipeError(
                f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}"
            )
        raw.setdefault("name", path.stem)
    for assignment in overrides:
        _set(raw, assignment)
    return from_dict(raw)


def with_overrides(recipe: Recipe, overrides: typing.Sequence[str]) -> Recipe:
    """``recipe`` with ``key=value`` overrides, typed and validated as ``--set`` is."""
    raw = recipe.to_dict()
    for assignment in overrides:
        _set(raw, assignment)
    return from_dict(raw)


# What a resumed (or reused) run may change: where the data is, the device, speed and
# checkpointing; any other key would make the rest of the run differ from its start.
RESUME_SETTABLE = (
    "data.root",
    "data.roots",
    "data.num_workers",
    "data.cache_gb",
    "train.device",
    "train.micro_batch",
    "train.compile",
    "train.checkpoint_every",
    "train.stop_after_steps",
    "eval.batch_size",
    "eval.cache_gb",
)


def flat(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A recipe dict as ``{"section.key": value}`` (data.roots stays one value)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path != "data.roots":
            out.update(flat(value, path + "."))
        else:
            out[path] = value
    return out


def changes(before: Recipe, after: Recipe) -> tuple[list[str], list[str]]:
    """The keys whose values differ, and those of them a resumed run may not change."""
    old, new = flat(before.to_dict()), flat(after.to_dict())
    changed = [k for k in new if new[k] != old.get(k)]
    return changed, [k for k in changed if not k.startswith(RESUME_SETTABLE)]


def save_recipe(recipe: Recipe, path: Path) -> None:
    from flyp.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
