"""Use what a run trained: rebuild its classifier from the weights file alone, and classify images.

A finished run's ``model.safetensors`` carries in its header everything needed to rebuild the
classifier without the recipe or the dataset (:mod:`flyp.metadata`). ``"tensors": "changed"``
marks a run that trained nothing (zeroshot, lp): the file holds only what differs from the
pretrained model (a linear head, the temperature), and the towers are rebuilt from
``model_spec``.

    clf = flyp.load_classifier("runs/pacs-flyp-s0")
    clf.predict(["dog.jpg"])                  # [[("dog", 0.91), ("horse", 0.05), ...]]
    clf.with_classes(["cat", "car"]).predict(images)
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from flyp.checkpoint import CheckpointError, load_weights, read_metadata
from flyp.data.folders import (
    IMAGE_SUFFIXES,
    DataError,
    decode_rgb,
    load_rgb,
    name_key,
    nfc,
    read_text,
    to_rgb,
)
from flyp.data.templates import check_templates
from flyp.metadata import FORMAT, check_metadata, metadata_from_run
from flyp.methods import Classifier
from flyp.models import ModelBundle, load_model
from flyp.models.base import keep_freed_memory, tune_cpu_bf16
from flyp.precision import PRECISIONS, Precision, autocast, configure_device, resolve

ImageInput = str | Path | Image.Image


def _check_names(names: Sequence[str]) -> list[str]:
    names = [nfc(n.strip()) for n in names]  # as class folder names are read
    if len(names) < 2 or any(not n for n in names):
        raise ValueError(f"give at least two non-empty class names, got {names}")
    keys = [name_key(n) for n in names]  # 'Dog' and 'dog' would be one caption twice
    twice = [n for n, key in zip(names, keys, strict=True) if keys.count(key) > 1]
    if twice:
        raise ValueError(
            f"class names {', '.join(map(repr, twice))} are one class given twice (they differ "
            "at most in case, spaces or underscores); list each class once"
        )
    return names


def same_text_pair(
    tokenizer: Any, names: Sequence[str], templates: Sequence[str]
) -> tuple[str, str] | None:
    """Two class names the text tower cannot tell apart, or None: their captions are the same
    token ids under every template (a tokenizer that lowercases makes "Cat" and "cat" one
    class; one that truncates to its context length makes long names that differ only at the
    end one class). A zero-shot head would give each of them half the probability."""
    rows = [tokenizer([t.format(n) for t in templates]) for n in names]
    seen: dict[bytes, str] = {}
    for name, tokens in zip(names, rows, strict=True):
        key = tokens.cpu().numpy().tobytes() + bytes(str(tuple(tokens.shape)), "ascii")
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None


def _check_distinct(tokenizer: Any, names: Sequence[str], templates: Sequence[str]) -> None:
    pair = same_text_pair(tokenizer, names, templates)
    if pair:
        raise ValueError(
            f"class names {pair[0]!r} and {pair[1]!r} are the same text to this model (equal "
            "token ids after its tokenizer's lowercasing and truncation), so it cannot tell them "
            "apart; drop one or name them differently"
        )


@dataclass
class FlypClassifier:
    """A trained classifier with its tokenizer and eval transform: what ``load_classifier``
    returns. ``predict`` gives class names and probabilities (softmax over the logits)."""

    classifier: Classifier
    bundle: ModelBundle
    class_names: list[str]
    templates: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)
    # The precision of the image tower, as the run's evaluation resolved it (load_classifier).
    precision: Precision | None = None
    # Some of the run's own classes only (with_classes): the columns of the run's logits kept,
    # as an evaluation set covering those classes is scored (flyp.evaluate.restrict).
    subset: list[int] | None = None
    all_classes: int | None = None  # the run's number of classes, where ``subset`` is set

    @property
    def device(self) -> torch.device:
        return self.classifier.model.logit_scale.device

    @property
    def head(self) -> str:
        return "linear" if self.classifier.head is not None else "zeroshot-text"

    def _pixels(self, images: ImageInput | Sequence[ImageInput] | Tensor) -> Tensor:
        """A batch of eval-transformed images; a tensor is taken as already transformed."""
        if isinstance(images, Tensor):
            return images.unsqueeze(0) if images.ndim == 3 else images
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        rgb = [to_rgb(x) if isinstance(x, Image.Image) else load_rgb(str(x)) for x in images]
        return torch.stack([self.bundle.eval_transform(x) for x in rgb])

    def _batches(self, images, batch_size: int) -> Iterable[Tensor]:
        if isinstance(images, Tensor):
            images = self._pixels(images)
            yield from images.split(batch_size)
            return
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        images = list(images)
        for start in range(0, len(images), batch_size):
            yield self._pixels(images[start : start + batch_size])

    @torch.no_grad()
    def logits(self, images, batch_size: int = 64) -> Tensor:
        """Class logits (images x classes), on the CPU in fp32."""
        self.classifier.eval()
        with self._autocast():  # as the run's evaluation ran (the logits themselves in fp32)
            logits = torch.cat(
                [self.classifier(b).float().cpu() for b in self._batches(images, batch_size)]
            )
        return logits if self.subset is None else logits[:, self.subset]

    def _autocast(self):
        return autocast(self.device, self.precision.name if self.precision else "fp32")

    def predict(
        self, images, top_k: int = 5, batch_size: int = 64
    ) -> list[list[tuple[str, float]]]:
        """Per image, the ``top_k`` most probable classes as (class name, probability)."""
        probs = F.softmax(self.logits(images, batch_size), dim=-1)
        values, indices = probs.topk(min(top_k, len(self.class_names)), dim=-1)
        return [
            [(self.class_names[i], float(p)) for p, i in zip(row_p, row_i, strict=True)]
            for row_p, row_i in zip(values.tolist(), indices.tolist(), strict=True)
        ]

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 64) -> Tensor:
        """Unit-length image features (images x dim), on the CPU in fp32."""
        model = self.classifier.model
        model.eval()
        out = []
        for batch in self._batches(images, batch_size):
            with self._autocast():
                features = model.encode_image(batch.to(self.device))
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str]) -> Tensor:
        """Unit-length text features (texts x dim) from the run's text tower, on the CPU."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        model = self.classifier.model
        model.eval()
        tokens = self.bundle.tokenizer(texts).to(self.device)
        return F.normalize(model.encode_text(tokens).float(), dim=-1).cpu()

    def with_classes(
        self, names: Sequence[str], templates: Sequence[str] | None = None
    ) -> FlypClassifier:
        """A zero-shot classifier over new class names, made with this run's text tower (the
        towers are shared, not copied; a linear head is left out: it knows only the old
        classes). ``templates`` default to the run's own.

        Names that are all among the run's own classes, without ``templates``, keep the run's
        head and its logits of those classes only: the scores a run's evaluation gives a set
        covering those classes (an OOD domain lacking some), whatever the head."""
        names = _check_names(names)
        own = {name_key(n): i for i, n in enumerate(self.class_names)}
        if templates is None and all(name_key(n) in own for n in names):
            picked = [own[name_key(n)] for n in names]
            subset = [self.subset[i] for i in picked] if self.subset is not None else picked
            kept = [self.class_names[i] for i in picked]
            meta = {**self.metadata, "class_names": kept}
            total = self.all_classes or len(self.class_names)
            return FlypClassifier(
                self.classifier, self.bundle, kept, self.templates, meta, self.precision, subset, total
            )
        templates = check_templates(
            templates if templates is not None else self.templates, "templates"
        )
        _check_distinct(self.bundle.tokenizer, names, templates)
        classifier = Classifier(self.classifier.model)
        classifier.refresh_text_head(self.bundle.tokenizer, names, templates)
        meta = {
            **self.metadata,
            "class_names": names,
            "templates": templates,
            "head": "zeroshot-text",
        }
        return FlypClassifier(classifier, self.bundle, names, templates, meta, self.precision)


