"""Data loading that keeps a GPU fed, and torch.compile leaving nothing on the shared model.

- ``data.num_workers: auto`` (the default): each local process's share of the cores.
- One training loader per run: its workers persist across epochs, with the seeded order.
- Pinned memory (training batches, the in-memory evaluation cache) iff the device is CUDA.
- A compiled run puts the model's own towers back; lipsum-ft's frozen copy never calls the
  live model through a wrapper.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import flyp.methods
from fakes import error_lines, tiny_overrides
from flyp.cli import main
from flyp.data import build_benchmark
from flyp.data import loader as loading
from flyp.data.loader import (
    EpochSampler,
    ImageDataset,
    eval_loader,
    materialize,
    train_loader,
    worker_count,
)
from flyp.methods import frozen_reference, normalized_image_features
from flyp.models import load_model
from flyp.recipe import DataConfig, load_recipe
from flyp.train import finetune, prepare


def tiny(root: Path, *extra: str):
    return load_recipe(None, tiny_overrides(root, *extra))


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


# --- data.num_workers: auto ------------------------------------------------------------------


def machine(monkeypatch, cores: int, local: int | None = None) -> None:
    """This process may run on ``cores`` cores; torchrun started ``local`` processes here."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if local is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))


def test_auto_workers_is_the_default():
    assert DataConfig().num_workers == "auto"
    assert load_recipe(None).data.num_workers == "auto"


def test_auto_workers_on_two_cores_of_a_cpu_run_is_none(monkeypatch):
    """2 cores, CPU run (this machine): the step computes on both cores with torch's threads;
    a worker only competes with it (measured: 1 worker ran at 0.98x of none), so 0."""
    machine(monkeypatch, 2)
    assert worker_count("auto", "cpu") == 0


def test_auto_workers_with_sixteen_cores_and_one_gpu_keep_one_core_for_the_main_process(
    monkeypatch,
):
    machine(monkeypatch, 16)
    assert worker_count("auto", "cuda") == 15
    machine(monkeypatch, 16, local=1)
    assert worker_count("auto", torch.device("cuda", 0)) == 15


def test_auto_workers_share_sixteen_cores_between_eight_local_processes(monkeypatch):
    machine(monkeypatch, 16, local=8)  # 2 cores each: one feeds the GPU, one decodes
    assert worker_count("auto", "cuda") == 1
    machine(monkeypatch, 8, local=8)  # 1 core each: nothing left for a worker
    assert worker_count("auto", "cuda") == 0


def test_auto_workers_are_capped_and_counted_from_the_affinity_not_the_machine(monkeypatch):
    machine(monkeypatch, 128)
    assert worker_count("auto", "cuda") == loading.WORKER_CAP
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    machine(monkeypatch, 4)  # a container's share of a big machine
    assert worker_count("auto", "cuda") == 3
    assert worker_count("auto", "cpu") == 1  # a CPU step keeps three quarters of its cores
    monkeypatch.delattr(os, "sched_getaffinity")  # no affinity (macOS): the machine's count
    assert worker_count("auto", "cuda") == loading.WORKER_CAP


def test_explicit_workers_are_kept(monkeypatch):
    machine(monkeypatch, 16)
    assert worker_count(3, "cuda") == worker_count(3, "cpu") == 3
    assert worker_count(0, "cuda") == 0


