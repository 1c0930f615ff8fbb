"""Use what a run trained: rebuild its classifier from the weights file alone, and classify images.

A finished run's ``model.safetensors`` carries in its header (safetensors metadata, key
``"flyp"``) everything needed to rebuild the classifier without the recipe or the dataset::

    {"format": 1, "model_spec": "default", "image_size": 224, "context_length": null,
     "mean": [...], "std": [...], "class_names": [...], "templates": [...],
     "head": "zeroshot-text" | "linear", "method": "flyp", "metric": "accuracy",
     "tensors": "full" | "changed"}

``"tensors": "changed"`` marks a run that trained nothing (zeroshot, lp): the file holds only
what differs from the pretrained model (a linear head, the temperature), and the towers are
rebuilt from ``model_spec``. Weights written before the metadata existed still load from their
run directory, whose recipe.yaml gives the spec (and the benchmark the class names).

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
from flyp.data.folders import IMAGE_SUFFIXES, DataError, decode_rgb, load_rgb, nfc, to_rgb
from flyp.methods import Classifier
from flyp.models import ModelBundle, load_model
from flyp.models.base import keep_freed_memory

FORMAT = 1
ImageInput = str | Path | Image.Image


def _normalisation(transform: Any) -> tuple[list[float] | None, list[float] | None]:
    """The mean and std of the Normalize step of an eval transform (None if it has none)."""
    from torchvision import transforms as T

    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, T.Normalize):
            return [float(x) for x in step.mean], [float(x) for x in step.std]
    return None, None


def weights_metadata(
    bundle: ModelBundle, recipe: Any, benchmark: Any, classifier: Classifier, tensors: str
) -> dict[str, Any]:
    """What a run's weights file says about itself (see the module docstring)."""
    mean, std = _normalisation(bundle.eval_transform)
    return {
        "format": FORMAT,
        "model_spec": recipe.model.spec,
        "image_size": bundle.image_size,
        "context_length": recipe.model.context_length,
        "mean": mean,
        "std": std,
        "class_names": list(benchmark.class_names),
        "templates": list(benchmark.templates),
        "head": "linear" if classifier.head is not None else "zeroshot-text",
        "method": recipe.train.method,
        "metric": benchmark.metric,
        "tensors": tensors,
    }


def _metadata_from_run(run_dir: Path) -> dict[str, Any]:
    """The metadata of weights written without any, rebuilt from the run's recipe.yaml (the
    class names and templates come from its benchmark, so the data must be where it was)."""
    from flyp.data import build_benchmark
    from flyp.methods import get_method
    from flyp.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    bench = build_benchmark(recipe.data)
    return {
        "format": FORMAT,
        "model_spec": recipe.model.spec,
        "image_size": recipe.model.image_size,
        "context_length": recipe.model.context_length,
        "class_names": bench.class_names,
        "templates": bench.templates,
        "head": "linear" if get_method(recipe.train.method).linear_head else "zeroshot-text",
        "method": recipe.train.method,
        "metric": bench.metric,
        "tensors": "full",
    }


def _check_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates)
    if not templates:
        raise ValueError("no templates given; give at least one, e.g. 'a photo of a {}.'")
    for t in templates:
        if "{}" not in t:
            raise ValueError(
                f"template {t!r} has no '{{}}' for the class name; e.g. 'a photo of a {{}}.'"
            )
    return templates


def _check_names(names: Sequence[str]) -> list[str]:
    names = [nfc(n.strip()) for n in names]  # as class folder names are read
    if len(names) < 2 or any(not n for n in names):
        raise ValueError(f"give at least two non-empty class names, got {names}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"class name {twice[0]!r} is given twice; list each class once")
    return names


@dataclass
class FlypClassifier:
    """A trained classifier with its tokenizer and eval transform: what ``load_classifier``
    returns. ``predict`` gives class names and probabilities (softmax over the logits)."""

    classifier: Classifier
    bundle: ModelBundle
    class_names: list[str]
    templates: list[str]
    metadata: dict[str, Any] = field(default_factory=dict)

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
        return torch.cat(
            [self.classifier(b).float().cpu() for b in self._batches(images, batch_size)]
        )

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
        classes). ``templates`` default to the run's own."""
        names = _check_names(names)
        templates = _check_templates(templates if templates is not None else self.templates)
        classifier = Classifier(self.classifier.model)
        classifier.refresh_text_head(self.bundle.tokenizer, names, templates)
        meta = {
            **self.metadata,
            "class_names": names,
            "templates": templates,
            "head": "zeroshot-text",
        }
        return FlypClassifier(classifier, self.bundle, names, templates, meta)


def _weights_path(path: Path) -> tuple[Path, Path | None]:
    """(weights file, run directory or None) for a run directory or a .safetensors file."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass a run directory or its model.safetensors"
        )
    if path.is_dir():
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(
                f"{path} has no model.safetensors: is the run finished? "
                f"(resume it with flyp finetune --resume {path})"
            )
        return weights, path
    return path, None


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> FlypClassifier:
    """The classifier a run trained, from its run directory or its model.safetensors alone."""
    from safetensors import safe_open

    weights, run_dir = _weights_path(Path(path))
    meta = read_metadata(weights)
    if meta is None:
        if run_dir is None or not (run_dir / "recipe.yaml").is_file():
            raise CheckpointError(
                f"{weights} carries no flyp metadata (written by an older flyp), so it does not "
                "say which model it belongs to; pass its run directory instead (the run's "
                "recipe.yaml gives the model spec)"
            )
        meta = _metadata_from_run(run_dir)
    elif meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{weights} has flyp metadata format {meta.get('format')!r}; this flyp reads format "
            f"{FORMAT}: upgrade flyp"
        )
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
        head = nn.Linear(dim, classes)
    classifier = Classifier(bundle.model, head)
    load_weights(classifier, weights)
    classifier.to(torch.device(device)).eval()
    if classifier.channels_last:  # convolutional towers run faster channels_last (base.py)
        classifier.model.to(memory_format=torch.channels_last)
    if torch.device(device).type == "cpu":
        keep_freed_memory()
    class_names, templates = list(meta["class_names"]), list(meta["templates"])
    if head is None:
        classifier.refresh_text_head(bundle.tokenizer, class_names, templates)
    return FlypClassifier(classifier, bundle, class_names, templates, meta)


# ---- flyp predict: inputs, decoding with skips, CSV ----


def collect_images(inputs: Sequence[str | Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """Image paths from files, folders (recursive, image suffixes) and CSV files with a
    ``path`` column (relative paths from the CSV's folder); plus (input, reason) for inputs
    that do not exist."""
    paths: list[str] = []
    missing: list[tuple[str, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(
                str(p)
                for p in item.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            )
        elif item.suffix.lower() == ".csv" and item.is_file():
            with open(item, newline="") as f:
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
    """One row per image and rank: path, rank (1 = top-1), class, probability."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "rank", "class", "probability"])
    for path, top in zip(result.paths, result.top, strict=True):
        for rank, (name, p) in enumerate(top, start=1):
            writer.writerow([path, rank, name, f"{p:.6f}"])
    return out.getvalue()