def _eval_precision(meta: dict[str, Any], weights: Path) -> str:
    """The eval.precision the run asked for (auto, fp32, bf16): its metadata says; weights from
    before it did take it from the recipe.yaml beside them, else auto."""
    asked = meta.get("eval_precision")
    recipe = weights.parent / "recipe.yaml"
    if asked is None and recipe.is_file():
        from flyp.recipe import RecipeError, load_recipe

        try:
            asked = load_recipe(recipe).eval.precision
        except RecipeError:
            asked = None
    asked = asked or "auto"
    if asked not in PRECISIONS:
        raise CheckpointError(
            f"{weights}: its metadata's eval_precision is {asked!r}, not one of "
            f"{', '.join(PRECISIONS)}; use the model.safetensors a run wrote, or pass --precision"
        )
    return asked


def _weights_path(path: Path, unfinished: bool = False) -> tuple[Path, Path | None]:
    """(weights file, run directory or None) for a run directory or a .safetensors file.
    The weights of an unfinished run (killed, or still training) are refused unless
    ``unfinished``: they are the best so far, not what the run selects."""
    from flyp.errors import RunError
    from flyp.outputs import not_a_run
    from flyp.outputs import unfinished as unfinished_reason
    from flyp.paths import broken_link

    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a run directory or its model.safetensors"
        )
    weights, run_dir = (path / "model.safetensors", path) if path.is_dir() else (path, None)
    refusal = broken_link(weights)
    if refusal:
        raise FileNotFoundError(refusal)
    if path.is_dir() and not weights.is_file():
        many = not_a_run(path)
        if many:
            raise FileNotFoundError(many)
        raise FileNotFoundError(
            f"{path} has no model.safetensors: is the run finished? "
            f"(resume it with flyp finetune --resume {path})"
        )
    reason = unfinished_reason(weights.parent)
    if reason and not unfinished:
        raise RunError(
            f"{reason}; finish it with flyp finetune --resume {weights.parent}, or pass "
            "--unfinished to use those weights anyway"
        )
    return weights, run_dir


