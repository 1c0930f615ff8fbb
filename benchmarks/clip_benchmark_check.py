"""Cross-check of ``flyp export --format open_clip`` with the field's evaluation harness.

Writes a small image folder (five colour classes; domain "photo" for training, a darker,
noisier "sketch" as the OOD test set), finetunes a tiny open_clip ViT on it with FLYP (seconds
on a CPU), exports the run with ``export_run(..., "open_clip", ...)``, then scores the sketch
images twice: ``flyp evaluate`` on the run, and clip-benchmark's zero-shot classification
(``clip_benchmark.metrics.zeroshot_classification.evaluate``) on the exported checkpoint loaded
by ``open_clip.create_model_and_transforms(ARCH, pretrained=FILE)``, through a torchvision
ImageFolder, with the class names and the seven templates flyp used. Accuracy and balanced
accuracy must be equal, and so must the predicted class of every image.

    .venv/bin/pip install clip-benchmark
    .venv/bin/python benchmarks/clip_benchmark_check.py [--per-class 30] [--epochs 3]

Exit status 0 when everything agrees, 1 otherwise. Output: docs/export.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flyp.methods import Classifier
from flyp.recipe import load_recipe

TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
COLOURS = {
    "apple": (200, 40, 40),
    "frog": (40, 180, 40),
    "sea": (40, 60, 200),
    "banana": (220, 210, 50),
    "plum": (150, 40, 160),
}


def small_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """<root>/<domain>/<class>/<n>.png: one colour per class under noise; the OOD domain
    ("sketch") is darker and noisier, so a briefly trained model gets some of it wrong."""
    rng = np.random.default_rng(seed)
    for domain, (light, noise) in {"photo": (1.0, 40), "sketch": (0.55, 90)}.items():
        for name, colour in COLOURS.items():
            folder = root / domain / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.array(colour, dtype=float) * light + rng.normal(0, noise, (32, 32, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def train_and_export(work: Path, data: Path, epochs: int) -> tuple[Path, Path]:
    from flyp.export import export_run
    from flyp.models import load_model
    from flyp.train import finetune

    config = work / "flyp-cb-vit.json"
    config.write_text(json.dumps(TINY_VIT))
    torch.manual_seed(0)
    pretrained = work / "pretrained.pt"  # a seeded random "pretrained" tiny ViT
    torch.save(load_model(f"open_clip:{config}").model.state_dict(), pretrained)
    recipe = load_recipe(
        None,
        [
            f"model.spec=open_clip:{config}:{pretrained}",
            "data.benchmark=folders",
            f"data.root={data}",
            "data.id_domain=photo",
            "data.ood_domains=[sketch]",
            "data.templates=pacs",  # seven templates: the averaging is checked too
            "data.val_fraction=0.2",
            "data.test_fraction=0.2",
            f"train.epochs={epochs}",
            "train.batch_size=16",
            "train.lr=1e-3",
            "train.warmup_steps=2",
            "train.device=cpu",
        ],
    )
    run = work / "run"
    finetune(recipe, run)
    return run, export_run(run, "open_clip", work / "export")


def flyp_metrics(run: Path, work: Path) -> dict:
    from flyp.cli import main

    out = work / "flyp-evaluate.json"
    if main(["evaluate", str(run), "--out", str(out)]) != 0:
        sys.exit("flyp evaluate failed")
    return json.loads(out.read_text())["sets"]["sketch"]


def _topk_accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[float]:
    """clip-benchmark 1.6.2's ``accuracy`` with its scalar read fixed: it calls ``float()`` on a
    one-element array, which NumPy 2.4 refuses (LAION-AI/CLIP_benchmark issue #147). The same
    top-k count otherwise."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def clip_benchmark_metrics(export: Path, data: Path) -> tuple[dict, dict[str, int], list, list]:
    import open_clip
    from clip_benchmark.metrics import zeroshot_classification
    from torchvision.datasets import ImageFolder

    info = json.loads((export / "flyp_export.json").read_text())
    open_clip.add_model_config(export / info["model_config"])
    model, _, preprocess = open_clip.create_model_and_transforms(
        info["arch"], pretrained=str(export / info["weights"])
    )
    model.eval()
    dataset = ImageFolder(str(data / "sketch"), transform=preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=False)
    templates = [t.replace("{}", "{c}") for t in info["templates"]]  # clip-benchmark's spelling
    zeroshot_classification.accuracy = _topk_accuracy  # see _topk_accuracy
    tokenizer = open_clip.get_tokenizer(info["arch"])
    names = info["class_names"]
    metrics = zeroshot_classification.evaluate(
        model, loader, tokenizer, names, templates, device="cpu", amp=False
    )
    # the per-image predictions, from the two functions evaluate() is made of
    head = zeroshot_classification.zero_shot_classifier(
        model, tokenizer, names, templates, "cpu", amp=False
    )
    logits, _ = zeroshot_classification.run_classification(model, head, loader, "cpu", amp=False)
    paths = [path for path, _ in dataset.samples]
    return metrics, dict(zip(paths, logits.argmax(1).tolist(), strict=True)), names, templates


def flyp_predictions(run: Path, paths: list[str]) -> list[int]:
    """The run's classifier, as flyp evaluate builds it, on each image (flyp's decoding)."""
    from flyp.checkpoint import load_weights
    from flyp.data.folders import load_rgb
    from flyp.experiment import prepare

    exp = prepare(load_recipe(run / "recipe.yaml"))
    classifier = Classifier(exp.bundle.model)
    load_weights(classifier, run / "model.safetensors")
    classifier.refresh_text_head(
        exp.bundle.tokenizer, exp.benchmark.class_names, exp.benchmark.templates
    )
    classifier.eval()
    with torch.no_grad():
        return [
            int(classifier(exp.bundle.eval_transform(load_rgb(p))[None]).argmax()) for p in paths
        ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=30, help="images per class and domain")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workdir", help="keep everything here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.workdir and any(work.iterdir()):
            sys.exit(f"--workdir {work} is not empty; pass a new or empty folder")
        data = small_folder(work / "data", args.per_class)
        run, export = train_and_export(work, data, args.epochs)
        ours = flyp_metrics(run, work)
        theirs, predicted, classes, templates = clip_benchmark_metrics(export, data)
        ours_predicted = flyp_predictions(run, list(predicted))
    n = len(predicted)
    agree = sum(a == b for a, b in zip(predicted.values(), ours_predicted, strict=True))
    print(
        f"images: {n} sketch images ({ours['n']} in flyp's set), {len(classes)} classes: "
        f"{', '.join(classes)}"
    )
    print(f"templates ({len(templates)}): {' | '.join(templates)}")
    print("                          flyp evaluate (run)   clip-benchmark (export)")
    pairs = [("accuracy", "acc1"), ("balanced_accuracy", "mean_per_class_recall")]
    same = n == ours["n"]
    for flyp_key, cb_key in pairs:
        a, b = ours[flyp_key], float(theirs[cb_key])
        same = same and abs(a - b) < 1e-9
        print(f"{flyp_key:<26}{a:<22.6f}{b:.6f}  ({cb_key})")
    print(f"same predicted class on {agree} of {n} images")
    same = same and agree == n
    print("equal" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
