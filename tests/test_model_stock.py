"""Model Stock (Jang, Yun, Han, ECCV 2024): merge of finetuned runs pulled toward the
pretrained weights by the angle between their task vectors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fakes import tiny_overrides
from flyp.cli import main
from flyp.ensemble import model_stock, stock_ratio

W0 = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}


def test_orthogonal_task_vectors_give_the_pretrained_weights():
    runs = [{"w": W0["w"] + torch.tensor([2.0, 0.0]), "n": torch.tensor(5)},
            {"w": W0["w"] + torch.tensor([0.0, 3.0]), "n": torch.tensor(6)}]
    merged, t = model_stock(W0, runs)
    assert t["w"] == 0.0 and torch.equal(merged["w"], W0["w"])
    assert merged["n"].item() == 5  # integer buffers: the first run's


def test_identical_task_vectors_give_the_finetuned_weights():
    run = {"w": torch.tensor([4.0, -2.0]), "n": torch.tensor(3)}
    merged, t = model_stock(W0, [run, {k: v.clone() for k, v in run.items()}])
    assert t["w"] == pytest.approx(1.0) and torch.allclose(merged["w"], run["w"])


def test_a_known_angle_gives_the_known_ratio():
    # task vectors at 60 degrees: cos = 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([math.cos(math.pi / 3), math.sin(math.pi / 3)])
    merged, t = model_stock(W0, [{"w": W0["w"] + a, "n": W0["n"]}, {"w": W0["w"] + b, "n": W0["n"]}])
    assert t["w"] == pytest.approx(2 / 3, rel=1e-6)
    expected = W0["w"] + (2 / 3) * (a + b) / 2
    torch.testing.assert_close(merged["w"], expected)
    # n models: t = n cos / (1 + (n - 1) cos)
    assert stock_ratio(0.5, 3) == pytest.approx(1.5 / 2.0)
    assert stock_ratio(-0.4) == 0.0  # opposite task vectors: no extrapolation past w0


def test_a_frozen_tensor_stays_pretrained_and_one_run_is_refused():
    runs = [{"w": W0["w"].clone(), "n": W0["n"]}, {"w": W0["w"] + 1, "n": W0["n"]}]
    merged, t = model_stock(W0, runs)
    assert t["w"] == 0.0 and torch.equal(merged["w"], W0["w"])
    with pytest.raises(ValueError, match="at least two"):
        model_stock(W0, runs[:1])


def test_compare_with_stock(fake_pacs, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("name: r\n")
    sets = [f"--set={o}" for o in tiny_overrides(fake_pacs, "train.epochs=1", "eval.wise_alphas=[0, 1]")]
    out = tmp_path / "cmp"
    args = ["compare", str(tmp_path / "r.yaml"), *sets, "--methods", "flyp", "--no-wise", "--stock"]
    assert main([*args, "--seeds", "0", "--out", str(out)]) == 2
    assert "--seeds 0 1" in capsys.readouterr().err and not out.exists()
    assert main([*args, "--seeds", "0", "1", "--out", str(out)]) == 0
    stock = json.loads((out / "soups" / "flyp-soup-model-stock" / "metrics.json").read_text())
    assert stock["method"] == "flyp soup (model stock)" and 0 <= stock["mean_t"] <= 1
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"zeroshot", "flyp", "flyp soup (model stock)"}
    # the merge is what model_stock gives on the two runs' weights
    from safetensors.torch import load_file

    from flyp.models import load_model

    w0 = load_model("tiny").model.state_dict()["visual.0.weight"].double()
    a, b = (load_file(str(out / f"flyp-s{s}" / "model.safetensors"))["model.visual.0.weight"].double()
            for s in (0, 1))  # fmt: skip
    # by hand: the cosine of the two task vectors, t = 2 cos / (1 + cos) (Model Stock, 2 runs)
    cos = float(torch.dot((a - w0).flatten(), (b - w0).flatten()) / ((a - w0).norm() * (b - w0).norm()))
    assert 0 < cos < 1  # two seeds: related, not equal task vectors
    assert stock["t"]["model.visual.0.weight"] == pytest.approx(2 * cos / (1 + cos), rel=1e-5)
    merged = load_file(str(out / "soups" / "flyp-soup-model-stock" / "model.safetensors"))
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(merged["model.visual.0.weight"].double(), w0 + t * ((a + b) / 2 - w0),
                               rtol=0, atol=1e-5)  # fmt: skip
