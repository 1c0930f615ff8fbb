"""Training that must not change silently, and every method's pieces on the run's device.

There is no GPU here, so device placement is checked on the ``meta`` device: a tensor made on
the CPU next to a model on ``meta`` (as a CPU head next to a CUDA model) fails or shows up.
"""

from __future__ import annotations

import fcntl
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import flyp.evaluate
import flyp.probe
import flyp.rundir as rundir
import flyp.train as train_mod
from fakes import error_lines, tiny_overrides
from flyp.cli import main
from flyp.losses import siglip_loss
from flyp.methods import METHODS, Classifier, LossContext, build_classifier
from flyp.models.tiny import TinyCLIP, WordHashTokenizer
from flyp.recipe import load_recipe
from flyp.rundir import LOCK_NAME
from flyp.train import RunError, finetune

META = torch.device("meta")


def tiny_recipe(root, *overrides):
    return load_recipe(None, tiny_overrides(root, *overrides))


def log_lines(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def meta_context():
    return LossContext(WordHashTokenizer(), ["dog", "horse", "house"], ["a {}.", "the {}."])


def tensors_of(module: torch.nn.Module):
    yield from module.parameters()
    yield from module.buffers()
    for value in vars(module).values():
        if isinstance(value, torch.Tensor):
            yield value


# --- every piece a method builds lives on the model's device --------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_classifier_is_built_on_the_models_device(method):
    model = TinyCLIP().to(META)
    ctx = meta_context()
    clf = build_classifier(METHODS[method], model, ctx)
    if clf.head is None:
        clf.refresh_text_head(ctx.tokenizer, ctx.class_names, ctx.templates)
    devices = {t.device for t in tensors_of(clf)}
    assert devices == {META}, devices
    logits = clf(torch.zeros(2, 3, 32, 32))  # CPU images go to the model's device
    assert logits.device == META and logits.shape == (2, 3)


def test_the_probe_head_goes_to_the_models_device(fake_pacs, tmp_path, monkeypatch):
    exp = train_mod.prepare(tiny_recipe(fake_pacs, "train.method=lp"))
    exp.bundle.model.to(META)
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 16)).astype(np.float32)
    labels = np.arange(30) % 3
    monkeypatch.setattr(flyp.probe, "image_features", lambda *a: (features, labels))
    clf = Classifier(exp.bundle.model)
    flyp.probe.fit_probe(clf, exp, tmp_path)
    assert {p.device for p in clf.head.parameters()} == {META}


class OnAccelerator(torch.Tensor):
    """A CPU tensor that behaves like a CUDA one where it matters to scikit-learn."""

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert an accelerator tensor to numpy; use .cpu() first")

    def cpu(self, *args, **kwargs):
        return self.as_subclass(torch.Tensor)


def test_probe_features_come_back_to_the_cpu_for_scikit_learn():
    from flyp.probe import image_features

    model = TinyCLIP()
    encode = model.encode_image
    model.encode_image = lambda x: encode(x).as_subclass(OnAccelerator)
    labels = torch.tensor([0, 1, 2, 0])
    loader = [(torch.zeros(4, 3, 32, 32), labels.as_subclass(OnAccelerator), labels)]
    x, y = image_features(model, loader)
    assert isinstance(x, np.ndarray) and x.shape == (4, 32)
    assert y.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("method", ["zeroshot", "lp"])
def test_runs_that_do_not_train_evaluate_on_the_runs_device(method, fake_pacs, tmp_path, monkeypatch):
    """zeroshot and lp never enter the training loop; their model must still be moved."""
    seen = []
    monkeypatch.setattr(train_mod, "init_distributed", lambda device, *a, **k: train_mod.DistEnv(device=META))
    monkeypatch.setattr(train_mod, "save_weights", lambda *a: None)
    monkeypatch.setattr(
        flyp.probe, "image_features", lambda *a: (np.eye(32, dtype=np.float32)[:9], np.arange(9) % 3)
    )

    def fake_evaluate(classifier, exp, names=None):
        if classifier.head is None:
            b = exp.benchmark
            classifier.refresh_text_head(exp.bundle.tokenizer, b.class_names, b.templates)
            seen.append(classifier.text_head.device)
        seen.extend(t.device for t in tensors_of(classifier))
        sets = {"val": 0, "photo": 0, "art": 0, "sketch": 0}
        return {name: {"accuracy": 0.5, "n": 1} for name in sets}

    monkeypatch.setattr(train_mod, "evaluate_classifier", fake_evaluate)
    finetune(tiny_recipe(fake_pacs, f"train.method={method}"), tmp_path / "run")
    assert seen and set(seen) == {META}


