"""A recipe is the whole, typed description of one run: model, data, training, evaluation.

YAML files and ``--set section.key=value`` flags are two spellings of the same dataclasses;
both go through :func:`from_dict`, which refuses unknown keys and wrong types by name, then
:func:`validate`, which refuses bad choices and out-of-range numbers by name. Every entry point
(the CLI's subcommands, ``finetune``, ``compare``) loads recipes here, so a bad value is refused
before anything is built or written, and nothing downstream re-checks or silently defaults.

Each field declares its own rules beside it (:func:`setting`): its choices, its range, whether
it seeds a generator, and whether a resumed run may change it (``resume=True``). One validator
walks the fields; the checks that span several fields follow it in :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flyp.errors import RecipeError  # callers import it from here too

SEED_LIMIT = 2**32  # a seed feeds numpy's generator: 0 <= seed < 2**32
LOG_TO = ("tensorboard", "wandb")  # the trackers train.log_to may list
DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
PRECISIONS = ("auto", "fp32", "bf16")  # train/eval.precision; flyp.precision resolves them


def setting(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    at_least: float | None = None,
    above: float | None = None,
    at_most: float | None = None,
    between: tuple[float, float] | None = None,
    seed: bool = False,
    check: Callable[[Any, str], None] | None = None,
    resume: bool = False,
) -> Any:
    """A recipe field and its rules, checked by :func:`validate` on every value but None (None
    means "not set"): ``choices`` (or a function giving them, for tables that import torch),
    ``at_least``/``above`` a lower bound, ``at_most`` an upper one (where a larger value cannot
    be meant: it would only fail later, out of memory or time), ``between`` two bounds (both
    excluded), ``seed`` a
    generator's seed, ``check(value, key)`` anything else; ``resume``: a resumed or reused run
    may change it (paths, device, speed, checkpointing: nothing that changes its numbers)."""
    rules = {"choices": choices, "at_least": at_least, "above": above, "at_most": at_most}
    rules["between"] = between
    rules.update(seed=seed, check=check)
    rules = {k: v for k, v in rules.items() if v is not None and v is not False}  # 0 is a bound
    metadata = {"rules": rules, "resume": resume}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _methods() -> list[str]:
    from flyp.methods import METHODS  # here, not at the top: loading a recipe file stays free

    return list(METHODS)  # of torch (flyp --help, flyp data)


def _template_sets() -> list[str]:
    from flyp.data.templates import TEMPLATE_SETS

    return sorted(TEMPLATE_SETS)


def _check_name(name: str, key: str) -> None:
    if len(name) > MAX_NAME:
        raise RecipeError(
            f"{key}: {name[:20]!r}... is {len(name)} characters; a run folder is named after it "
            f"(runs/<name>-<method>-s<seed>): use at most {MAX_NAME}"
        )
    if name.strip() in ("", ".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        raise RecipeError(
            f"{key}: {name!r} cannot name a run folder (runs/<name>-<method>-s<seed>); use letters, "
            "digits, spaces, '-' or '_', with no '/', no control characters"
        )


def _once(what: str) -> Callable[[list, str], None]:
    """A list that may name each of its items once (``what`` names one item in the message)."""

    def check(items: list, key: str) -> None:
        repeated = sorted({item for item in items if items.count(item) > 1})
        if repeated:
            raise RecipeError(f"{key} lists '{repeated[0]}' twice; list each {what} once")

    return check


MAX_WORKERS = 1024  # loader processes: more than any machine's cores
MAX_NAME = 100  # characters of a recipe name: runs/<name>-<method>-s<seed> stays a file name


def _check_workers(value: int | str, key: str) -> None:
    if isinstance(value, str) and value != "auto":
        raise RecipeError(
            f"{key}: '{value}' is not a number of workers; use auto or a whole number >= 0"
        )
    if isinstance(value, int) and value < 0:
        raise RecipeError(f"{key}: {value} is out of range; it must be >= 0")
    if isinstance(value, int) and value > MAX_WORKERS:
        raise RecipeError(f"{key}: {value} is out of range; it must be <= {MAX_WORKERS}")


def _check_device_name(device: str, key: str) -> None:
    if not DEVICE.fullmatch(device):
        hint = _suggest(device.replace("gpu", "cuda"), ["auto", "cpu", "cuda", "mps"])
        raise RecipeError(
            f"{key}: '{device}' is not a device; use auto, cpu, cuda, cuda:N or mps{hint}"
        )


def _check_alphas(alphas: list[float], key: str) -> None:
    if not alphas:
        raise RecipeError(f"{key} is empty; give at least one alpha, e.g. [0, 0.5, 1]")
    for i, alpha in enumerate(alphas):
        if not 0 <= alpha <= 1:
            raise RecipeError(f"{key}[{i}]: {alpha} is out of range; it must be in [0, 1]")


@dataclass
class ModelConfig:
    # "default", "tiny", "open_clip:ViT-B-16:openai", "open_clip:ViT-B-16:/path.pt", "hf:/dir"
    spec: str = "default"
    image_size: int | None = setting(None, at_least=1, at_most=8192)  # None keeps the model's own resolution
    # None: trim text to the longest caption of each batch
    context_length: int | None = setting(None, at_least=1)


@dataclass
class DataConfig:
    benchmark: str = "pacs"
    root: str | None = setting(None, resume=True)  # None: the benchmark's default location
    id_domain: str = "photo"
    ood_domains: list[str] = setting(
        factory=lambda: ["art_painting", "cartoon", "sketch"], check=_once("domain")
    )
    val_fraction: float = setting(0.1, between=(0, 1))
    test_fraction: float = setting(0.2, between=(0, 1))
    split_seed: int = setting(0, seed=True)
    # stratified subsample of the ID train split (for quick runs)
    max_train: int | None = setting(None, at_least=1)
    max_eval: int | None = setting(None, at_least=1)  # stratified subsample of every evaluation set
    templates: str | None = setting(None, choices=_template_sets)  # None: the benchmark's own
    on_bad_image: str = setting("error", choices=("error", "skip"))
    # loader workers: "auto" (flyp.data.loader.auto_workers: this process's share of the cores)
    num_workers: int | str = setting("auto", check=_check_workers, resume=True)
    # memory for training images decoded once and reused (0: off)
    cache_gb: float = setting(2.0, at_least=0, at_most=100_000, resume=True)
    # Paper benchmarks (flyp.data.imagenet / wilds / transfer): folder of each set by name,
    # e.g. {imagenet-r: /data/imagenet-r}; a set not named here is looked for under data.root.
    roots: dict[str, str] = setting(factory=dict, resume=True)
    # few-shot: keep exactly k training images per class (paper builders)
    k_shot: int | None = setting(None, at_least=1)
    # Hugging Face datasets (benchmark hf) and WebDataset shards (wds): the columns holding the
    # image, the label and the domain (None: found, or the splits are the domains), and a file of
    # class names, one a line in label order (None: the ClassLabel, or classes.txt by the shards)
    image_column: str | None = None
    label_column: str | None = None
    domain_column: str | None = None
    classes_file: str | None = None
    # WebDataset shards or a Hugging Face dataset's data files (flyp.data.stream): train by
    # reading the ID domain's training shards / files in sequence, never indexed; whole shards or
    # files are ID validation and test. An epoch is data.train_samples samples (None: the
    # shards' counts in sizes.json beside them; a data file's row count in its own metadata),
    # shuffled in a buffer of data.shuffle_buffer samples per loader worker.
    stream: bool = False
    train_samples: int | None = setting(None, at_least=1)
    shuffle_buffer: int = setting(1000, at_least=1, at_most=10_000_000)


@dataclass
class TrainConfig:
    method: str = setting("flyp", choices=_methods)
    epochs: int = setting(5, at_least=1, at_most=100_000)
    batch_size: int = setting(32, at_least=1, at_most=10_000_000)
    lr: float = setting(1e-4, at_least=0)
    weight_decay: float = setting(0.1, at_least=0)
    warmup_steps: int = setting(20, at_least=0, at_most=1_000_000_000)
    grad_clip: float | None = setting(1.0, above=0)
    seed: int = setting(0, seed=True)
    # "frozen": running statistics kept, affine trained; "train": updated
    batchnorm: str = setting("frozen", choices=("frozen", "train"))
    logit_scale_lr: float | None = setting(None, at_least=0)  # None: same as lr
    init_logit_scale: float | None = setting(None, above=0)  # None: keep the model's own
    max_logit_scale: float = setting(100.0, above=0)
    l2sp_weight: float = setting(0.1, at_least=0)  # lambda of the l2sp method
    lipsum_weight: float = setting(1.0, at_least=0)  # lambda of lipsum-ft's regulariser (the paper's 1.0)
    lipsum_texts: int = setting(80, at_least=1)  # M, random texts a step for lipsum-ft (the paper's 80)
    # "tokens": 8 random token ids (the official code); "words"
    lipsum_text: str = setting("tokens", choices=("tokens", "words"))
    # "none", "mask" or "soft": same-class captions in a FLYP batch
    collisions: str = setting("none", choices=("none", "mask", "soft"))
    # "auto" (the model's pretraining loss), "clip" or "siglip"
    contrastive_loss: str = setting("auto", choices=("auto", "clip", "siglip"))
    # also save resumable state every N steps (0: at epoch ends only)
    checkpoint_every: int = setting(0, at_least=0, resume=True)
    # read the loss back from the device (log.jsonl, the non-finite check) every N steps, and
    # at epoch ends and checkpoints: between these a step never waits for the device
    log_every: int = setting(20, at_least=1, resume=True)
    # end the process after N steps, as if killed (tests)
    stop_after_steps: int | None = setting(None, at_least=1, resume=True)
    # epoch selection: "val" (ID validation accuracy) or "last"
    select_on: str = setting("val", choices=("val", "last"))
    # Scale and speed (docs/scale_and_speed.md). batch_size is the global batch over processes.
    # "auto": this process's GPU if any, else CPU; or "cpu", "cuda", "cuda:1"
    device: str = setting("auto", check=_check_device_name, resume=True)
    # torchrun: how long a rank may wait in a collective (e.g. while rank 0 evaluates) before
    # the process group gives up (NCCL's watchdog); flyp.distributed.init_distributed
    dist_timeout_s: float = setting(1800.0, above=0, resume=True)
    # "auto": bf16 where the hardware has it natively, else fp32 (flyp.precision); "fp32" or
    # "bf16" (autocast of the towers; weights, optimizer, logits and losses stay fp32)
    precision: str = setting("auto", choices=PRECISIONS)
    # gradient cache: embed/backprop in chunks of this many
    micro_batch: int | None = setting(None, at_least=1, resume=True)
    compile: bool = setting(False, resume=True)  # torch.compile the towers (first steps pay the compilation)
    fused_optimizer: bool = True  # AdamW in one fused kernel (false: torch's per-tensor loop)
    unique_captions: bool = True  # FLYP: encode each distinct caption of a batch once
    # Experiment trackers that also get log.jsonl's scalars (flyp.tracking): tensorboard, wandb
    log_to: list[str] = setting(factory=list, choices=LOG_TO, check=_once("tracker"))


@dataclass
class EvalConfig:
    batch_size: int = setting(128, at_least=1, resume=True)
    every_epoch: bool = True  # evaluate on ID validation after each epoch (model selection)
    wise_alphas: list[float] = setting(
        factory=lambda: [round(0.1 * i, 1) for i in range(11)], check=_check_alphas
    )
    # keep each run's WiSE-FT model at the alpha chosen on ID validation (RUN/wise-model, a
    # full model's size per run); off: the sweep's numbers only (flyp wise RUN --keep ALPHA)
    wise_keep: bool = False
    # memory for evaluation images decoded once and reused (0: off)
    cache_gb: float = setting(4.0, at_least=0, at_most=100_000, resume=True)
    # as train.precision: autocast of the image tower (logits fp32)
    precision: str = setting("auto", choices=PRECISIONS)


@dataclass
class Recipe:
    name: str = setting("run", check=_check_name)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _keys(node: Any = Recipe, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """Every recipe field as ("section.key", field), in the order the recipe declares them."""
    hints = typing.get_type_hints(node)
    for f in dataclasses.fields(node):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from _keys(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


# Every field in recipe order; what a resumed (or reused) run may change: where the data is,
# the device, speed and checkpointing (the fields declared resume=True); any other key would make the rest of the
# run differ from its start.
FIELDS = tuple(_keys())
RESUME_SETTABLE = tuple(key for key, f in FIELDS if f.metadata.get("resume"))


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
        try:
            return float(value)
        except OverflowError:
            raise RecipeError(f"{where}: {str(value)[:12]}... is too large for a number") from None
    if hint in (int, float) and isinstance(value, str) and _number_text(value) is not None:
        if not math.isfinite(_number_text(value)):
            raise RecipeError(f"{where}: {value} is not a finite number")
        raise RecipeError(
            f"{where}: expected {hint.__name__}, got the text '{value}' (quoted, or a YAML 1.1 "
            "form such as 1_000 or 1:30); write the number plainly, e.g. 1000 or 1e-5"
        )
    if hint is bool and not isinstance(value, bool):
        raise RecipeError(f"{where}: expected true or false, got {value!r}")
    if hint in (int, float, str) and (not isinstance(value, hint) or isinstance(value, bool)):
        raise RecipeError(
            f"{where}: expected {hint.__name__}, got {value!r} ({type(value).__name__})"
        )
    return value


def _number_text(text: str) -> float | None:
    """The number Python reads in ``text`` (``nan``, ``1_000``, ``"1e3"``), or None."""
    try:
        return float(text)
    except ValueError:
        return None


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    if not isinstance(raw, dict):
        raise RecipeError(f"{where or 'recipe'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise RecipeError(
                f"{where or 'recipe'}: the key {key!r} ({type(key).__name__}) is not a name; "
                "recipe keys are words (see recipes/ or flyp --help)"
            )
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise RecipeError(f"unknown recipe key '{_shown(path)}'{_suggest(key, names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise RecipeError(
                    f"{path}: expected a mapping of settings (key: value lines), got "
                    f"{yaml.safe_dump(value).splitlines()[0][:40] if value is not None else 'null'}; "
                    f"write the {path} settings to change, or leave {path} out for its defaults"
                )
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


def from_dict(raw: dict[str, Any]) -> Recipe:
    return validate(_build(Recipe, raw, ""))


def check_seed(value: int, where: str) -> None:
    """Refuse a seed numpy's generator cannot take (negative, or 2**32 and above)."""
    if not 0 <= value < SEED_LIMIT:
        raise RecipeError(
            f"{where}: {value} is out of range; a seed must be between 0 and {SEED_LIMIT - 1}"
        )


