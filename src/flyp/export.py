"""``flyp export``: a finished run as a checkpoint the model's own library loads.

Each target format is the inverse of the matching loader in :mod:`flyp.models`:

  open_clip  open_clip_pytorch_model.bin (the plain open_clip state dict) + open_clip_config.json,
             so ``open_clip.create_model_and_transforms(ARCH, pretrained=FILE)`` and
             ``create_model_and_transforms("local-dir:OUT")`` both load it
  hf         a ``save_pretrained`` folder of CLIPModel / SiglipModel with the source folder's
             tokenizer and processor files, loadable offline
  flyp       the run's own model.safetensors + recipe.yaml (+ metrics.json): every model,
             including the default and tiny ones that no other library can load

flyp's wrappers (the trimmed-text ``encode_text`` of open_clip towers, the ``visual`` / ``text``
regrouping of transformers models, the ``model.`` prefix of the classifier) are not part of the
exported names: the files hold the library's own keys. A linear head (ft, lp, lpft, l2sp, lipsum-ft) has no
place in those libraries' models, so it is written beside them as head.safetensors, with the
class names it scores in flyp_export.json. Everything is written to a temporary folder next to
``out`` and renamed into place at the end: a failed export leaves nothing behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from flyp.checkpoint import CheckpointError, load_weights, read_json, read_weights
from flyp.errors import RunError
from flyp.methods import Classifier, get_method
from flyp.models import ModelBundle, load_model
from flyp.models.openclip import uses_quick_gelu
from flyp.outputs import check_output, data_folders, md_cell
from flyp.paths import broken_link
from flyp.recipe import Recipe, load_recipe

FORMATS = ("open_clip", "hf", "flyp")
OPEN_CLIP_WEIGHTS = "open_clip_pytorch_model.bin"  # a name open_clip's local-dir: loader looks for
INFO_NAME = "flyp_export.json"
HEAD_NAME = "head.safetensors"
# flyp's regrouping of a transformers CLIPModel / SiglipModel (flyp.models.hf.HFTwoTower) -> its own names
HF_NAMES = {
    "visual.tower.": "vision_model.",
    "visual.projection.": "visual_projection.",
    "text.tower.": "text_model.",
    "text.projection.": "text_projection.",
}
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".npz",
    ".onnx",
)


class ExportError(RunError):
    """A run that cannot be exported as asked; the message names the file or option and the fix.
    A RunError, so the CLI prints it as one line like every other unusable run directory."""


def export_run(run_dir: Path, fmt: str, out: Path) -> Path:
    """Write the finished run ``run_dir`` to the new folder ``out`` in format ``fmt``; return ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    recipe = _check(run_dir, fmt, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the export from the team
        if fmt == "flyp":
            info = _export_flyp(run_dir, recipe, tmp)
        else:
            info = _export_model(run_dir, recipe, fmt, tmp)
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(info))
        if fmt == "hf":  # after flyp's own files, so the source folder's README never wins
            _copy_processor_files(Path(recipe.model.spec.partition(":")[2]).expanduser(), tmp)
        os.replace(tmp, out)  # an empty ``out`` is replaced whole (rename(2) allows it)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or isinstance(err, CheckpointError) and "no space left" in str(err):
            # named after the export: a copy's error names the run file it reads first
            raise ExportError(
                f"no space left on the device while exporting to {out}; free space or choose "
                "another --out"
            ) from None
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def _check(run_dir: Path, fmt: str, out: Path) -> Recipe:
    """Every refusal that needs no model loaded, so a bad call fails at once and writes nothing."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if not run_dir.is_dir():
        raise ExportError(
            f"run directory {run_dir} does not exist; pass a folder flyp finetune wrote"
        )
    for name in ("recipe.yaml", "model.safetensors", "metrics.json"):
        refusal = broken_link(run_dir / name)
        if refusal:
            raise ExportError(refusal)
    if not (run_dir / "recipe.yaml").is_file():
        raise ExportError(f"{run_dir} has no recipe.yaml, so it is not a flyp run directory")
    for name in ("model.safetensors", "metrics.json"):
        if not (run_dir / name).is_file():
            raise ExportError(
                f"{run_dir} is not a finished run (no {name}); finish it first: "
                f"flyp finetune --resume {run_dir}"
            )
    recipe = load_recipe(run_dir / "recipe.yaml")
    data = data_folders(recipe)  # nor in the data the run read
    check_output(out, [run_dir], folder=True, data=data)  # never the run, nor one of its files
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} exists and is not empty; pass a new or empty folder")
    spec = recipe.model.spec
    kind = spec.partition(":")[0]
    if fmt != "flyp" and kind not in ("open_clip", "hf"):
        raise ExportError(
            f"{run_dir} was trained from model.spec={spec}, which neither open_clip nor "
            "transformers can load; export it with --format flyp (model.safetensors + "
            "recipe.yaml, which flyp evaluate loads)"
        )
    if fmt != "flyp" and kind != fmt:
        raise ExportError(
            f"{run_dir} holds a {kind} model (model.spec={spec}); export it with --format {kind} "
            "(flyp does not convert between libraries)"
        )
    return recipe


def _export_flyp(run_dir: Path, recipe: Recipe, folder: Path) -> dict[str, Any]:
    # what is copied is read whole first: a cut-short weights file or a tampered metrics.json
    # is named, not exported
    read_weights(run_dir / "model.safetensors")
    read_json(run_dir / "metrics.json", ("sets",))
    for name in ("recipe.yaml", "model.safetensors", "metrics.json"):
        shutil.copy2(run_dir / name, folder / name)
    return {
        "format": "flyp",
        "source_run": str(run_dir.resolve()),
        "model_spec": recipe.model.spec,
        "method": recipe.train.method,
        "load": [
            "flyp predict OUT IMAGE...  # classify images (or folders of them, or a CSV)",
            "flyp evaluate OUT  # the recipe's data; or any data: --recipe / --set data.root=...",
        ],
        "python": [
            "import flyp",
            "",
            'clf = flyp.load_classifier("OUT")  # the model, its head and preprocessing',
            'print(clf.predict(["image.jpg"], top_k=3))  # per image: [(class, probability), ...]',
        ],
    }


def _export_model(run_dir: Path, recipe: Recipe, fmt: str, folder: Path) -> dict[str, Any]:
    bundle = load_model(recipe.model.spec, recipe.model.image_size, recipe.model.context_length)
    classifier = _load_classifier(run_dir, recipe, bundle.model)
    classifier.eval()
    info: dict[str, Any] = {
        "format": fmt,
        "source_run": str(run_dir.resolve()),
        "model_spec": recipe.model.spec,
        "method": recipe.train.method,
        "image_size": bundle.image_size,
    }
    if fmt == "open_clip":
        info |= _write_open_clip(bundle, recipe, folder)
    else:
        info |= _write_hf(bundle, recipe, folder)
    info |= _class_info(recipe, classifier.head, folder)
    return info


def _load_classifier(run_dir: Path, recipe: Recipe, model: nn.Module) -> Classifier:
    """The run's Classifier with its trained weights; a linear head gets the saved shape."""
    weights = run_dir / "model.safetensors"
    head = None
    if get_method(recipe.train.method).linear_head:
        with safe_open(str(weights), "pt") as f:
            if "head.weight" in f.keys():
                classes, dim = f.get_slice("head.weight").get_shape()
                head = nn.Linear(dim, classes)
    classifier = Classifier(model, head)
    load_weights(classifier, weights)  # strict: names the run's spec if the weights do not fit
    return classifier


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def _write_open_clip(bundle: ModelBundle, recipe: Recipe, folder: Path) -> dict[str, Any]:
    import open_clip

    arch = recipe.model.spec.partition(":")[2].partition(":")[0]
    config_copy = None
    if arch.endswith(".json"):  # load_model registered it under the file's stem
        config_copy = f"{Path(arch).stem}.json"
        shutil.copy2(Path(arch).expanduser(), folder / config_copy)
        arch = Path(arch).stem
    model_cfg = open_clip.get_model_config(arch)
    if recipe.model.image_size is not None:  # what force_image_size did when the run loaded it
        model_cfg["vision_cfg"]["image_size"] = recipe.model.image_size
    quick_gelu = uses_quick_gelu(bundle.model)  # weights trained with QuickGELU (models/openclip.py)
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    preprocess = open_clip.get_model_preprocess_cfg(bundle.model)
    torch.save(_state(bundle.model), folder / OPEN_CLIP_WEIGHTS)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2) + "\n"
    )
    force = (
        f", force_image_size={recipe.model.image_size}"
        if recipe.model.image_size is not None
        else ""
    ) + (", force_quick_gelu=True" if quick_gelu else "")
    load = [
        "import open_clip",
        "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:OUT')",
        "tokenizer = open_clip.get_tokenizer('local-dir:OUT')",
        "# or by architecture name (the architecture's default preprocessing):",
    ]
    if config_copy:
        load.append(f"open_clip.add_model_config('OUT/{config_copy}')")
    load.append(
        f"model, _, preprocess = open_clip.create_model_and_transforms('{arch}', "
        f"pretrained='OUT/{OPEN_CLIP_WEIGHTS}'{force})"
    )
    return {
        "arch": arch,
        "weights": OPEN_CLIP_WEIGHTS,
        "model_config": config_copy,
        "preprocess": preprocess,
        "load": load,
    }