def load_classifier(
    path: str | Path,
    device: str | torch.device = "cpu",
    unfinished: bool = False,
    precision: str | None = None,
) -> FlypClassifier:
    """The classifier a run trained, from its run directory or its model.safetensors alone.
    An unfinished run (training state, no metrics.json) is refused unless ``unfinished``.
    ``precision`` (auto, fp32, bf16; None: the run's eval.precision) is resolved on ``device``
    by the rule the run's evaluation used (flyp.precision), so that on the same machine
    ``predict`` gives the run's evaluation's logits."""
    from safetensors import safe_open

    weights, run_dir = _weights_path(Path(path), unfinished)
    meta = read_metadata(weights)
    if meta is None:
        if run_dir is None or not (run_dir / "recipe.yaml").is_file():
            raise CheckpointError(
                f"{weights} carries no flyp metadata (written by an older flyp), so it does not "
                "say which model it belongs to; pass its run directory instead (the run's "
                "recipe.yaml gives the model spec)"
            )
        meta = metadata_from_run(run_dir)
    elif isinstance(meta, dict) and meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{weights} has flyp metadata format {meta.get('format')!r}; this flyp reads format "
            f"{FORMAT}: upgrade flyp"
        )
    else:
        meta = check_metadata(meta, weights)
    bundle = load_model(meta["model_spec"], meta.get("image_size"), meta.get("context_length"))
    head = None
    if meta["head"] == "linear":
        with safe_open(str(weights), "pt") as f:
            if "head.weight" not in f.keys():
                raise CheckpointError(
                    f"{weights} says it has a linear head but holds no head.weight; "
                    "pass the model.safetensors of a finished run"
                )
            classes, dim = f.get_slice("head.weight").get_shape()
        if classes != len(meta["class_names"]):
            raise CheckpointError(
                f"{weights}: its linear head scores {classes} classes but its metadata "
                f"class_names lists {len(meta['class_names'])}; use the model.safetensors a run "
                "wrote, or pass its run directory"
            )
        head = nn.Linear(dim, classes)
    classifier = Classifier(bundle.model, head)
    load_weights(classifier, weights)
    classifier.to(torch.device(device)).eval()
    if classifier.channels_last:  # convolutional towers run faster channels_last (base.py)
        classifier.model.to(memory_format=torch.channels_last)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    chosen = resolve(precision or _eval_precision(meta, weights), device)
    configure_device(device)  # TF32 and cuDNN autotuning on CUDA, as a run has them
    if torch.device(device).type == "cpu":
        keep_freed_memory()
        if chosen.name == "bf16":
            tune_cpu_bf16(classifier.model)  # as the run's evaluation: depthwise convs in fp32
    class_names, templates = list(meta["class_names"]), list(meta["templates"])
    if head is None:
        try:
            _check_distinct(bundle.tokenizer, class_names, templates)
        except ValueError as err:
            raise CheckpointError(f"{weights}: {err}") from None
        classifier.refresh_text_head(bundle.tokenizer, class_names, templates)
    return FlypClassifier(classifier, bundle, class_names, templates, meta, chosen)


