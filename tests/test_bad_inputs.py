"""Every bad input a new user tried, as one table: what was passed, the one line `flyp` must
answer with, its exit status, and what must not exist afterwards.

Each row drives ``flyp.cli.main`` in-process on the tiny model and a fake image tree; a row
whose command would train fails before the first step, so the whole table runs in seconds.
The README cites the number of rows (``len(CASES)``).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fakes import error_lines, make_domains, tiny_overrides
from flyp import checkpoint
from flyp.cli import main
from flyp.recipe import load_recipe, save_recipe

TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@dataclass
class Env:
    """What a row's builder may use: its own folder, the shared fake tree, monkeypatch."""

    tmp: Path
    tree: Path
    monkeypatch: pytest.MonkeyPatch

    @property
    def run(self) -> Path:
        return self.tmp / "run"

    def sets(self, *extra: str) -> list[str]:
        return [arg for item in tiny_overrides(self.tree, *extra) for arg in ("--set", item)]

    def finetune(self, *extra: str) -> list[str]:
        recipe = self.tmp / "base.yaml"
        if not recipe.exists():
            recipe.write_text("name: base\n")
        return ["finetune", str(recipe), "--out", str(self.run), *self.sets(*extra)]

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
        return path

    def run_dir(self, *extra: str, state: object = None) -> Path:
        """A run directory as a killed run leaves it: recipe.yaml (and state.pt if given)."""
        self.run.mkdir()
        save_recipe(load_recipe(None, tiny_overrides(self.tree, *extra)), self.run / "recipe.yaml")
        if state is not None:
            torch.save(state, self.run / "state.pt")
        return self.run

    def open_clip_config(self) -> Path:
        return self.write("flyp-bad-inputs-vit.json", json.dumps(TINY_VIT))

    def finished_run(self, name: str, metrics: str) -> Path:
        self.write(f"runs/{name}/metrics.json", metrics)
        return self.tmp / "runs"


@dataclass
class Case:
    id: str
    build: Callable[[Env], list[str]]
    fragment: str
    code: int = 2
    absent: tuple[str, ...] = ("run",)  # relative to the row's folder


