from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fakes import make_domains

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

PACS_ROOT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pacs"


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