# ---- flyp predict: inputs, decoding with skips, CSV ----


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image paths from files, folders (recursive, image suffixes) and CSV files with a
    ``path`` column (relative paths from the CSV's folder); plus (input, reason) for inputs
    that do not exist."""
    paths: list[str] = []
    missing: list[tuple[str, str]] = []
    for text in map(str, inputs):
        item = Path(text)
        records = _records(text)
        if records is not None:
            paths += records
        elif item.is_dir():
            paths += sorted(
                str(p)
                for p in item.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
        elif item.suffix.lower() == ".csv" and item.is_file():
            with io.StringIO(read_text(item, "image list"), newline="") as f:
                reader = csv.DictReader(f)
                if "path" not in (reader.fieldnames or []):
                    raise DataError(
                        f"{item} has no 'path' column (found {reader.fieldnames}); "
                        "add a header line naming the image column 'path'"
                    )
                for row in reader:
                    if row["path"]:
                        p = Path(row["path"])
                        paths.append(str(p if p.is_absolute() else item.parent / p))
        elif item.exists():
            paths.append(str(item))
        else:
            missing.append((str(item), "does not exist"))
    return paths, missing


def _records(text: str) -> list[str] | None:
    """The images of WebDataset shards (a .tar, a brace pattern, a folder of them) or of a
    Hugging Face dataset (save_to_disk folder, Parquet), as record paths; None for other inputs."""
    from flyp.data import hf, shards

    if shards.is_shards(text) and ("{" in text or Path(text).exists()):
        return shards.shard_images(text)
    if hf.is_hf(text):
        return hf.table_images(text)
    return None


@dataclass
class FilePredictions:
    paths: list[str]
    top: list[list[tuple[str, float]]]
    skipped: list[tuple[str, str]]  # (path, reason)


def predict_files(
    clf: FlypClassifier,
    paths: Sequence[str],
    top_k: int = 5,
    batch_size: int = 64,
    progress: bool | None = None,
) -> FilePredictions:
    """Classify image files in batches; a file that cannot be decoded is skipped and listed
    with the reason (never dropped silently). ``progress`` None: a bar when on a terminal."""
    from tqdm.auto import tqdm

    done, top, skipped = [], [], []
    bar = tqdm(
        total=len(paths),
        desc="predict",
        unit="img",
        disable=None if progress is None else not progress,
    )
    for start in range(0, len(paths), batch_size):
        images, names = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(decode_rgb(path))
                names.append(path)
            except Exception as err:  # noqa: BLE001 - any decode failure is this file's fault
                skipped.append((path, f"{type(err).__name__}: {err}"))
        if images:
            top += clf.predict(images, top_k=top_k, batch_size=batch_size)
            done += names
        bar.update(len(paths[start : start + batch_size]))
    bar.close()
    return FilePredictions(done, top, skipped)


def predictions_csv(result: FilePredictions) -> str:
    """One row per image and rank: path, rank (1 = top-1), class, probability. A path or class
    name that a spreadsheet would run as a formula is written as text (flyp.outputs)."""
    from flyp.outputs import csv_cell

    out = io.StringIO()
    # RFC 4180 line ends: csv quotes a field holding CR or LF only when both end its lines
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(["path", "rank", "class", "probability"])
    for path, top in zip(result.paths, result.top, strict=True):
        for rank, (name, p) in enumerate(top, start=1):
            writer.writerow([csv_cell(path), rank, csv_cell(name), f"{p:.6f}"])
    return out.getvalue()