class RunsCode:
    """A pickled object that would create a folder when unpickled (if anything ran it)."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _full_disk(env: Env) -> None:
    def write(tmp: str, text: str) -> None:
        with open(tmp, "w") as f:
            f.write(text[: len(text) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    env.monkeypatch.setattr(checkpoint, "_write_text", write)


def _other_weights(env: Env) -> Path:
    path = env.tmp / "other.safetensors"
    save_file({"visual.weight": torch.zeros(2, 2)}, str(path))
    return path


def _hf_folder_with_corrupt_weights(env: Env) -> Path:
    from test_hf_models import _tiny

    folder = _tiny("clip", env.tmp / "hf")
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken")
    return folder


def _corrupt_state_run(env: Env) -> Path:
    run = env.run_dir()
    (run / "state.pt").write_text("garbage")
    return run


def _a_good_metrics(method: str = "flyp") -> str:
    return json.dumps(
        {
            "method": method,
            "metric": "accuracy",
            "id_name": "photo",
            "ood_names": ["art"],
            "id": 0.5,
            "ood_mean": 0.4,
            "sets": {"photo": {"accuracy": 0.5}, "art": {"accuracy": 0.4}},
        }
    )


def _report_with_full_disk(env: Env) -> list[str]:
    _full_disk(env)
    return ["report", str(env.finished_run("a", _a_good_metrics())), "--out", str(env.tmp / "out")]


CASES = [
    # choices, checked when the recipe loads, with did-you-mean
    Case(
        "batchnorm",
        lambda e: e.finetune("train.batchnorm=freeze"),
        "train.batchnorm: 'freeze' is not one of frozen, train (did you mean 'frozen'?)",
    ),
    Case(
        "select_on",
        lambda e: e.finetune("train.select_on=best"),
        "train.select_on: 'best' is not one of val, last",
    ),
    Case(
        "precision",
        lambda e: e.finetune("train.precision=fp16"),
        "train.precision: 'fp16' is not one of auto, fp32, bf16 (did you mean 'bf16'?)",
    ),
    Case(
        "collisions",
        lambda e: e.finetune("train.collisions=masked"),
        "train.collisions: 'masked' is not one of none, mask, soft (did you mean 'mask'?)",
    ),
    Case(
        "contrastive_loss",
        lambda e: e.finetune("train.contrastive_loss=sigmoid"),
        "train.contrastive_loss: 'sigmoid' is not one of auto, clip, siglip",
    ),
    Case(  # was a ValueError traceback after the image check
        "templates",
        lambda e: e.finetune("data.templates=pac"),
        "data.templates: 'pac' is not one of caltech101, flowers102, fmow, generic, iwildcam, pacs, pcam, "
        "simple, sst2, stanford_cars (did you mean 'pacs'?)",
    ),
    Case(
        "on_bad_image",
        lambda e: e.finetune("data.on_bad_image=skipped"),
        "data.on_bad_image: 'skipped' is not one of error, skip (did you mean 'skip'?)",
    ),
    Case(
        "device",
        lambda e: e.finetune("train.device=gpu"),
        "train.device: 'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps (did you mean 'cuda'?)",
    ),
    Case("device_index", lambda e: e.finetune("train.device=cuda:x"), "train.device: 'cuda:x'"),
    Case(
        "method",
        lambda e: e.finetune("train.method=flip"),
        "train.method: 'flip' is not one of zeroshot, flyp,",
    ),
    # ranges
    Case(
        "lr_negative",
        lambda e: e.finetune("train.lr=-1e-4"),
        "train.lr: -0.0001 is out of range; it must be >= 0",
    ),
    Case("lr_nan", lambda e: e.finetune("train.lr=nan"), "train.lr: nan is not a finite number"),
    Case(
        "lr_inf_in_yaml",
        lambda e: ["finetune", str(e.write("r.yaml", "train:\n  lr: .inf\n")), "--out", str(e.run)],
        "train.lr: inf is not a finite number",
    ),
    Case(
        "weight_decay",
        lambda e: e.finetune("train.weight_decay=-0.1"),
        "train.weight_decay: -0.1 is out of range; it must be >= 0",
    ),
    Case(
        "epochs",
        lambda e: e.finetune("train.epochs=0"),
        "train.epochs: 0 is out of range; it must be >= 1",
    ),
    Case(
        "batch_size",
        lambda e: e.finetune("train.batch_size=0"),
        "train.batch_size: 0 is out of range; it must be >= 1",
    ),
    Case(
        "eval_batch_size",
        lambda e: e.finetune("eval.batch_size=0"),
        "eval.batch_size: 0 is out of range; it must be >= 1",
    ),
    Case(
        "micro_batch",
        lambda e: e.finetune("train.micro_batch=0"),
        "train.micro_batch: 0 is out of range; it must be >= 1",
    ),
    Case(
        "image_size",
        lambda e: e.finetune("model.image_size=0"),
        "model.image_size: 0 is out of range; it must be >= 1",
    ),
    Case(
        "context_length",
        lambda e: e.finetune("model.context_length=-1"),
        "model.context_length: -1 is out of range; it must be >= 1",
    ),
    Case(
        "max_train",
        lambda e: e.finetune("data.max_train=0"),
        "data.max_train: 0 is out of range; it must be >= 1",
    ),
    Case(
        "max_eval",
        lambda e: e.finetune("data.max_eval=-5"),
        "data.max_eval: -5 is out of range; it must be >= 1",
    ),
    Case(
        "k_shot",
        lambda e: e.finetune("data.k_shot=0"),
        "data.k_shot: 0 is out of range; it must be >= 1",
    ),
    Case(
        "warmup_steps",
        lambda e: e.finetune("train.warmup_steps=-1"),
        "train.warmup_steps: -1 is out of range; it must be >= 0",
    ),
    Case(
        "checkpoint_every",
        lambda e: e.finetune("train.checkpoint_every=-2"),
        "train.checkpoint_every: -2 is out of range; it must be >= 0",
    ),
    Case(
        "num_workers",
        lambda e: e.finetune("data.num_workers=-1"),
        "data.num_workers: -1 is out of range; it must be >= 0",
    ),
    Case(
        "cache_gb",
        lambda e: e.finetune("eval.cache_gb=-1"),
        "eval.cache_gb: -1.0 is out of range; it must be >= 0",
    ),
    Case(
        "grad_clip",
        lambda e: e.finetune("train.grad_clip=0"),
        "train.grad_clip: 0.0 is out of range; it must be > 0",
    ),
    Case(
        "max_logit_scale",
        lambda e: e.finetune("train.max_logit_scale=0"),
        "train.max_logit_scale: 0.0 is out of range; it must be > 0",
    ),
    Case(
        "init_logit_scale",
        lambda e: e.finetune("train.init_logit_scale=-1"),
        "train.init_logit_scale: -1.0 is out of range; it must be > 0",
    ),
    Case(
        "val_fraction_zero",
        lambda e: e.finetune("data.val_fraction=0"),
        "data.val_fraction: 0.0 is out of range; it must be between 0 and 1",
    ),
    Case(
        "test_fraction_one",
        lambda e: e.finetune("data.test_fraction=1"),
        "data.test_fraction: 1.0 is out of range; it must be between 0 and 1",
    ),
    Case(
        "fractions_sum",
        lambda e: e.finetune("data.val_fraction=0.5", "data.test_fraction=0.5"),
        "data.val_fraction + data.test_fraction = 1 leaves no training images",
    ),
    Case(
        "wise_alpha",
        lambda e: e.finetune("eval.wise_alphas=[0, 1.5]"),
        "eval.wise_alphas[1]: 1.5 is out of range; it must be in [0, 1]",
    ),
    Case(
        "wise_alphas_empty",
        lambda e: e.finetune("eval.wise_alphas=[]"),
        "eval.wise_alphas is empty",
    ),
    # OOD domains
    Case(
        "ood_is_id",
        lambda e: e.finetune("data.ood_domains=[photo, art]"),
        "data.ood_domains holds the ID domain 'photo' (data.id_domain)",
    ),
    Case(
        "ood_twice",
        lambda e: e.finetune("data.ood_domains=[art, sketch, art]"),
        "data.ood_domains lists 'art' twice",
    ),
    Case(
        "ood_is_id_in_data",
        lambda e: [
            "data",
            str(e.write("r.yaml", "name: r\n")),
            *e.sets("data.ood_domains=[photo]"),
        ],
        "data.ood_domains holds the ID domain 'photo'",
    ),
    # keys, types, YAML
    Case(
        "unknown_key",
        lambda e: e.finetune("train.learning_rate=1"),
        "unknown recipe key 'train.learning_rate'",
    ),
    Case(
        "wrong_type",
        lambda e: e.finetune("train.epochs=five"),
        "train.epochs: expected int, got 'five'",
    ),
    Case("set_without_equals", lambda e: e.finetune("train.lr"), "--set expects key=value"),
    Case(
        "set_bad_yaml",
        lambda e: e.finetune("data.ood_domains=[art, sketch"),
        "--set data.ood_domains=[art, sketch: the value is not valid YAML",
    ),
    Case(
        "yaml_syntax",
        lambda e: [
            "finetune",
            str(e.write("bad.yaml", "train:\n  lr: 1e-4\n epochs: 3\n")),
            "--out",
            str(e.run),
        ],
        "bad.yaml line 3: expected <block end>, but found '<block mapping start>'; fix the YAML syntax",
    ),
    Case(
        "yaml_not_a_mapping",
        lambda e: ["finetune", str(e.write("list.yaml", "- a\n- b\n"))],
        "list.yaml: a recipe is a mapping of sections, got list",
    ),
    Case(
        "recipe_missing",
        lambda e: ["finetune", str(e.tmp / "nope.yaml"), "--out", str(e.run)],
        "nope.yaml does not exist (see recipes/ for examples)",
    ),
    Case(
        "recipe_is_a_folder",
        lambda e: ["finetune", str(e.tmp), "--out", str(e.run)],
        "is a folder; pass a YAML file",
    ),
    Case(
        "recipe_is_binary",
        lambda e: ["finetune", str(e.write("r.yaml", b"\xff\xfe\x00\x81")), "--out", str(e.run)],
        "r.yaml is not a text file",
    ),
    # models
    Case(
        "model_spec", lambda e: e.finetune("model.spec=resnet50"), "unknown model spec 'resnet50'"
    ),
    Case("tiny_dropout", lambda e: e.finetune("model.spec=tiny:lots"), "model spec 'tiny:lots'"),
    Case(
        "open_clip_text_as_pt",
        lambda e: e.finetune(
            f"model.spec=open_clip:{e.open_clip_config()}:{e.write('weights.pt', 'not weights')}"
        ),
        "weights.pt is not a checkpoint of flyp-bad-inputs-vit",
    ),
    Case(
        "open_clip_other_architecture",
        lambda e: e.finetune(f"model.spec=open_clip:{e.open_clip_config()}:{_other_weights(e)}"),
        "other.safetensors is not a checkpoint of flyp-bad-inputs-vit (Missing key(s)",
    ),
    Case(
        "open_clip_corrupt_safetensors",
        lambda e: e.finetune(
            f"model.spec=open_clip:{e.open_clip_config()}:{e.write('w.safetensors', b'0' * 64)}"
        ),
        "w.safetensors is not a checkpoint of flyp-bad-inputs-vit (Error while deserializing",
    ),
    Case(
        "open_clip_missing_file",
        lambda e: e.finetune("model.spec=open_clip:ViT-B-16:/no/w.pt"),
        "open_clip checkpoint file /no/w.pt does not exist",
    ),
    Case(
        "open_clip_tag_not_cached",
        lambda e: e.finetune("model.spec=open_clip:ViT-B-16:openai"),
        "open_clip:ViT-B-16:openai is not in the local cache and HF_HUB_OFFLINE is set",
    ),
    Case(
        "hf_corrupt_safetensors",
        lambda e: e.finetune(f"model.spec=hf:{_hf_folder_with_corrupt_weights(e)}"),
        "do not load (Error while deserializing header",
    ),
    Case(
        "hf_not_a_model_folder",
        lambda e: e.finetune(f"model.spec=hf:{e.tmp}"),
        "needs a model folder with config.json",
    ),
    # data
    Case("data_root_missing", lambda e: e.finetune(f"data.root={e.tmp}/nowhere"), "does not exist"),
    Case("id_domain_typo", lambda e: e.finetune("data.id_domain=photos"), "did you mean 'photo'"),
    # evaluate
    Case(
        "evaluate_missing_path",
        lambda e: ["evaluate", "/no/such/path"],
        "error: /no/such/path does not exist; pass a run directory or a .safetensors file",
    ),
    Case(
        "evaluate_folder_not_a_run",
        lambda e: ["evaluate", str(e.tmp)],
        "has no recipe.yaml, so it is not a flyp run",
    ),
    Case(
        "evaluate_unfinished_run",
        lambda e: ["evaluate", str(e.run_dir())],
        "run has no model.safetensors: is the run finished?",
        absent=("run/metrics.json",),
    ),
    Case(
        "evaluate_file_needs_recipe",
        lambda e: ["evaluate", str(_other_weights(e))],
        "other.safetensors needs --recipe",
    ),
    Case(
        "evaluate_text_as_safetensors",
        lambda e: [
            "evaluate",
            str(e.write("m.safetensors", "hello")),
            "--recipe",
            str(e.run_dir() / "recipe.yaml"),
            "--out",
            str(e.tmp / "m.json"),
        ],
        "m.safetensors is not a readable safetensors file",
        absent=("m.json",),
    ),
    Case(
        "evaluate_other_model_weights",
        lambda e: [
            "evaluate",
            str(_other_weights(e)),
            "--recipe",
            str(e.run_dir() / "recipe.yaml"),
            "--out",
            str(e.tmp / "m.json"),
        ],
        "other.safetensors does not fit this model",
        absent=("m.json",),
    ),
    # resume
    Case(
        "resume_changes_lr",
        lambda e: ["finetune", "--resume", str(e.run_dir()), "--set", "train.lr=0.1"],
        "run cannot change train.lr (0.003 -> 0.1)",
        absent=("run/metrics.json",),
    ),
    Case(
        "resume_changes_data",
        lambda e: ["finetune", "--resume", str(e.run_dir()), "--set", "data.max_train=5"],
        "cannot change data.max_train (None -> 5)",
        absent=("run/metrics.json",),
    ),
    Case(
        "resume_with_recipe",
        lambda e: ["finetune", "r.yaml", "--resume", str(e.run_dir())],
        "drop the RECIPE and --out arguments",
        absent=("run/metrics.json",),
    ),
    Case(
        "resume_missing_dir",
        lambda e: ["finetune", "--resume", str(e.run)],
        "run does not exist; pass the run directory of a killed run",
    ),
    Case(
        "resume_corrupt_state",
        lambda e: ["finetune", "--resume", str(_corrupt_state_run(e))],
        "state.pt is not a flyp training state",
        absent=("run/metrics.json",),
    ),
    Case(
        "resume_state_runs_code",
        lambda e: [
            "finetune",
            "--resume",
            str(e.run_dir(state={"step": 1, "x": RunsCode(str(e.tmp / "pwned"))})),
        ],
        "state.pt is not a flyp training state (Weights only load failed",
        absent=("pwned", "run/metrics.json"),
    ),
    # report
    Case(
        "report_truncated_metrics",
        lambda e: [
            "report",
            str(e.finished_run("a", _a_good_metrics()[:40])),
            "--out",
            str(e.tmp / "out"),
        ],
        "runs/a/metrics.json is not valid JSON",
        absent=("out/report.md",),
    ),
    Case(
        "report_foreign_metrics",
        lambda e: [
            "report",
            str(e.finished_run("a", '{"accuracy": 1}')),
            "--out",
            str(e.tmp / "out"),
        ],
        "runs/a/metrics.json lacks 'method'",
        absent=("out/report.md",),
    ),
    Case(
        "report_missing_dir",
        lambda e: ["report", str(e.tmp / "nope"), "--out", str(e.tmp / "o")],
        "nope does not exist",
        absent=("o",),
    ),
    Case(
        "report_no_runs",
        lambda e: ["report", str(e.tmp), "--out", str(e.tmp / "o")],
        "no finished runs (metrics.json) under",
        absent=("o",),
    ),
    # disk full
    Case(
        "disk_full_finetune",
        lambda e: (_full_disk(e), e.finetune())[1],
        "no space left on device while writing",
    ),
    Case(
        "disk_full_report",
        _report_with_full_disk,
        "no space left on device while writing",
        absent=("out/results.json",),
    ),
    # other commands and flags
    Case(
        "out_is_a_file",
        lambda e: [*e.finetune()[:2], "--out", str(e.write("run", "x"))],
        "run is a file; pass a folder (new or empty)",
        absent=("run/recipe.yaml",),
    ),
    Case(
        "report_out_is_a_file",
        lambda e: [
            "report",
            str(e.finished_run("a", _a_good_metrics())),
            "--out",
            str(e.write("o", "x")),
        ],
        "o is a file; pass a folder",
        absent=("o/report.md",),
    ),
    Case(
        "compare_unknown_method",
        lambda e: ["compare", "r.yaml", "--methods", "flyp", "flip"],
        "unknown method 'flip'",
        absent=("runs",),
    ),
    Case(
        "compare_seed_twice",
        lambda e: ["compare", "r.yaml", "--seeds", "0", "0"],
        "--seeds lists 0 twice",
        absent=("runs",),
    ),
    Case("wise_missing_run", lambda e: ["wise", str(e.run)], "run does not exist"),
    Case(
        "wise_unfinished_run",
        lambda e: ["wise", str(e.run_dir())],
        "run has no metrics.json: is the run finished?",
        absent=("run/wise.json",),
    ),
    Case(
        "finetune_without_recipe",
        lambda e: ["finetune", "--out", str(e.run)],
        "flyp finetune needs a RECIPE",
    ),
    Case(
        "evaluate_without_target",
        lambda e: ["evaluate"],
        "the following arguments are required: target",
    ),
    Case(
        "seeds_not_numbers",
        lambda e: ["compare", "r.yaml", "--seeds", "one"],
        "argument --seeds: invalid int value: 'one'",
    ),
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_domains(
        tmp_path_factory.mktemp("tree"),
        ["photo", "art", "sketch"],
        ["dog", "horse", "house"],
        per_class=12,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line_and_leaves_nothing(case, tree, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # default run directories (runs/...) land in the row's folder
    argv = case.build(Env(tmp_path, tree, monkeypatch))
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    lines = error_lines(capsys.readouterr().err)  # progress lines aside
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert case.fragment in lines[0]
    assert code == int(case.code)
    for path in case.absent:
        assert not (tmp_path / path).exists(), path
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written file left behind


def test_table_size():
    """The README cites this number."""
    print(f"{len(CASES)} bad inputs in the table")
    assert len(CASES) == len({c.id for c in CASES}) >= 40


def test_a_full_disk_leaves_the_old_file_as_it_was(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old\n")
    _full_disk(Env(tmp_path, tmp_path, monkeypatch))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.atomic_write_json(target, {"new": 1})
    assert str(err.value) == (
        f"no space left on device while writing {target}; free space or choose another --out"
    )
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == [target.name]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_are_written_with_the_users_umask(umask, mode, tmp_path):
    """mkstemp makes 0600 files; results must be as readable as the user's umask allows."""
    model = torch.nn.Linear(2, 2)
    before = os.umask(umask)
    try:
        checkpoint.atomic_write_text(tmp_path / "a.txt", "x")
        checkpoint.save_weights(model, tmp_path / "w.safetensors")
        checkpoint.save_state({"step": 1}, tmp_path / "state.pt")
        checkpoint.atomic_write_bytes(tmp_path / "f.png", b"png")
    finally:
        os.umask(before)
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {
        "a.txt": mode,
        "w.safetensors": mode,
        "state.pt": mode,
        "f.png": mode,
    }


def test_state_loads_without_running_code_and_keeps_plain_values(tmp_path):
    state = {"step": 3, "rng": {"torch": torch.get_rng_state(), "python": [3, [1, 2], None]}}
    checkpoint.save_state(state, tmp_path / "state.pt")
    loaded = checkpoint.load_state(tmp_path / "state.pt")
    assert loaded["step"] == 3 and loaded["rng"]["python"] == [3, [1, 2], None]
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
