"""flyp export: a finetuned run loads in open_clip / transformers with flyp's own features.

Each test trains a tiny model for one epoch, exports it, loads the export with the library's
own entry point and compares features with flyp's model (weights loaded from the run) on the
same inputs. The pretrained model's features are compared too: exporting the pretrained
weights instead of the finetuned ones must fail the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from fakes import make_domains, make_tiny_hf
from flyp.checkpoint import load_weights
from flyp.export import ExportError, export_run
from flyp.methods import Classifier, get_method
from flyp.models import load_model
from flyp.recipe import load_recipe
from flyp.train import finetune

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = ["cat", "dog"]  # sorted, as flyp lists class folders
CAPTIONS = ["a photo of a dog.", "a cat on a mat, seen from far away."]
TOL = 1e-5


def _data(folder: Path) -> Path:
    return make_domains(folder, ["photo", "sketch"], CLASSES, per_class=4, size=32)


def _train(tmp: Path, spec: str, method: str = "flyp", name: str = "run", *extra: str) -> Path:
    recipe = load_recipe(
        None,
        [
            f"model.spec={spec}",
            *extra,
            "data.benchmark=folders",
            f"data.root={_data(tmp / 'data')}",
            "data.id_domain=photo",
            "data.ood_domains=[sketch]",
            "data.val_fraction=0.25",
            "data.test_fraction=0.25",
            f"train.method={method}",
            "train.epochs=1",
            "train.batch_size=4",
            "train.lr=1e-2",
            "train.warmup_steps=0",
            "train.select_on=last",
        ],
    )
    finetune(recipe, tmp / name)
    return tmp / name


def _flyp_model(run_dir: Path):
    """The run's model as flyp itself loads it (what `flyp evaluate` uses)."""
    recipe = load_recipe(run_dir / "recipe.yaml")
    bundle = load_model(recipe.model.spec, recipe.model.image_size, recipe.model.context_length)
    linear = get_method(recipe.train.method).linear_head
    head = torch.nn.Linear(TINY_VIT["embed_dim"], len(CLASSES)) if linear else None
    classifier = Classifier(bundle.model, head)
    load_weights(classifier, run_dir / "model.safetensors")
    return bundle, classifier.eval()


def _images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# ---------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def open_clip_runs(tmp_path_factory):
    """A pretrained checkpoint (seeded random tiny ViT) and flyp / ft runs finetuned from it."""
    tmp = tmp_path_factory.mktemp("oc")
    config = tmp / "flyp-export-vit.json"
    config.write_text(json.dumps(TINY_VIT))
    torch.manual_seed(0)
    pretrained = tmp / "pretrained.pt"
    torch.save(load_model(f"open_clip:{config}").model.state_dict(), pretrained)
    spec = f"open_clip:{config}:{pretrained}"
    return {
        "spec": spec,
        "flyp": _train(tmp, spec, "flyp", "flyp-run"),
        "ft": _train(tmp, spec, "ft", "ft-run"),
    }


def _open_clip_features(model, images):
    tokens = open_clip.get_tokenizer("flyp-export-vit")(CAPTIONS)  # full 77-token context
    model.eval()
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


