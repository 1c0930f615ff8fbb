"""Helpers shared by the benchmark scripts (not a test suite: they print figures)."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch

PACS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pacs"
CAPTION = "a photo of a {}."


def pacs_photo(limit: int | None = None) -> list[tuple[str, str, int]]:
    """(path, caption, label) for PACS photo, sorted, classes by folder name."""
    root = (PACS / "photo").resolve()
    if not root.is_dir():
        sys.exit(f"PACS photo is not at {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = [
        (str(f), CAPTION.format(c.replace("_", " ")), i)
        for i, c in enumerate(classes)
        for f in sorted((root / c).iterdir())
    ]
    rows.sort(key=lambda r: r[0])
    return rows[:limit] if limit else rows


def write_csv(rows: list[tuple[str, str, int]], path: Path) -> Path:
    """open_clip_train's CSV format: tab-separated, header filepath/title."""
    path.write_text("filepath\ttitle\n" + "".join(f"{p}\t{c}\n" for p, c, _ in rows))
    return path


def matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, seconds: float = 2.0) -> float:
    """Measured GFLOP/s of square matmuls on this machine (the best of several timings)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = 0.0
    end = time.time() + seconds
    while time.time() < end:
        tick = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - tick) / 1e9)
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def emit(record: dict) -> None:
    """The last stdout line of a benchmark child process: its figures as JSON."""
    print("BENCH " + json.dumps(record), flush=True)


def read_emitted(stdout: str) -> dict:
    lines = [x for x in stdout.splitlines() if x.startswith("BENCH ")]
    if not lines:
        raise RuntimeError("the benchmark child printed no figures:\n" + stdout[-3000:])
    return json.loads(lines[-1][6:])
