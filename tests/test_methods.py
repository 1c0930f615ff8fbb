import json

import numpy as np
import pytest
import torch
from PIL import Image

from flyp.cli import main
from flyp.compare import compare
from flyp.ensemble import greedy_soup, interpolate, uniform_soup
from flyp.methods import l2sp_penalty
from flyp.models.tiny import TinyCLIP
from flyp.probe import C_GRID, choose_c, probe_to_linear
from test_train import tiny_recipe


def test_wise_endpoints_equal_the_two_models_weight_for_weight():
    zs, ft = (
        TinyCLIP().state_dict(),
        {k: v + 1 if v.is_floating_point() else v + 3 for k, v in TinyCLIP().state_dict().items()},
    )
    at0, at1 = interpolate(zs, ft, 0.0), interpolate(zs, ft, 1.0)
    for key in zs:
        if zs[key].is_floating_point():
            assert torch.equal(at0[key], zs[key]), key
            assert torch.equal(at1[key], ft[key]), key
    half = interpolate(zs, ft, 0.5)
    assert torch.allclose(half["logit_scale"], (zs["logit_scale"] + ft["logit_scale"]) / 2)
    with pytest.raises(ValueError, match="differ in their weights"):
        interpolate(zs, {k: v for k, v in ft.items() if k != "logit_scale"}, 0.5)


def test_soups():
    a, b, c = ({"w": torch.tensor([x])} for x in (1.0, 3.0, 100.0))
    assert torch.equal(uniform_soup([a, b])["w"], torch.tensor([2.0]))
    # validation prefers weights near 2: a (1) and b (3) help, c (100) hurts
    score = lambda s: -abs(float(s["w"]) - 2.0)  # noqa: E731
    soup, kept = greedy_soup([c, a, b], score)
    assert sorted(kept) == [1, 2] and torch.equal(soup["w"], torch.tensor([2.0]))


def test_l2sp_penalty_zero_at_init_and_gradient_by_hand():
    model = torch.nn.Linear(2, 1)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert l2sp_penalty(model, theta0).item() == 0.0
    with torch.no_grad():
        model.weight += torch.tensor([[0.5, -1.0]])
        model.bias += 2.0
    penalty = l2sp_penalty(model, theta0)
    assert penalty.item() == pytest.approx(0.25 + 1.0 + 4.0)
    penalty.backward()
    # d/dθ ||θ - θ0||² = 2 (θ - θ0)
    assert torch.allclose(model.weight.grad, torch.tensor([[1.0, -2.0]]))
    assert torch.allclose(model.bias.grad, torch.tensor([4.0]))


def test_lp_chooses_c_on_validation_not_test():
    """f1 has a large scale, f2 a small one; training labels use both. Strong regularisation
    leans on f1 alone, weak uses both. Validation labels follow f1, test labels both: choosing
    on validation must pick a small C even though test would pick a large one."""
    rng = np.random.default_rng(0)

    def draw(n):
        return np.stack([rng.normal(0, 10, n), rng.normal(0, 1, n)], axis=1)

    train_x = draw(400)
    train_y = (train_x[:, 0] + 10 * train_x[:, 1] > 0).astype(int)
    val_x, test_x = draw(400), draw(400)
    val_y = (val_x[:, 0] > 0).astype(int)
    test_y = (test_x[:, 0] + 10 * test_x[:, 1] > 0).astype(int)
    grid = (1e-4, 1e-3, 1e2)
    probe, scores = choose_c(train_x, train_y, val_x, val_y, grid)
    _, test_scores = choose_c(train_x, train_y, test_x, test_y, grid)
    assert probe.C == max(grid, key=lambda c: scores[c])
    assert probe.C < 1 and max(grid, key=lambda c: test_scores[c]) == 1e2
    layer = probe_to_linear(probe, 2)
    logits = layer(torch.tensor(val_x, dtype=torch.float32)).detach().numpy()
    assert (logits.argmax(1) == probe.predict(val_x)).all()