def _get(recipe: Recipe, key: str) -> Any:
    node = recipe
    for part in key.split("."):
        node = getattr(node, part)
    return node


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


def _check(key: str, value: Any, rules: dict[str, Any]) -> None:
    """One field's value against the rules :func:`setting` declared beside it."""
    if "choices" in rules:  # of the value, or of each item of a list
        choices = rules["choices"]() if callable(rules["choices"]) else rules["choices"]
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            _choice(key if i is None else f"{key}[{i}]", item, choices)
    if "at_least" in rules and value < rules["at_least"]:
        raise RecipeError(f"{key}: {value} is out of range; it must be >= {rules['at_least']}")
    if "above" in rules and value <= rules["above"]:
        raise RecipeError(f"{key}: {value} is out of range; it must be > {rules['above']}")
    if "at_most" in rules and value > rules["at_most"]:
        shown = f"{value:g}" if isinstance(value, float) else value
        raise RecipeError(f"{key}: {shown} is out of range; it must be <= {rules['at_most']}")
    if "between" in rules:
        low, high = rules["between"]
        if not low < value < high:
            raise RecipeError(f"{key}: {value} is out of range; it must be between {low} and {high}")
    if rules.get("seed"):
        check_seed(value, key)
    if "check" in rules:
        rules["check"](value, key)


