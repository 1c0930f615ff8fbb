from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fakes import make_domains
from flyp.data.benchmarks import pacs_default_root

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

PACS_ROOT = pacs_default_root()


@pytest.fixture
def fake_pacs(tmp_path: Path) -> Path:
    return make_domains(
        tmp_path / "data", ["photo", "art", "sketch"], ["dog", "horse", "house"], per_class=12
    )


@pytest.fixture
def pacs_root() -> Path:
    if not PACS_ROOT.is_dir():
        pytest.skip(f"PACS is not at {PACS_ROOT}")
    return PACS_ROOT.resolve()
