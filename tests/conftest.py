from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import torch

from fakes import make_domains
from flyp.data.benchmarks import pacs_default_root
from flyp.recipe import DEVICE, TrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# precision "auto" (the recipe default) chooses fp32 in the tests on any hardware, so their pinned
# numbers hold everywhere (torchrun children inherit it); tests/test_precision.py unsets it.
os.environ.setdefault("FLYP_AUTO_PRECISION", "fp32")
torch.set_num_threads(2)
# The device the tests' runs train on: a recipe that leaves train.device at its default gets this
# one (cpu unless FLYP_TEST_DEVICE says otherwise: benchmarks/gpu_check.sh sets cuda), so the
# same suite checks a GPU without changing what it checks on the CPU.
TEST_DEVICE = os.environ.get("FLYP_TEST_DEVICE") or "cpu"


def pytest_configure(config: pytest.Config) -> None:
    """A FLYP_TEST_DEVICE that is no device, or a GPU torch does not see, stops the session
    with one line, before any test runs."""
    if not DEVICE.fullmatch(TEST_DEVICE) or TEST_DEVICE == "auto":
        raise pytest.UsageError(
            f"FLYP_TEST_DEVICE={TEST_DEVICE} is not a device; use cpu, cuda, cuda:N or mps"
        )
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(
            f"FLYP_TEST_DEVICE={TEST_DEVICE} but torch sees no GPU here; "
            "unset it to test on the CPU"
        )


@pytest.fixture(autouse=True)
def test_device(monkeypatch: pytest.MonkeyPatch) -> str:
    """train.device's default is FLYP_TEST_DEVICE (cpu unless set) during each test: the
    default of TrainConfig's constructor, which every recipe without train.device goes through.
    A recipe naming its device keeps it."""
    names = [n for n, p in inspect.signature(TrainConfig.__init__).parameters.items()
             if p.default is not inspect.Parameter.empty]  # fmt: skip
    defaults = list(TrainConfig.__init__.__defaults__)
    defaults[names.index("device")] = TEST_DEVICE
    monkeypatch.setattr(TrainConfig.__init__, "__defaults__", tuple(defaults))
    return TEST_DEVICE


@pytest.fixture(autouse=True)
def image_check_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The image check's manifests go to this session's temporary folder, not ~/.cache."""
    monkeypatch.setenv("FLYP_CACHE", str(tmp_path_factory.getbasetemp() / "flyp-cache"))


@pytest.fixture
def fake_pacs(tmp_path: Path) -> Path:
    return make_domains(
        tmp_path / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], per_class=12
    )


@pytest.fixture
def pacs_root() -> Path:
    """The real PACS. Missing, it fails the test: a skip would let CI pass without ever
    reading real images."""
    root = pacs_default_root()
    if not root.is_dir():
        pytest.fail(
            f"PACS is not at {root} (looked for $FLYP_PACS_ROOT, else ../shared/data/pacs next "
            "to the checkout): put it there, or set FLYP_PACS_ROOT=/path/to/pacs",
            pytrace=False,
        )
    return root


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that reads real PACS is marked slow (`-m "not slow"` for a quick loop) and
    pacs (`-m "not pacs"` where the dataset is absent, e.g. benchmarks/gpu_check.sh)."""
    for item in items:
        if "pacs_root" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.pacs)