def validate(recipe: Recipe) -> Recipe:
    """Refuse choices, ranges and cross-field combinations that cannot run, naming the key:
    each field by its own rules, in the order the recipe declares them, then the checks that
    span fields."""
    _check_finite(recipe, "")
    for key, f in FIELDS:
        value = _get(recipe, key)
        if value is not None and f.metadata.get("rules"):
            _check(key, value, f.metadata["rules"])
    data = recipe.data
    if data.val_fraction + data.test_fraction >= 1:
        raise RecipeError(
            f"data.val_fraction + data.test_fraction = {data.val_fraction + data.test_fraction:g} "
            "leaves no training images; their sum must be below 1"
        )
    if data.id_domain in data.ood_domains:
        raise RecipeError(
            f"data.ood_domains holds the ID domain '{data.id_domain}' (data.id_domain); "
            "its test split is evaluated already, remove it from data.ood_domains"
        )
    check_stream(data, recipe.train.method)
    return recipe


# Methods that need every training image at once (the probe's features): no stream gives them.
NEEDS_INDEXED_TRAIN = ("lp", "lpft")


def check_stream(data: DataConfig, method: str) -> None:
    """data.stream reads WebDataset shards or a Hugging Face dataset's data files in sequence:
    refused with what needs the training set indexed (a subsample of it, k-shot, the probe's
    features of every image)."""
    if not data.stream:
        return
    if data.benchmark not in ("wds", "hf"):
        raise RecipeError(
            f"data.stream streams WebDataset shards or a Hugging Face dataset's files, and "
            f"data.benchmark is '{data.benchmark}'; point --data at .tar shards or Parquet/Arrow "
            "files (data.benchmark: wds or hf), or set data.stream: false"
        )
    if data.benchmark == "hf" and data.domain_column is not None:
        raise RecipeError(
            f"data.stream reads whole data files, and with data.domain_column="
            f"'{data.domain_column}' a file mixes domains; write each domain as its own split "
            "(the Hub's data/<split>-*.parquet), or set data.stream: false"
        )
    for key in ("max_train", "k_shot"):
        if getattr(data, key) is not None:
            raise RecipeError(
                f"data.{key}={getattr(data, key)} subsamples an indexed training set, and "
                f"data.stream never indexes it; set data.{key}=null (--quick sets "
                "data.max_train) and size an epoch with data.train_samples, or set "
                "data.stream: false"
            )
    if method in NEEDS_INDEXED_TRAIN:
        raise RecipeError(
            f"method {method} fits its probe on the features of every training image, and "
            f"data.stream never indexes them; leave {method} out (train.method, --methods), "
            "or set data.stream: false"
        )


