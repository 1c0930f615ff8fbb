"""flyp predict and flyp.load_classifier: a finished run used on new images, from its weights
file alone; zeroshot and lp runs store only what they changed."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import flyp
from fakes import COLOURS, make_domains, tf32_atol, tiny_overrides
from flyp.checkpoint import CheckpointError, load_weights, read_metadata, save_weights
from flyp.cli import main
from flyp.data.loader import ImageDataset, eval_loader
from flyp.data.templates import SIMPLE
from flyp.evaluate import predict
from flyp.methods import build_classifier, get_method
from flyp.recipe import load_recipe
from flyp.train import finetune, loss_context, prepare

CLASSES = ["dog", "horse", "house"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One data tree and a flyp, an lp and a zeroshot run on it (tiny model)."""
    base = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYP_CACHE", str(base / "cache"))
        root = make_domains(base / "data", ["photo", "art", "sketch"], CLASSES, per_class=12)
        for method in ("flyp", "lp", "zeroshot"):
            recipe = load_recipe(None, tiny_overrides(root, f"train.method={method}"))
            finetune(recipe, base / method)
    return base


def _rank1(csv_path: Path) -> dict[str, list[tuple[str, float]]]:
    rows: dict[str, list[tuple[str, float]]] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            rows.setdefault(row["path"], []).append((row["class"], float(row["probability"])))
    return rows


@pytest.mark.parametrize("method", ["flyp", "lp"])
def test_predict_top1_equals_what_evaluate_predicts(runs, method, tmp_path, capsys):
    """`flyp predict` on the ID test images gives, image for image, the class the evaluation
    (flyp evaluate's path: recipe, fresh model, weights) predicts."""
    run = runs / method
    recipe = load_recipe(run / "recipe.yaml")
    exp = prepare(recipe)
    classifier = build_classifier(get_method(method), exp.bundle.model, loss_context(exp))
    load_weights(classifier, run / "model.safetensors")
    classifier.refresh_text_head(exp.bundle.tokenizer, CLASSES, exp.benchmark.templates)
    samples = exp.benchmark.tests["photo"]
    loader = eval_loader(ImageDataset(samples, exp.bundle.eval_transform), 64, 0)
    classifier.eval()
    preds, labels = predict(classifier, loader)
    with torch.no_grad():
        probs = F.softmax(torch.cat([classifier(x) for x, _, _ in loader]), dim=-1)
    paths = [s.path for s in samples]

    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run), *paths, "--top-k", "3", "--out", str(out)]) == 0
    rows = _rank1(out)
    assert list(rows) == paths
    assert [rows[p][0][0] for p in paths] == [CLASSES[i] for i in preds]
    # the run's own ID accuracy, recomputed from predict's top-1
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.mean(preds == labels) == metrics["sets"]["photo"]["accuracy"]
    # top-3 of 3 classes: every class once, probabilities a softmax (sum 1, descending)
    for p, expected in zip(paths, probs, strict=True):
        assert sorted(c for c, _ in rows[p]) == CLASSES
        for name, q in rows[p]:  # the evaluation's softmax, to the CSV's 6 decimals
            assert q == pytest.approx(float(expected[CLASSES.index(name)]), abs=tf32_atol(2e-6))
        probs = [q for _, q in rows[p]]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) == pytest.approx(1.0, abs=3e-6)
    printed = capsys.readouterr().out
    assert f"{len(paths)} images classified, 0 skipped" in printed


def test_load_classifier_from_the_weights_file_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("FLYP_CACHE", str(tmp_path / "cache"))
    root = make_domains(tmp_path / "data", ["photo", "art", "sketch"], CLASSES, per_class=12)
    run = tmp_path / "run"
    finetune(load_recipe(None, tiny_overrides(root, "train.epochs=1")), run)
    images = [Image.open(s).convert("RGB") for s in sorted((root / "art").rglob("*.png"))[::4]]
    before = flyp.load_classifier(run).predict(images, top_k=3)

    weights = tmp_path / "elsewhere" / "weights.safetensors"
    weights.parent.mkdir()
    shutil.move(run / "model.safetensors", weights)
    shutil.rmtree(run)
    shutil.rmtree(root)
    clf = flyp.load_classifier(weights)
    assert clf.predict(images, top_k=3) == before
    meta = read_metadata(weights)
    assert meta == {
        "format": 1,
        "model_spec": "tiny",
        "image_size": 32,
        "context_length": None,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "class_names": CLASSES,
        "templates": SIMPLE,
        "head": "zeroshot-text",
        "method": "flyp",
        "metric": "accuracy",
        "tensors": "full",
        "eval_precision": "auto",  # what predict resolves as the run's evaluation did
        "eval_precision_used": "fp32",  # auto on the tests' pinned hardware (conftest)
    }
    assert clf.class_names == CLASSES and clf.head == "zeroshot-text"


