from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fakes import make_domains
from flyp.data.benchmarks import pacs_default_root

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


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