def _shown(text: str) -> str:
    """``text`` for a one-line message: as typed, or escaped where it holds control
    characters (a newline would split the message)."""
    return text if text.isprintable() else repr(text)[1:-1]


def _set(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise RecipeError(
            f"--set expects key=value, got '{_shown(assignment)}' (for example train.lr=1e-5)"
        )
    key, text = assignment.split("=", 1)
    try:
        value = safe_yaml(text) if text else None
    except yaml.YAMLError as err:
        raise RecipeError(
            f"--set {_shown(assignment)}: the value is not valid YAML "
            f"({_shown(_problem(err))}); quote it, e.g. --set 'data.ood_domains=[art, sketch]'"
        ) from None
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: '{part}' is not a section")
    node[parts[-1]] = value


def _problem(err: yaml.YAMLError) -> str:
    return str(getattr(err, "problem", None) or err).splitlines()[0]


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases (``*name``): nested aliases expand exponentially
    when the document is walked ("billion laughs"), and a recipe has no use for them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} is not allowed", event.start_mark
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice in one mapping is refused: PyYAML would keep the last silently, so
        a recipe could read as one learning rate and train with another."""
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # PyYAML's own check refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Numbers as YAML 1.2 reads them (PyYAML reads YAML 1.1: 010 is 8, 1:30 is 90, 1e-5 a string):
# decimal integers (leading zeros too), 0o and 0x integers, decimal floats with or without a dot
# or exponent, .inf and .nan. What YAML 1.1 alone reads as a number (1:30, 1_000, 0b101) stays a
# string, and a number field refuses it.
_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_INT_12 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT_12 = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
    r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)


class _RecipeLoader(_NoAliasLoader):
    """The recipe's YAML: no aliases, no repeated keys, numbers as YAML 1.2."""

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node)
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)

    def construct_yaml_float(self, node):
        text = self.construct_scalar(node).lower().replace(".inf", "inf").replace(".nan", "nan")
        return float(text)


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(_INT, _INT_12, list("-+0123456789"))
_RecipeLoader.add_implicit_resolver(_FLOAT, _FLOAT_12, list("-+0123456789."))
_RecipeLoader.add_constructor(_INT, _RecipeLoader.construct_yaml_int)
_RecipeLoader.add_constructor(_FLOAT, _RecipeLoader.construct_yaml_float)
MAX_DEPTH = 50  # nesting a recipe can mean (its deepest setting is two levels down)