def test_weights_without_metadata_name_the_file_and_load_from_the_run_dir(runs, tmp_path):
    run = tmp_path / "old-run"
    shutil.copytree(runs / "flyp", run)
    weights = run / "model.safetensors"
    save_file(load_file(str(weights)), str(weights))  # as an older flyp wrote it: no metadata
    assert read_metadata(weights) is None
    with pytest.raises(CheckpointError) as err:
        flyp.load_classifier(weights)
    assert str(err.value).startswith(f"{weights} carries no flyp metadata")
    assert "pass its run directory instead" in str(err.value)
    image = Image.open(next((runs / "data" / "photo" / "dog").glob("*.png")))
    # the run directory's recipe.yaml (and its data) stand in for the metadata
    old = flyp.load_classifier(run).predict(image)
    assert old == flyp.load_classifier(runs / "flyp").predict(image)


@pytest.mark.parametrize(
    "method, names",
    # lp's text tower is the random tiny one: these names are ones it tells apart
    [("flyp", ["horse", "house", "dog", "zebra"]), ("lp", ["a", "b", "c", "d", "e", "f"])],
)
def test_new_class_names_classify_as_the_text_tower_says(runs, method, names, tmp_path):
    """with_classes / --classes: logits = temperature x cosine(image, mean of the templates'
    unit text features), worked out here from the model itself."""
    clf = flyp.load_classifier(runs / method)
    templates = ["a photo of a {}.", "{}"]
    new = clf.with_classes(names, templates)
    assert new.head == "zeroshot-text" and new.class_names == names
    paths = sorted(str(p) for p in (runs / "data").rglob("*.png"))

    model, bundle = clf.classifier.model, clf.bundle
    with torch.no_grad():
        pixels = torch.stack([bundle.eval_transform(Image.open(p).convert("RGB")) for p in paths])
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = torch.stack(
            [
                F.normalize(
                    F.normalize(
                        model.encode_text(bundle.tokenizer([t.format(n) for t in templates])),
                        dim=-1,
                    ).mean(0),
                    dim=-1,
                )
                for n in names
            ]
        )
        expected = F.softmax(model.logit_scale.exp() * image @ text.t(), dim=-1)
    top1 = [names[i] for i in expected.argmax(1)]
    assert len(set(top1)) > 1  # the new names do sort these images

    got = new.predict(paths, top_k=len(names))
    assert [g[0][0] for g in got] == top1
    for row, probs in zip(got, expected, strict=True):
        for name, p in row:
            assert p == pytest.approx(float(probs[names.index(name)]), abs=1e-5)
    # encode_image / encode_text are the same unit features
    torch.testing.assert_close(new.encode_image(paths), image, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        new.encode_text(["a photo of a zebra."]),
        F.normalize(model.encode_text(bundle.tokenizer(["a photo of a zebra."])), dim=-1),
        rtol=0,
        atol=1e-6,
    )

    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    out = tmp_path / "new.csv"
    args = ["predict", str(runs / method), *paths, "--classes", ",".join(names)]
    assert (
        main([*args, "--templates-file", str(tmp_path / "templates.txt"), "--out", str(out)]) == 0
    )
    assert [_rank1(out)[p][0][0] for p in paths] == top1


def test_zeroshot_and_lp_store_only_what_they_changed(runs, tmp_path):
    full = (runs / "flyp" / "model.safetensors").stat().st_size
    expected_keys = {
        "lp": {"head.weight", "head.bias", "model.logit_scale"},
        "zeroshot": {"model.logit_scale"},
    }
    for method, keys in expected_keys.items():
        weights = runs / method / "model.safetensors"
        with safe_open(str(weights), "pt") as f:
            assert set(f.keys()) == keys
        assert read_metadata(weights)["tensors"] == "changed"
        assert weights.stat().st_size < full / 50
        # flyp evaluate (pretrained towers from the spec + the stored tensors) gives the run's
        # own metrics, set for set
        out = tmp_path / f"{method}.json"
        assert main(["evaluate", str(runs / method), "--out", str(out)]) == 0
        assert (
            json.loads(out.read_text())["sets"]
            == json.loads((runs / method / "metrics.json").read_text())["sets"]
        )
    assert read_metadata(runs / "flyp" / "model.safetensors")["tensors"] == "full"
    # WiSE-FT of the lp run: its zero-shot end is the zeroshot run
    run = tmp_path / "lp"
    shutil.copytree(runs / "lp", run)
    assert main(["wise", str(run), "--alphas", "0", "0.5", "1"]) == 0
    points = json.loads((run / "wise.json").read_text())["points"]
    zeroshot = json.loads((runs / "zeroshot" / "metrics.json").read_text())["sets"]
    assert [p["alpha"] for p in points] == [0.0, 0.5, 1.0]
    assert points[0]["sets"].keys() == zeroshot.keys()
    for name, values in zeroshot.items():  # the same argmax; calibration floats to rounding
        assert points[0]["sets"][name] == pytest.approx(values, rel=1e-5, abs=1e-7), name