def _hf_name(key: str) -> str:
    for ours, theirs in HF_NAMES.items():
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return key  # logit_scale, logit_bias


def _write_hf(bundle: ModelBundle, recipe: Recipe, folder: Path) -> dict[str, Any]:
    from transformers import AutoConfig, CLIPModel, SiglipModel

    source = Path(recipe.model.spec.partition(":")[2]).expanduser()
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    kind = SiglipModel if config.model_type == "siglip" else CLIPModel
    model = kind.from_pretrained(source, local_files_only=True)  # the source's dtype and config
    model.load_state_dict({_hf_name(k): v for k, v in _state(bundle.model).items()}, strict=True)
    model.save_pretrained(folder)
    load = [
        f"from transformers import {kind.__name__}, AutoTokenizer",
        f"model = {kind.__name__}.from_pretrained('OUT', local_files_only=True)",
        "tokenizer = AutoTokenizer.from_pretrained('OUT', local_files_only=True)",
    ]
    if bundle.image_size != config.vision_config.image_size:
        load.append(
            f"# trained at {bundle.image_size} px (the config says "
            f"{config.vision_config.image_size}): resize images to {bundle.image_size} and pass "
            "interpolate_pos_encoding=True to get_image_features"
        )
    return {"model_class": kind.__name__, "load": load}