def _depth(node: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply ``node`` nests (stops counting past ``limit``)."""
    depth, level = 0, [node]
    while level and depth <= limit:
        depth += 1
        level = [
            child
            for item in level
            if isinstance(item, (dict, list))
            for child in (item.values() if isinstance(item, dict) else item)
        ]
    return depth


def safe_yaml(text: str) -> Any:
    """The YAML of a recipe or a ``--set`` value: plain values, no aliases, no repeated keys,
    numbers as YAML 1.2 (see _RecipeLoader); nesting deeper than a recipe can mean is refused."""
    too_deep = RecipeError(
        f"the YAML is nested too deeply (over {MAX_DEPTH} levels); a recipe is sections of "
        "settings (see recipes/)"
    )
    try:
        value = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise too_deep from None
    if _depth(value) > MAX_DEPTH:
        raise too_deep
    return value


def _read_yaml(path: Path) -> Any:
    """The YAML in ``path``; a syntax error names the file and its line (1-based)."""
    try:
        return safe_yaml(path.read_text(encoding="utf-8"))  # YAML is UTF-8, whatever the locale
    except UnicodeDecodeError:
        raise RecipeError(f"{path} is not a text file; a recipe is YAML (see recipes/)") from None
    except yaml.composer.ComposerError as err:
        if "alias" not in str(err.problem):
            where = _where(path, err)
            raise RecipeError(f"{where}: {_problem(err)}; fix the YAML syntax") from None
        raise RecipeError(
            f"{_where(path, err)}: {_problem(err)} in a recipe (aliases can expand without "
            "bound); write the value out in full"
        ) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{_where(path, err)}: {_problem(err)}; fix the YAML syntax") from None


def _where(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    return f"{path} line {mark.line + 1}" if mark is not None else str(path)


def load_recipe(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (or start from defaults) and apply ``key=value`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise RecipeError(f"recipe file {path} is a folder; pass a YAML file (see recipes/)")
        if not path.exists():
            raise RecipeError(f"recipe file {path} does not exist (see recipes/ for examples)")
        if not path.is_file():
            raise RecipeError(
                f"recipe file {path} is not a regular file (a device, pipe or socket); "
                "pass a YAML file (see recipes/)"
            )
        raw = _read_yaml(path)
        if raw is None or raw == {}:
            raise RecipeError(
                f"{path} holds no settings (it is empty, or only comments or null); write the "
                "sections to change (see recipes/), or leave the recipe out to run the defaults"
            )
        if not isinstance(raw, dict):
            raise RecipeError(
                f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}"
            )
        if "name" not in raw:
            try:
                _check_name(path.stem, "name")
            except RecipeError:
                raise RecipeError(
                    f"{path}: its file name gives no run name ({path.stem!r}); add name: "
                    "my-run to the recipe, or rename the file"
                ) from None
            raw["name"] = path.stem
    for assignment in overrides:
        _set(raw, assignment)
    return from_dict(raw)


def with_overrides(recipe: Recipe, overrides: typing.Sequence[str]) -> Recipe:
    """``recipe`` with ``key=value`` overrides, typed and validated as ``--set`` is."""
    raw = recipe.to_dict()
    for assignment in overrides:
        _set(raw, assignment)
    return from_dict(raw)


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


# Keys that do not change a run's numbers: its label, and the WiSE-FT alphas (evaluated after
# the run, into wise.json, which records its own).
NOT_RUN_SETTINGS = ("name", "eval.wise_alphas", "eval.wise_keep", "train.log_to")  # change no number of a run
# The version of what changes a run's numbers beyond its settings: model construction, image
# decoding, split allocation, the step (caption deduplication), the metrics. Raised with any such
# change, it is stored with every run's settings, so that a run made by a flyp that computed
# other numbers is not reused or resumed as if it were today's.
NUMBERS_VERSION = 2
NUMBERS_KEY = "flyp.numbers"


def run_settings(recipe: Recipe) -> dict[str, Any]:
    """What decides a run's numbers, as ``{"section.key": value}``: the resolved recipe less
    what a resumed run may change (RESUME_SETTABLE) and NOT_RUN_SETTINGS. A run stores it with
    its state and its metrics, so a rerun or a resume can tell whether it is the same run.

    The precisions are the ones that compute, resolved on this machine (``auto`` is bf16 on
    one and fp32 on another): a resume or a reuse elsewhere is then no longer the same run."""
    from flyp.hardware import resolved_settings  # torch: only when a run's settings are made

    settings = {
        k: v
        for k, v in flat(recipe.to_dict()).items()
        if not k.startswith(RESUME_SETTABLE) and k not in NOT_RUN_SETTINGS
    }
    t = recipe.train
    settings |= resolved_settings(t.precision, recipe.eval.precision, t.device)
    return {**settings, NUMBERS_KEY: NUMBERS_VERSION}


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of :func:`run_settings`: equal for the same run, whatever the key order."""
    import hashlib
    import json

    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(
    saved: dict[str, Any], settings: dict[str, Any], ignore: tuple = (), only: tuple = ("",)
) -> str:
    """How ``saved`` run settings differ from ``settings``, as ``key old -> new, ...``; empty
    when they agree. Keys in ``ignore`` and NOT_RUN_SETTINGS are left out, and keys not starting
    with one of ``only``. A key that one side lacks differs (shown as "(none)"): a run made by a
    flyp that had no such key is not taken as made with today's default; ``flyp.numbers`` says
    which flyp's numbers a run holds (NUMBERS_VERSION)."""
    old, new = dict(saved), dict(settings)
    missing = "(none)"
    keys = [
        k
        for k in {**old, **new}
        if k not in ignore
        and k not in NOT_RUN_SETTINGS
        and k.startswith(only)
        and old.get(k, missing) != new.get(k, missing)
    ]
    if not only[0] and NUMBERS_KEY in keys:  # the version first: it explains the rest
        keys.remove(NUMBERS_KEY)
        keys.insert(0, NUMBERS_KEY)

    def shown(side: dict[str, Any], k: str) -> str:
        return repr(side[k]) if k in side else missing

    text = ", ".join(f"{k} {shown(old, k)} -> {shown(new, k)}" for k in keys[:4])
    return text + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")


def recipe_differences(saved: dict[str, Any], recipe: Recipe, ignore: tuple = ()) -> str:
    """How ``recipe`` differs from the settings a run stored (its metrics.json's), as
    :func:`differences` says it: whether the recipe still describes that run. A precision the
    recipe asks as ``auto`` is whatever the run resolved it to (it resolves per machine: this
    one may differ), and the flyp that made the run (NUMBERS_KEY) is no part of the recipe."""
    settings = run_settings(recipe)
    for key, asked in (("train.precision", recipe.train.precision),
                       ("eval.precision", recipe.eval.precision)):  # fmt: skip
        if asked == "auto":
            settings.pop(key)
            if key in saved:
                settings[key] = saved[key]
    return differences(saved, settings, ignore=(*ignore, NUMBERS_KEY))


def check_device(device: str, where: str = "train.device") -> None:
    """Refuse a device this machine does not have (``cuda`` with no GPU, ``cuda:3`` with two,
    ``mps`` off a Mac), or a name that is none, naming the valid forms and what is here."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    here = ["cpu", *(f"cuda:{i}" for i in range(count)), *(["mps"] if mps else [])]
    forms = "use auto, cpu, cuda, cuda:N or mps"
    if not DEVICE.fullmatch(device):
        hint = _suggest(device.replace("gpu", "cuda"), ["auto", "cpu", "cuda", "mps"])
        raise RecipeError(
            f"{where}: '{device}' is not a device; {forms}{hint} (here: {', '.join(here)})"
        )
    kind, _, index = device.partition(":")
    missing = (kind == "cuda" and (count == 0 or (index and int(index) >= count))) or (
        kind == "mps" and not mps
    )
    if missing:
        raise RecipeError(
            f"{where}: '{device}' is not available on this machine (here: {', '.join(here)}); "
            "use auto (a GPU when there is one) or one of those"
        )


def save_recipe(recipe: Recipe, path: Path) -> None:
    from flyp.checkpoint import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