def test_wise_and_soups_keep_the_models_device():
    from flyp.ensemble import greedy_soup, interpolate, uniform_soup

    a, b = TinyCLIP().to(META).state_dict(), TinyCLIP().to(META).state_dict()
    for state in (interpolate(a, b, 0.3), uniform_soup([a, b]), greedy_soup([a, b], lambda s: 0.0)[0]):
        assert {t.device for t in state.values()} == {META}


def test_resume_state_holds_the_cuda_generator(monkeypatch):
    calls = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([7, 8], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: calls.update(state=state, device=device))
    cuda = torch.device("cuda", 0)
    state = rundir.rng_state(cuda)
    assert state["cuda"].tolist() == [7, 8]
    rundir.set_rng_state(state, cuda)
    assert calls["state"].tolist() == [7, 8] and calls["device"] == cuda
    assert "cuda" not in rundir.rng_state(torch.device("cpu"))


def test_resume_state_loads_with_weights_only_and_restores_every_generator(tmp_path):
    import random

    state = rundir.rng_state(torch.device("cpu"))
    torch.save(state, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    expected = (torch.rand(3), random.random(), np.random.rand())
    rundir.set_rng_state(loaded, torch.device("cpu"))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


# --- training that changes silently ---------------------------------------------------------


def test_a_frozen_scale_is_never_clamped(fake_pacs, tmp_path, monkeypatch):
    """ft does not train the temperature: a model that starts above the clamp keeps its scale."""
    recipe = tiny_recipe(fake_pacs, "train.method=ft", "train.epochs=1")
    exp = train_mod.prepare(recipe)
    with torch.no_grad():
        exp.bundle.model.logit_scale.fill_(math.log(150.0))
    finetune(recipe, tmp_path / "run", exp=exp)
    weights = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert weights["model.logit_scale"].item() == torch.tensor(math.log(150.0)).item()


def test_the_clamp_bound_is_the_larger_of_100_and_the_initial_scale(fake_pacs, tmp_path):
    # scale starts at 112 (a SigLIP-like model) and is pushed up hard: it stops at 112
    recipe = tiny_recipe(
        fake_pacs, "train.init_logit_scale=112", "train.logit_scale_lr=10", "train.epochs=1"
    )
    finetune(recipe, tmp_path / "up", exp=None)
    up = load_file(str(tmp_path / "up" / "model.safetensors"))["model.logit_scale"].item()
    assert up <= math.log(112) + 1e-6
    # frozen by a zero learning rate: a scale above 100 is not pulled down to 100
    recipe = tiny_recipe(
        fake_pacs, "train.init_logit_scale=112", "train.logit_scale_lr=0", "train.epochs=1"
    )
    finetune(recipe, tmp_path / "still", exp=None)
    still = load_file(str(tmp_path / "still" / "model.safetensors"))["model.logit_scale"].item()
    assert still == pytest.approx(math.log(112), abs=1e-6)


def test_logit_scale_lr_zero_keeps_the_temperature(fake_pacs, tmp_path):
    finetune(tiny_recipe(fake_pacs, "train.logit_scale_lr=0", "train.epochs=1"), tmp_path / "zero")
    finetune(tiny_recipe(fake_pacs, "train.logit_scale_lr=0.1", "train.epochs=1"), tmp_path / "moves")
    start = TinyCLIP().logit_scale.item()
    zero = load_file(str(tmp_path / "zero" / "model.safetensors"))["model.logit_scale"].item()
    moves = load_file(str(tmp_path / "moves" / "model.safetensors"))["model.logit_scale"].item()
    assert zero == start and moves != start
    temperatures = {line["temperature"] for line in log_lines(tmp_path / "zero") if "loss" in line}
    assert len(temperatures) == 1 and temperatures.pop() == pytest.approx(1 / math.exp(start))


def test_a_run_stopped_at_an_epoch_end_keeps_that_epochs_validation(fake_pacs, tmp_path, monkeypatch):
    scores = iter([0.9, 0.1, 0.2])  # epoch 1 is the best
    monkeypatch.setattr(train_mod, "validation_score", lambda clf, exp: next(scores))
    # 18 training images at batch 6: 3 steps per epoch; stop right after epoch 1's last step
    stopped = finetune(tiny_recipe(fake_pacs, "train.stop_after_steps=3"), tmp_path / "run")
    assert stopped == {"stopped_at_step": 3}
    metrics = finetune(tiny_recipe(fake_pacs), tmp_path / "run", resume=True)
    assert metrics["selected_epoch"] == 1
    vals = [line for line in log_lines(tmp_path / "run") if "val" in line]
    assert [(v["epoch"], v["val"]) for v in vals] == [(1, 0.9), (2, 0.1), (3, 0.2)]


def test_selection_uses_the_benchmarks_headline_metric(fake_pacs, monkeypatch):
    exp = train_mod.prepare(tiny_recipe(fake_pacs))
    exp.benchmark.metric = "macro_f1"
    monkeypatch.setattr(
        flyp.evaluate,
        "evaluate_classifier",
        lambda clf, exp, names=None: {"val": {"accuracy": 0.9, "macro_f1": 0.25}},
    )
    assert flyp.evaluate.validation_score(None, exp) == 0.25


def test_greedy_soup_is_chosen_on_the_headline_metric(fake_pacs, tmp_path, monkeypatch):
    import flyp.compare as compare_mod

    recipe = tiny_recipe(fake_pacs, "train.epochs=1")
    for seed in (0, 1):
        finetune(tiny_recipe(fake_pacs, "train.epochs=1", f"train.seed={seed}"), tmp_path / f"s{seed}")
    exp = train_mod.prepare(recipe)
    pretrained = {k: v.clone() for k, v in exp.bundle.model.state_dict().items()}
    # scripted headline scores: run s1 alone (0.8) beats s0 (0.5) and the soup of both (0.1)
    scores = iter([0.5, 0.8, 0.1])
    monkeypatch.setattr(compare_mod, "validation_score", lambda clf, exp: next(scores))
    compare_mod.make_soups(exp, [tmp_path / "s0", tmp_path / "s1"], tmp_path / "soups", pretrained)
    greedy = json.loads((tmp_path / "soups" / "flyp-soup-greedy" / "metrics.json").read_text())
    assert greedy["kept_runs"] == [str(tmp_path / "s1")]


def test_cross_entropy_logits_are_fp32_under_bf16_autocast():
    model = TinyCLIP()
    ctx = meta_context()
    clf = build_classifier(METHODS["ft"], model, ctx)
    images = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = clf(images)
        features = model.encode_image(images)
    assert features.dtype == torch.bfloat16  # the tower did run in bf16
    assert logits.dtype == torch.float32
    expected = clf.head(F.normalize(features.float(), dim=-1))
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_ce_both_logits_are_fp32_under_bf16_autocast():
    from flyp.methods import compute_loss

    model = TinyCLIP()
    ctx = LossContext(WordHashTokenizer(), ["dog", "horse", "house"], ["a photo of a {}."])
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compute_loss(METHODS["ce-both"], Classifier(model), images, labels, labels, 0, ctx)
        image = model.encode_image(images)
        text = model.encode_text(ctx.tokenizer([f"a photo of a {c}." for c in ctx.class_names]))
    assert image.dtype == text.dtype == torch.bfloat16
    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    expected = F.cross_entropy(model.logit_scale.exp() * image @ text.t(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


def test_sigmoid_loss_with_collisions_by_hand():
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = torch.tensor([0, 0, 1])
    scale, bias = 2.0, -1.0
    z = (scale * img @ txt.t() + bias).tolist()

    def nls(x):  # -log sigmoid(x)
        return math.log1p(math.exp(-x))

    same = [[labels[i] == labels[j] for j in range(3)] for i in range(3)]
    plain = sum(nls(z[i][j]) if i == j else nls(-z[i][j]) for i in range(3) for j in range(3)) / 3
    soft = sum(nls(z[i][j]) if same[i][j] else nls(-z[i][j]) for i in range(3) for j in range(3)) / 3
    mask = sum(
        nls(z[i][j]) if i == j else (0.0 if same[i][j] else nls(-z[i][j]))
        for i in range(3)
        for j in range(3)
    ) / 3
    assert siglip_loss(img, txt, scale, bias).item() == pytest.approx(plain, rel=1e-6)
    assert siglip_loss(img, txt, scale, bias, labels, "soft").item() == pytest.approx(soft, rel=1e-6)
    assert siglip_loss(img, txt, scale, bias, labels, "mask").item() == pytest.approx(mask, rel=1e-6)
    assert len({round(plain, 6), round(soft, 6), round(mask, 6)}) == 3


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_lr(fake_pacs, tmp_path, monkeypatch, capsys):
    real = train_mod.forward_backward
    nan_at = {"call": 4}  # the 5th step

    def diverging(*args, **kwargs):
        loss = real(*args, **kwargs)
        nan_at["call"] -= 1
        return loss * float("nan") if nan_at["call"] == -1 else loss

    monkeypatch.setattr(train_mod, "forward_backward", diverging)
    out = tmp_path / "run"
    (tmp_path / "r.yaml").write_text("name: r\n")
    argv = ["finetune", str(tmp_path / "r.yaml"), "--out", str(out)]
    argv += [f"--set={o}" for o in tiny_overrides(fake_pacs)]
    assert main([*argv, "--set=train.checkpoint_every=2"]) == 2
    err = error_lines(capsys.readouterr().err)  # progress lines aside
    assert len(err) == 1 and "step 5" in err[0] and "train.lr" in err[0] and "0.003" in err[0]
    assert not (out / "metrics.json").exists() and (out / "state.pt").exists()  # resumable
    for line in (out / "log.jsonl").read_text().splitlines():
        assert math.isfinite(json.loads(line).get("loss", 0.0))
    # with no checkpoint yet (the first epoch ends at step 3), nothing is left behind
    nan_at["call"] = 1
    argv[3] = str(tmp_path / "early")
    assert main(argv) == 2
    assert not (tmp_path / "early").exists()


def test_a_huge_learning_rate_is_caught(fake_pacs, tmp_path):
    with pytest.raises(RunError, match=r"the loss is (nan|inf).*lower train.lr"):
        finetune(tiny_recipe(fake_pacs, "train.lr=1e12", "train.grad_clip=null"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --- the run directory ----------------------------------------------------------------------


def test_two_runs_cannot_share_a_run_directory(fake_pacs, tmp_path):
    run_dir = tmp_path / "run"
    assert finetune(tiny_recipe(fake_pacs, "train.stop_after_steps=2"), run_dir) == {
        "stopped_at_step": 2
    }
    before = sorted(p.name for p in run_dir.iterdir())
    with open(run_dir / LOCK_NAME, "a+") as held:  # another process is running there
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunError, match="in use by another flyp process"):
            finetune(tiny_recipe(fake_pacs), run_dir, resume=True)
        with pytest.raises(RunError, match="in use by another flyp process"):
            finetune(tiny_recipe(fake_pacs), tmp_path / "run")
    # the refused runs wrote nothing (the lock file was the holder's, and it ends with the run)
    assert sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_NAME) == before
    finetune(tiny_recipe(fake_pacs), run_dir, resume=True)  # free again: it finishes
    assert (run_dir / "metrics.json").exists()
    with pytest.raises(RunError, match="not empty"):
        finetune(tiny_recipe(fake_pacs), run_dir)


def test_a_run_killed_before_its_first_checkpoint_restarts_on_resume(fake_pacs, tmp_path):
    recipe = tiny_recipe(fake_pacs, "train.epochs=1", "train.select_on=last")
    full = finetune(recipe, tmp_path / "full")
    # what a SIGKILL during the first steps leaves: the recipe and a partial log
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "recipe.yaml").write_text((tmp_path / "full" / "recipe.yaml").read_text())
    (killed / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    resumed = finetune(recipe, killed, resume=True)
    assert resumed["sets"] == full["sets"]
    assert log_lines(killed) == log_lines(tmp_path / "full")


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter")
@pytest.mark.parametrize("command", ["evaluate", "wise"])
def test_evaluate_and_wise_run_on_the_recipes_device(command, fake_pacs, tmp_path, monkeypatch):
    import flyp.compare
    import flyp.distributed

    run = tmp_path / "run"
    finetune(tiny_recipe(fake_pacs, "train.method=ft", "train.epochs=1"), run)
    seen = []

    def spy(classifier, exp, names=None):
        seen.extend(t.device for t in tensors_of(classifier))
        raise SystemExit(0)  # the device is all this test is about

    monkeypatch.setattr(flyp.distributed, "pick_device", lambda device, local_rank=0: META)
    monkeypatch.setattr(flyp.evaluate, "evaluate_classifier", spy)
    monkeypatch.setattr(flyp.compare, "evaluate_states", lambda clf, exp, states: spy(clf, exp))
    monkeypatch.setattr(flyp.compare, "load_weights", lambda *a: None)  # meta holds no values
    monkeypatch.setattr("flyp.checkpoint.load_weights", lambda *a: None)
    argv = ["evaluate", str(run)] if command == "evaluate" else ["wise", str(run), "--alphas", "0.5"]
    with pytest.raises(SystemExit):
        main(argv)
    assert seen and set(seen) == {META}