def test_a_partial_file_without_the_changed_mark_is_refused(runs, tmp_path):
    lp = runs / "lp" / "model.safetensors"
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(str(lp)), str(stripped))  # the same tensors, no metadata
    clf = flyp.load_classifier(runs / "lp").classifier
    with pytest.raises(CheckpointError, match=r"does not fit this model: missing \['model\."):
        load_weights(clf, stripped)
    with pytest.raises(ValueError, match="needs metadata tensors='changed'"):
        save_weights(clf, tmp_path / "x.safetensors", {"tensors": "full"}, keep=lambda k: True)


def _image_files(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Pairs (image in an unusual mode, the same picture as 8-bit RGB)."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    rgb = np.clip(np.array(COLOURS[1]) + rng.normal(0, 25, (24, 24, 3)), 0, 255).astype(np.uint8)
    grey = rgb.mean(-1).astype(np.uint8)
    pairs = {}

    def pair(name: str, img: Image.Image, suffix: str, reference: np.ndarray) -> None:
        img.save(folder / f"{name}{suffix}")
        Image.fromarray(reference).save(folder / f"{name}-ref.png")
        pairs[name] = (folder / f"{name}{suffix}", folder / f"{name}-ref.png")

    pair("grey", Image.fromarray(grey), ".png", np.stack([grey] * 3, -1))
    pair("cmyk", Image.fromarray(rgb).convert("CMYK"), ".tif", rgb)
    pair("16bit", Image.fromarray(grey.astype(np.uint16) * 257), ".png", np.stack([grey] * 3, -1))
    alpha = np.full((24, 24, 1), 255, np.uint8)
    alpha[:12] = 0  # transparent top half: composited on white
    seen = rgb.copy()
    seen[:12] = 255
    pair("rgba", Image.fromarray(np.concatenate([rgb, alpha], -1)), ".png", seen)
    return pairs


def test_any_image_mode_is_seen_as_its_rgb_picture(runs, tmp_path, capsys):
    pairs = _image_files(tmp_path / "modes")
    assert Image.open(pairs["16bit"][0]).mode in ("I;16", "I")
    assert Image.open(pairs["cmyk"][0]).mode == "CMYK"
    out = tmp_path / "modes.csv"
    assert main(["predict", str(runs / "flyp"), str(tmp_path / "modes"), "--out", str(out)]) == 0
    rows = _rank1(out)
    assert len(rows) == 8
    for name, (odd, reference) in pairs.items():
        assert rows[str(odd)] == rows[str(reference)], name


def test_unreadable_files_are_listed_and_skipped(runs, tmp_path, capsys):
    folder = tmp_path / "mixed"
    shutil.copytree(runs / "data" / "photo" / "dog", folder)
    (folder / "notes.png").write_text("not an image")
    truncated = (runs / "data" / "photo" / "horse" / "000.png").read_bytes()[:60]
    (folder / "cut.png").write_bytes(truncated)
    listing = tmp_path / "list.csv"
    listing.write_text("path,comment\nmixed/000.png,ok\nmissing.jpg,gone\n")
    out = tmp_path / "p.csv"
    args = ["predict", str(runs / "flyp"), str(folder), str(listing), "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped ")]
    assert sorted(line.split(": ")[0] for line in skipped) == sorted(
        [
            f"skipped {folder / 'cut.png'}",
            f"skipped {folder / 'notes.png'}",
            f"skipped {tmp_path / 'missing.jpg'}",
        ]
    )
    assert "13 images classified, 3 skipped" in captured.out
    assert len(_rank1(out)) == 12  # mixed/000.png twice: one row set per path
    # nothing readable: one error line, exit 2, no CSV
    out.unlink()
    args = ["predict", str(runs / "flyp"), str(folder / "notes.png"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error: no image could be classified (1 skipped, listed above)" in err
    assert not out.exists()