def test_open_clip_export_gives_flyps_features(open_clip_runs, tmp_path):
    run = open_clip_runs["flyp"]
    out = export_run(run, "open_clip", tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "flyp-export-vit.json",
        "flyp_export.json",
        "open_clip_config.json",
        "open_clip_pytorch_model.bin",
    ]
    bundle, classifier = _flyp_model(run)
    images = _images()
    with torch.no_grad():  # flyp's own path: its trimmed tokenizer and encode_text
        ours = (
            bundle.model.encode_image(images),
            bundle.model.encode_text(bundle.tokenizer(CAPTIONS)),
        )

    # the way the issue names: an architecture registered from the config copy + the file
    open_clip.add_model_config(out / "flyp-export-vit.json")
    by_name, _, _ = open_clip.create_model_and_transforms(
        "flyp-export-vit", pretrained=str(out / "open_clip_pytorch_model.bin")
    )
    # and open_clip's self-contained folder loader, with the run's preprocessing
    by_dir, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    for model in (by_name, by_dir):
        image, text = _open_clip_features(model, images)
        assert _gap(image, ours[0]) <= TOL and _gap(text, ours[1]) <= TOL
    picture = Image.new("RGB", (40, 30), (200, 30, 90))
    assert torch.equal(preprocess(picture), bundle.eval_transform(picture))

    # the finetuned weights, not the pretrained ones, went out
    pretrained = load_model(open_clip_runs["spec"]).model
    before = _open_clip_features(pretrained, images)
    assert _gap(before[0], ours[0]) > 1e-3 and _gap(before[1], ours[1]) > 1e-3
    state = torch.load(out / "open_clip_pytorch_model.bin", weights_only=True)
    assert set(state) == set(pretrained.state_dict())  # open_clip's names, no "model." prefix
    info = json.loads((out / "flyp_export.json").read_text())
    assert info["arch"] == "flyp-export-vit" and info["method"] == "flyp"
    assert info["class_names"] == CLASSES and info["templates"] == ["a photo of a {}."]
    assert "head" not in info


def test_linear_head_is_written_beside_the_open_clip_model(open_clip_runs, tmp_path):
    run = open_clip_runs["ft"]
    out = export_run(run, "open_clip", tmp_path / "export")
    _, classifier = _flyp_model(run)
    head = load_file(str(out / "head.safetensors"))
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    images = _images()
    with torch.no_grad():
        features = F.normalize(model.encode_image(images), dim=-1)
        assert _gap(features @ head["weight"].T + head["bias"], classifier(images)) <= TOL
    assert torch.equal(head["weight"], classifier.head.weight)
    info = json.loads((out / "flyp_export.json").read_text())
    assert info["head"] == "head.safetensors" and info["class_names"] == CLASSES
    assert "head.safetensors" in (out / "README.md").read_text()


def test_a_run_at_another_image_size_exports_that_size(open_clip_runs, tmp_path):
    run = _train(tmp_path, open_clip_runs["spec"], "flyp", "run48", "model.image_size=48")
    out = export_run(run, "open_clip", tmp_path / "export")
    bundle, _ = _flyp_model(run)
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = bundle.model.encode_image(images)
    by_dir, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    by_name, _, _ = open_clip.create_model_and_transforms(
        "flyp-export-vit", pretrained=str(out / "open_clip_pytorch_model.bin"), force_image_size=48
    )
    for model in (by_dir, by_name):
        assert _gap(_open_clip_features(model, images)[0], ours) <= TOL
    assert preprocess(Image.new("RGB", (60, 50))).shape == (3, 48, 48)
    assert "force_image_size=48" in (out / "README.md").read_text()


# ---------------------------------------------------------------- Hugging Face


def _tiny_hf(kind: str, folder: Path) -> Path:
    return make_tiny_hf(kind, folder, image_processor=True)


def _features(output) -> torch.Tensor:
    """transformers 5 returns the projected features as pooler_output; 4 returned a tensor."""
    return getattr(output, "pooler_output", output)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_export_gives_flyps_features_offline(kind, tmp_path):
    source = _tiny_hf(kind, tmp_path / kind)
    run = _train(tmp_path, f"hf:{source}")
    out = export_run(run, "hf", tmp_path / "export")
    bundle, _ = _flyp_model(run)
    cls = transformers.CLIPModel if kind == "clip" else transformers.SiglipModel
    exported = cls.from_pretrained(out, local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    tokens = bundle.tokenizer(CAPTIONS)
    assert torch.equal(
        tokens[:, :5], tokenizer(CAPTIONS, return_tensors="pt", padding=True)["input_ids"][:, :5]
    )
    images = _images()
    with torch.no_grad():
        ours = bundle.model.encode_image(images), bundle.model.encode_text(tokens)
        theirs = (
            _features(exported.get_image_features(pixel_values=images)),
            _features(exported.get_text_features(input_ids=tokens)),
        )
        original = cls.from_pretrained(source, local_files_only=True).eval()
        before = _features(original.get_image_features(pixel_values=images))
    assert _gap(theirs[0], ours[0]) <= TOL and _gap(theirs[1], ours[1]) <= TOL
    assert _gap(before, ours[0]) > 1e-3  # the finetuned weights went out, not the source's
    if kind == "clip":  # the source's processor files came along
        processor = transformers.CLIPProcessor.from_pretrained(out, local_files_only=True)
        assert processor.image_processor.crop_size == {"height": 32, "width": 32}
    info = json.loads((out / "flyp_export.json").read_text())
    assert info["model_class"] == cls.__name__ and info["class_names"] == CLASSES


# ---------------------------------------------------------------- flyp's own format and errors


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("tiny"), "tiny")