@pytest.mark.slow
def test_compare_and_report(fake_pacs, tmp_path):
    recipe = tiny_recipe(fake_pacs, "train.epochs=1", "eval.wise_alphas=[0, 0.5, 1]")
    out = tmp_path / "cmp"
    results = compare(recipe, ["zeroshot", "lp", "flyp"], [0, 1], out, soups=True)
    # the table's order: zero-shot, then methods, merges (one where greedy kept every run)
    soups = ["flyp soup (uniform)", "flyp soup (greedy)"]
    if "flyp soup (uniform = greedy)" in results["methods"]:
        soups = ["flyp soup (uniform = greedy)"]
    assert list(results["methods"]) == ["zeroshot", "flyp", *soups, "lp"]
    flyp = results["methods"]["flyp"]
    assert flyp["id"]["n"] == 2 and flyp["seeds"] == [0, 1]
    # WiSE at alpha 0 is the zero-shot model, at alpha 1 the finetuned one
    zs = results["methods"]["zeroshot"]
    assert flyp["wise"]["alphas"] == [0, 0.5, 1]
    assert flyp["wise"]["id"][0] == pytest.approx(zs["id"]["mean"])
    assert flyp["wise"]["id"][-1] == pytest.approx(flyp["id"]["mean"])
    wise = json.loads((out / "flyp-s0" / "wise.json").read_text())
    best = max(wise["points"], key=lambda p: p["val"])
    assert best["val"] == next(p for p in wise["points"] if p["alpha"] == wise["best_alpha"])["val"]
    # the probe keeps the C with the best validation score (ties: the smaller C)
    probe = json.loads((out / "lp-s0" / "probe.json").read_text())
    by_c = {float(c): v for c, v in probe["val_accuracy_by_C"].items()}
    assert sorted(by_c) == sorted(C_GRID)
    assert probe["chosen_C"] == min(c for c in by_c if by_c[c] == max(by_c.values()))

    # figure is a real PNG; the Markdown table matches results.json
    with Image.open(out / "figure.png") as img:
        assert img.format == "PNG" and img.size[0] > 500
    saved = json.loads((out / "results.json").read_text())
    text = (out / "report.md").read_text()
    first, per_seed, calibration = (t for t in text.split("\n\n") if t.startswith("| "))
    assert per_seed.startswith("| method | seed |")  # the values behind each mean ± std
    table = [line for line in first.splitlines() if line.startswith("| ")]
    # the calibration table: every finetuned method, ECE as in results.json
    cal_rows = {line.split("|")[1].strip(): line for line in calibration.splitlines()[2:]}
    assert set(cal_rows) == set(saved_methods := json.loads((out / "results.json").read_text())["methods"])
    ece = saved_methods["flyp"]["calibration"]["id_ece"]["mean"]
    assert cal_rows["flyp"].split("|")[2].strip().split(" ± ")[0] == f"{100 * ece:.1f}"
    header = [c.strip() for c in table[0].strip("|").split("|")]
    for line in table[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        m = saved["methods"][cells[0]]
        assert (
            cells[header.index("OOD mean")].split(" ± ")[0] == f"{100 * m['ood_mean']['mean']:.1f}"
        )
        assert (
            cells[header.index("photo (ID)")].split(" ± ")[0]
            == f"{100 * m['sets']['photo']['mean']:.1f}"
        )

    # flyp report rebuilds the same numbers from the run directories alone
    assert main(["report", str(out), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["methods"]["flyp"]["ood_mean"] == saved["methods"]["flyp"]["ood_mean"]


def test_image_tower_is_what_encode_image_uses():
    from flyp.methods import METHODS, Classifier, image_tower_names, set_trainable, text_tower_names
    from flyp.models.tiny import WordHashTokenizer

    model = TinyCLIP()
    names = image_tower_names(model, 32)
    assert names == {n for n, _ in model.named_parameters() if n.startswith("visual.")}
    text = text_tower_names(model, WordHashTokenizer())
    clf = Classifier(model)
    set_trainable(METHODS["flyp-image-only"], clf, names, text)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == names | {"logit_scale"}
    set_trainable(METHODS["ft"], clf, names, text)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names


def test_a_parameter_neither_encoder_reaches_is_never_trained():
    """A captioner's decoder, say: no loss gives it a gradient, so it is not trained (DDP is
    built without the unused-parameter search, which needs every trainable one used)."""
    from flyp.methods import METHODS, Classifier, image_tower_names, set_trainable, text_tower_names
    from flyp.models.tiny import WordHashTokenizer

    model = TinyCLIP()
    model.decoder = torch.nn.Linear(4, 4)
    text = text_tower_names(model, WordHashTokenizer())
    image = image_tower_names(model, 32)
    assert "decoder.weight" not in text | image
    assert text == {n for n, _ in model.named_parameters()} - image - {"logit_scale", "decoder.weight", "decoder.bias"}
    for name in ("flyp", "ce-both", "ft"):
        set_trainable(METHODS[name], Classifier(model), image, text)
        assert not model.decoder.weight.requires_grad, name
    assert model.token_embedding.weight.requires_grad is False  # ft: text frozen
    set_trainable(METHODS["flyp"], Classifier(model), image, text)
    assert all(p.requires_grad for n, p in model.named_parameters() if n in text), "flyp trains text"