@pytest.mark.parametrize(
    "value, message",
    [
        ("many", "data.num_workers: 'many' is not a number of workers; use auto or a whole number >= 0"),
        ("-1", "data.num_workers: -1 is out of range; it must be >= 0"),
        ("1.5", "data.num_workers: expected int, got 1.5 (float)"),
    ],
)
def test_bad_num_workers_is_refused_in_one_line(value, message, fake_pacs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    sets = [a for o in tiny_overrides(fake_pacs, f"data.num_workers={value}") for a in ("--set", o)]
    assert main(["finetune", str(recipe), "--out", str(tmp_path / "run"), *sets]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: {message}"]
    assert not (tmp_path / "run").exists()


# --- one training loader per run ---------------------------------------------------------------


def test_a_sampler_moved_to_another_epoch_gives_that_epochs_fresh_order():
    reused = EpochSampler(20, 3, seed=5, epoch=0, rank=1, world=2)
    list(reused)
    for epoch, start in [(1, 0), (2, 1), (0, 2), (3, 0)]:
        reused.set_epoch(epoch, start)
        fresh = EpochSampler(20, 3, seed=5, epoch=epoch, start=start, rank=1, world=2)
        assert list(reused) == list(fresh) and len(reused) == len(fresh)


def test_the_training_loader_keeps_its_workers_across_epochs(fake_pacs, tmp_path, monkeypatch):
    """One worker process draws every training sample of a 2-epoch run (not one per epoch),
    and the run is the run without workers, loss for loss and weight for weight."""
    drawn = tmp_path / "drawn.txt"
    original = ImageDataset.__getitem__

    def recorded(self, key):
        if isinstance(key, tuple):  # a training sample: (index, seed)
            with drawn.open("a") as f:
                f.write(f"{os.getpid()}\n")
        return original(self, key)

    monkeypatch.setattr(ImageDataset, "__getitem__", recorded)
    args = ("train.epochs=2", "train.select_on=last")
    finetune(tiny(fake_pacs, *args, "data.num_workers=1"), tmp_path / "workers")
    pids = drawn.read_text().split()
    assert len(pids) == 2 * 3 * 6  # 2 epochs of 3 steps of 6
    assert len(set(pids)) == 1 and pids[0] != str(os.getpid())

    finetune(tiny(fake_pacs, *args, "data.num_workers=0"), tmp_path / "main")
    assert losses(tmp_path / "workers") == losses(tmp_path / "main")
    a = load_file(str(tmp_path / "workers" / "model.safetensors"))
    b = load_file(str(tmp_path / "main" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_resumed_mid_epoch_with_persistent_workers_equals_the_uninterrupted_one(
    fake_pacs, tmp_path
):
    args = ("train.epochs=3", "train.select_on=last")
    finetune(tiny(fake_pacs, *args, "data.num_workers=0"), tmp_path / "full")
    stopped = finetune(
        tiny(fake_pacs, *args, "data.num_workers=1", "train.stop_after_steps=4"),
        tmp_path / "resumed",
    )
    assert stopped == {"stopped_at_step": 4}  # in the second epoch (3 steps an epoch)
    finetune(tiny(fake_pacs, *args, "data.num_workers=1"), tmp_path / "resumed", resume=True)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_batches_are_pinned_iff_the_device_is_cuda_with_persistent_prefetching_workers():
    dataset = ImageDataset([], lambda image: image)
    sampler = EpochSampler(0, 2, 0, 0)
    assert train_loader(dataset, sampler, 2, 0, device="cuda").pin_memory
    assert not train_loader(dataset, sampler, 2, 0, device="cpu").pin_memory
    assert not train_loader(dataset, sampler, 2, 0).pin_memory
    with_workers = train_loader(dataset, sampler, 2, 2, device="cuda")
    assert with_workers.persistent_workers and with_workers.prefetch_factor == loading.PREFETCH
    assert not train_loader(dataset, sampler, 2, 0, device="cuda").persistent_workers


# --- the pinned evaluation cache -------------------------------------------------------------


@pytest.fixture
def pinning(monkeypatch) -> list[tuple[int, ...]]:
    """Tensor.pin_memory recorded (and a plain copy: this CPU machine has nothing to pin to)."""
    pinned = []

    def pin_memory(self, *args, **kwargs):
        pinned.append(tuple(self.shape))
        return self.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    return pinned


@pytest.mark.parametrize("device, expected", [("cuda", True), ("cuda:1", True), ("cpu", False)])
def test_the_evaluation_cache_is_pinned_iff_the_device_is_cuda(
    device, expected, fake_pacs, pinning
):
    bench = build_benchmark(tiny(fake_pacs).data)
    bundle = load_model("tiny")
    dataset = ImageDataset(bench.val, bundle.eval_transform)
    cache = materialize(dataset, 4, 0, device=torch.device(device))
    assert pinning == ([tuple(cache.tensors[0].shape)] if expected else [])
    assert cache.tensors[0].shape[0] == len(bench.val)
    uncached = eval_loader(dataset, 4, 0, device)  # a set too big for the cache
    assert uncached.pin_memory is expected


def test_a_cpu_run_pins_nothing(fake_pacs, tmp_path, pinning):
    exp = prepare(tiny(fake_pacs, "train.epochs=1"))
    finetune(exp.recipe, tmp_path / "run", exp=exp)
    assert exp.eval_cache and pinning == []


# --- torch.compile leaves nothing behind ----------------------------------------------------


def fake_compile(calls: list[str]):
    """torch.compile as it behaves here: a new function wrapping the (bound) method it was
    given, so it keeps calling that method's model (the real one is too slow on this CPU)."""

    def compile(fn, **kwargs):
        calls.append(fn.__name__)

        @functools.wraps(fn)
        def compiled(*args, **kw):
            return fn(*args, **kw)

        return compiled

    return compile


def penalties(monkeypatch) -> list[float]:
    seen = []
    original = flyp.methods.lipsum_penalty

    def recorded(*args):
        value = original(*args)
        seen.append(float(value.detach()))
        return value

    monkeypatch.setattr(flyp.methods, "lipsum_penalty", recorded)
    return seen


def test_a_compiled_run_then_lipsum_ft_gives_the_penalty_of_lipsum_ft_alone(
    fake_pacs, tmp_path, monkeypatch
):
    """As flyp compare runs them: one model shared, its pretrained weights put back between."""
    calls = []
    monkeypatch.setattr(torch, "compile", fake_compile(calls))
    seen = penalties(monkeypatch)
    common = ("train.epochs=2", "train.select_on=last")
    lipsum = tiny(fake_pacs, "train.method=lipsum-ft", *common)

    finetune(lipsum, tmp_path / "alone")
    alone = list(seen)
    assert len(alone) == 6 and alone[0] == 0 and min(alone[1:]) > 0  # moves off θ0

    seen.clear()
    compiled = tiny(fake_pacs, "train.compile=true", *common)
    exp = prepare(compiled)
    model = exp.bundle.model
    pretrained = copy.deepcopy(model.state_dict())
    before = dict(vars(model))
    finetune(compiled, tmp_path / "compiled", exp=exp)
    assert calls == ["encode_image", "encode_text"]
    assert vars(model).keys() == before.keys()  # the compiled towers are gone again
    assert all(vars(model)[k] is before[k] for k in ("encode_image", "encode_text") if k in before)
    model.load_state_dict(pretrained)
    finetune(lipsum, tmp_path / "after", exp=exp.for_run(lipsum))
    assert seen == alone


def test_a_compiled_run_that_fails_also_puts_the_towers_back(fake_pacs, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", fake_compile([]))

    def broken(*args, **kwargs):
        raise RuntimeError("a step failed")

    monkeypatch.setattr("flyp.train.forward_backward", broken)
    exp = prepare(tiny(fake_pacs, "train.compile=true"))
    with pytest.raises(RuntimeError, match="a step failed"):
        finetune(exp.recipe, tmp_path / "run", exp=exp)
    assert "encode_image" not in vars(exp.bundle.model)
    assert "encode_text" not in vars(exp.bundle.model)


@pytest.mark.parametrize("wrapping", ["functools.wraps", "closure"])
def test_a_frozen_reference_never_calls_the_live_model_through_a_wrapper(wrapping):
    """Whatever wrapper sits on the model (one that names what it wraps, or a bare closure),
    the copy computes with its own, frozen weights."""
    model = load_model("tiny").model.eval()
    inner = model.encode_image
    wrapper = lambda images: inner(images)  # noqa: E731
    if wrapping == "functools.wraps":
        wrapper = functools.wraps(inner)(wrapper)
    model.encode_image = wrapper
    reference = frozen_reference(model)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = normalized_image_features(reference, images, False)
        for p in model.parameters():
            p.add_(1.0)  # the live model trains on
        live = normalized_image_features(model, images, False)
        frozen = normalized_image_features(reference, images, False)
    assert torch.equal(frozen, expected) and not torch.allclose(frozen, live)
    assert vars(model)["encode_image"] is wrapper  # the live model is left as it was


def test_a_frozen_reference_keeps_the_models_own_trimmed_text_tower_bound_to_itself(tmp_path):
    """open_clip models carry an instance-level ``encode_text`` (the trimmed context): under a
    compiled wrapper, the copy gets that method again, bound to the copy."""
    config = tmp_path / "flyp-loading-vit.json"
    config.write_text(json.dumps(TINY_VIT))
    model = load_model(f"open_clip:{config}").model
    trimmed = vars(model)["encode_text"]
    model.encode_text = fake_compile([])(model.encode_text)
    reference = frozen_reference(model)
    own = vars(reference)["encode_text"]
    assert own.__self__ is reference and own.__func__ is trimmed.__func__
    assert "encode_image" not in vars(reference)


TINY_VIT = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def test_a_training_image_is_augmented_from_its_own_seed_alone(tmp_path):
    """The augmentation of a drawn sample is what torch.manual_seed(its seed) would give, the
    same whatever the caller's generator holds, and leaves that generator as it was."""
    from PIL import Image
    from torchvision import transforms

    from flyp.data.folders import Sample

    path = tmp_path / "x.png"
    Image.fromarray(torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8).numpy()).save(path)
    augment = transforms.Compose(
        [transforms.RandomResizedCrop(16, scale=(0.2, 1.0)), transforms.RandomHorizontalFlip(),
         transforms.PILToTensor()]
    )
    dataset = ImageDataset([Sample(str(path), 3)], augment)
    torch.manual_seed(12345)
    expected = augment(Image.open(path).convert("RGB"))
    torch.manual_seed(999)
    before = torch.get_rng_state()
    image, label, seed = dataset[(0, 12345)]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's draws are untouched
    assert (label, seed) == (3, 12345)
    assert torch.equal(image, expected)
    torch.rand(7)  # another state of the caller's generator: the same image
    assert torch.equal(dataset[(0, 12345)][0], expected)
    assert not torch.equal(dataset[(0, 12346)][0], expected)  # the seed does choose the crop