def test_tiny_model_exports_to_flyps_own_format(tiny_run, tmp_path):
    out = export_run(tiny_run, "flyp", tmp_path / "export")
    for name in ("recipe.yaml", "model.safetensors", "metrics.json"):
        assert (out / name).read_bytes() == (tiny_run / name).read_bytes()
    assert json.loads((out / "flyp_export.json").read_text())["format"] == "flyp"


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_tiny_model_refuses_library_formats_naming_flyps_own(fmt, tiny_run, tmp_path):
    with pytest.raises(ExportError) as err:
        export_run(tiny_run, fmt, tmp_path / "export")
    assert str(err.value) == (
        f"{tiny_run} was trained from model.spec=tiny, which neither open_clip nor transformers "
        "can load; export it with --format flyp (model.safetensors + recipe.yaml, which flyp "
        "evaluate loads)"
    )
    assert not (tmp_path / "export").exists()


def test_open_clip_run_refuses_hf_format(open_clip_runs, tmp_path):
    with pytest.raises(
        ExportError, match="holds a open_clip model .* export it with --format open_clip"
    ):
        export_run(open_clip_runs["flyp"], "hf", tmp_path / "export")


def test_bad_calls_get_one_line_each(tiny_run, tmp_path):
    cases = {
        ("onnx", tiny_run): "unknown export format 'onnx'; choose one of open_clip, hf, flyp",
        ("flyp", tmp_path / "nope"): f"run directory {tmp_path / 'nope'} does not exist",
    }
    for (fmt, run), message in cases.items():
        with pytest.raises(ExportError, match="^" + message.replace("(", r"\(")):
            export_run(run, fmt, tmp_path / "export")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_bytes((tiny_run / "recipe.yaml").read_bytes())
    with pytest.raises(ExportError) as err:
        export_run(unfinished, "flyp", tmp_path / "export")
    assert str(err.value) == (
        f"{unfinished} is not a finished run (no model.safetensors); finish it first: "
        f"flyp finetune --resume {unfinished}"
    )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(ExportError) as err:
        export_run(tiny_run, "flyp", busy)
    assert str(err.value) == f"--out {busy} exists and is not empty; pass a new or empty folder"
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_an_empty_out_folder_is_used(tiny_run, tmp_path):
    (tmp_path / "export").mkdir()
    out = export_run(tiny_run, "flyp", tmp_path / "export")
    assert (out / "model.safetensors").is_file()


def test_a_failed_export_leaves_nothing(open_clip_runs, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=f"no space left on the device while exporting to {out};"):
        export_run(open_clip_runs["flyp"], "open_clip", out)
    assert list(tmp_path.iterdir()) == []


def test_flyp_export_readme_python_loads_and_predicts_as_the_run(tiny_run, tmp_path):
    """The export's README shows flyp.load_classifier(OUT) (issue 23): its Python block, run
    as written with OUT and the image filled in, predicts what the run itself predicts."""
    import re

    import flyp

    out = export_run(tiny_run, "flyp", tmp_path / "export")
    readme = (out / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", readme, flags=re.S)
    assert block, readme
    assert "flyp.load_classifier" in block.group(1) and "load_weights" not in readme
    image = next((tiny_run.parent / "data" / "sketch").glob("*/*.png"))
    code = block.group(1).replace('"OUT"', repr(str(out))).replace('"image.jpg"', repr(str(image)))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # prints the prediction
    expected = flyp.load_classifier(tiny_run).predict([str(image)], top_k=3)
    assert namespace["clf"].predict([str(image)], top_k=3) == expected
