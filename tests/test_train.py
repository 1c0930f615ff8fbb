import json

import pytest
import torch
from safetensors.torch import load_file

from fakes import checkpoint_weights, tiny_overrides
from flyp.methods import METHODS
from flyp.models import load_model
from flyp.recipe import RecipeError, load_recipe
from flyp.train import RunError, finetune


def tiny_recipe(root, *overrides):
    return load_recipe(None, tiny_overrides(root, *overrides))


def losses(run_dir):
    lines = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


@pytest.mark.slow
def test_flyp_lowers_loss_and_raises_training_accuracy(fake_pacs, tmp_path):
    from flyp.checkpoint import load_weights
    from flyp.data import build_benchmark
    from flyp.data.loader import ImageDataset, eval_loader
    from flyp.evaluate import evaluate_sets
    from flyp.methods import Classifier

    recipe = tiny_recipe(fake_pacs, "train.epochs=8", "train.select_on=last")
    metrics = finetune(recipe, tmp_path / "run")
    loss = losses(tmp_path / "run")
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.2

    bench = build_benchmark(recipe.data)
    loader = {
        "train": eval_loader(ImageDataset(bench.train, load_model("tiny").eval_transform), 64, 0)
    }

    def train_accuracy(weights=None):
        bundle = load_model("tiny")
        clf = Classifier(bundle.model)
        if weights:
            load_weights(clf, weights)
        clf.refresh_text_head(bundle.tokenizer, bench.class_names, bench.templates)
        return evaluate_sets(clf, loader, 3)["train"]["accuracy"]

    before, after = train_accuracy(), train_accuracy(tmp_path / "run" / "model.safetensors")
    assert after > before + 0.2 and after >= 0.9
    assert metrics["sets"]["photo"]["n"] == 9 and metrics["id_name"] == "photo"
    assert metrics["ood_mean"] == pytest.approx(
        (metrics["sets"]["art"]["accuracy"] + metrics["sets"]["sketch"]["accuracy"]) / 2
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "speed",
    [(), ("train.precision=bf16", "eval.precision=bf16", "train.fused_optimizer=false")],
    ids=["defaults", "bf16"],
)
def test_resume_equals_uninterrupted(fake_pacs, tmp_path, speed):
    """Compared on the final weights: with selection on validation the saved weights could be
    an epoch chosen before the interruption, equal whether or not the resume worked. The
    speed options (fused AdamW, decoded images, distinct captions; bf16) keep resume exact."""
    # text dropout on: the resumed run must also replay the random stream
    args = ("train.checkpoint_every=2", "model.spec=tiny:0.5", "train.select_on=last", *speed)
    recipe = tiny_recipe(fake_pacs, *args)
    full = finetune(recipe, tmp_path / "full")
    stopped = finetune(
        tiny_recipe(fake_pacs, *args, "train.stop_after_steps=4"), tmp_path / "resumed"
    )
    assert stopped == {"stopped_at_step": 4}
    assert (tmp_path / "resumed" / "state.pt").exists() and not (
        tmp_path / "resumed" / "metrics.json"
    ).exists()
    at_stop = checkpoint_weights(tmp_path / "resumed")
    resumed = finetune(recipe, tmp_path / "resumed", resume=True)
    assert full["selected_epoch"] == resumed["selected_epoch"] == 3
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    # the 5 steps after the interruption moved the weights: the comparison above saw them
    assert not torch.equal(at_stop["model.visual.0.weight"], b["model.visual.0.weight"])
    assert losses(tmp_path / "full") == losses(tmp_path / "resumed")
    assert len(losses(tmp_path / "resumed")) == 9
    assert resumed["sets"] == full["sets"]
    assert not (tmp_path / "resumed" / "state.pt").exists()


def test_run_dir_guards(fake_pacs, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "something").write_text("x")
    with pytest.raises(RunError, match="not empty"):
        finetune(tiny_recipe(fake_pacs), tmp_path / "used")
    with pytest.raises(RunError, match="nothing to resume"):
        finetune(tiny_recipe(fake_pacs), tmp_path / "fresh", resume=True)


def test_batch_larger_than_data_is_refused(fake_pacs, tmp_path):
    with pytest.raises(RunError, match="lower train.batch_size"):
        finetune(tiny_recipe(fake_pacs, "train.batch_size=500"), tmp_path / "run")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_end_to_end(method, fake_pacs, tmp_path):
    metrics = finetune(
        tiny_recipe(fake_pacs, f"train.method={method}", "train.epochs=1"), tmp_path / method
    )
    assert set(metrics["sets"]) == {"val", "photo", "art", "sketch"}
    sets = metrics["sets"]
    assert metrics["id"] == sets["photo"]["accuracy"] and sets["photo"]["n"] == 9
    ood = (sets["art"]["accuracy"] + sets["sketch"]["accuracy"]) / 2
    assert metrics["ood_mean"] == pytest.approx(ood)
    assert metrics["selected_epoch"] == (0 if METHODS[method].objective == "none" else 1)
    # the towers move exactly when the method trains them
    pretrained = load_model("tiny").model.state_dict()
    weights = load_file(str(tmp_path / method / "model.safetensors"))
    if METHODS[method].objective == "none":  # only what it set is stored; towers = the spec's
        assert "model.visual.0.weight" not in weights
    else:
        assert not torch.equal(weights["model.visual.0.weight"], pretrained["visual.0.weight"])
    assert (tmp_path / method / "model.safetensors").exists()
    assert (tmp_path / method / "recipe.yaml").exists()


def test_evaluation_images_are_decoded_once_and_reused(fake_pacs, tmp_path):
    import shutil

    from flyp.methods import Classifier
    from flyp.train import evaluate_classifier, prepare

    exp = prepare(tiny_recipe(fake_pacs))
    clf = Classifier(exp.bundle.model)
    first = evaluate_classifier(clf, exp)
    assert set(exp.eval_cache) == {"val", "photo", "art", "sketch"}
    shutil.rmtree(fake_pacs)  # a second pass must not touch the files
    assert evaluate_classifier(clf, exp) == first
    uncached = prepare(
        tiny_recipe(tmp_path / "gone", "eval.cache_gb=0"),
        bundle=exp.bundle,
        benchmark=exp.benchmark,
    )
    with pytest.raises(Exception, match="cannot read image"):
        evaluate_classifier(clf, uncached)


def test_sigmoid_loss_needs_a_sigmoid_model(fake_pacs, tmp_path):
    with pytest.raises(RunError, match="needs a model with a logit_bias"):
        finetune(tiny_recipe(fake_pacs, "train.contrastive_loss=siglip"), tmp_path / "run")
    with pytest.raises(RecipeError, match="'hinge' is not one of auto, clip, siglip"):
        tiny_recipe(fake_pacs, "train.contrastive_loss=hinge")  # refused when the recipe loads
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_run_does_not_depend_on_who_loaded_the_model(fake_pacs, tmp_path):
    """flyp compare loads the model once and passes it in; the tiny model has dropout, so the
    random stream at the first step must not depend on what was drawn before finetune()."""
    from flyp.train import prepare

    recipe = tiny_recipe(fake_pacs, "train.epochs=1", "model.spec=tiny:0.5")
    finetune(recipe, tmp_path / "alone")
    exp = prepare(recipe)
    torch.rand(1000)  # draws made by the caller before the run
    finetune(recipe, tmp_path / "shared", exp=exp)
    a = load_file(str(tmp_path / "alone" / "model.safetensors"))
    b = load_file(str(tmp_path / "shared" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