def _copy_processor_files(source: Path, folder: Path) -> None:
    """Tokenizer and image-processor files of the source folder, so the export loads offline."""
    for path in sorted(source.iterdir()):
        skip = (
            not path.is_file()
            or path.name.startswith(".")
            or path.name.endswith(WEIGHT_SUFFIXES + (".index.json",))
            or (folder / path.name).exists()  # written by save_pretrained or by flyp
        )
        if not skip:
            shutil.copy2(path, folder / path.name)


def _class_info(recipe: Recipe, head: nn.Linear | None, folder: Path) -> dict[str, Any]:
    """The class names and templates of the run's data; a linear head is saved beside the model."""
    from flyp.data.benchmarks import build_benchmark
    from flyp.data.folders import DataError

    try:
        bench = build_benchmark(recipe.data)
        names, templates, problem = bench.class_names, bench.templates, None
    except (DataError, OSError) as err:
        names, templates, problem = None, None, str(err).splitlines()[0]
    if head is None:
        return {
            "classifier": "the zero-shot head: every class name in every template through the "
            "finetuned text tower (normalised, averaged over templates, normalised)",
            "class_names": names,
            "templates": templates,
            **({"class_names_missing": problem} if problem else {}),
        }
    if names is None:
        raise ExportError(
            f"the linear head of this run scores the classes of its data, which does not load "
            f"({problem}); make the run's data.root readable again, or export with --format flyp"
        )
    if len(names) != head.out_features:
        raise ExportError(
            f"the run's linear head scores {head.out_features} classes but its data now has "
            f"{len(names)}; restore the data the run was trained on, or export with --format flyp"
        )
    save_file(
        {"weight": head.weight.detach().cpu().contiguous(), "bias": head.bias.detach().cpu()},
        str(folder / HEAD_NAME),
    )
    return {
        "classifier": f"linear head in {HEAD_NAME} (not part of the model): "
        "logits = normalize(image_features) @ weight.T + bias, one column per class name",
        "head": HEAD_NAME,
        "class_names": names,
        "templates": templates,
    }


def _readme(info: dict[str, Any]) -> str:
    lines = [
        f"# flyp export ({info['format']})",
        "",
        # the spec and the folder are the user's text: escaped, so they cannot add HTML or links
        f"Finetuned with flyp, method {md_cell(info['method'])}, from "
        f"{md_cell(info['model_spec'])}.",
        f"Source run: {md_cell(info['source_run'])}.",
        "",
    ]
    if "classifier" in info:
        lines += [f"Classifier: {info['classifier']}.", ""]
    if info.get("head"):
        lines += [
            f"The linear head cannot live inside the {info['format']} model: it is "
            f"`{info['head']}` beside it (tensors `weight`, `bias`), with its class names in "
            f"`{INFO_NAME}`.",
            "",
        ]
    lines += ["Load it (OUT is this folder):", "", "```", *info["load"], "```", ""]
    if info.get("python"):  # flyp's own format: one call gives a classifier that predicts
        lines += ["In Python:", "", "```python", *info["python"], "```", ""]
    lines += [f"Everything flyp knows about the export is in `{INFO_NAME}`.", ""]
    return "\n".join(lines)
