"""The image check: every image decoded in full before a run starts, in parallel, remembered.

Why decode in full: ``Image.verify()`` reads headers and checksums only and passes a JPEG cut in
half, which would then fail mid-training. Why threads: PIL releases the GIL while it decodes,
so threads run decoders side by side with no start-up, pickling or fork cost, and a patched
``Image.MAX_IMAGE_PIXELS`` applies to them (benchmarks/data_check.py compares them with
processes). Why a manifest: a full decode costs ~0.3 ms per PACS image but several ms per
ImageNet image, over an hour for its 1.28M images in one thread; an image checked once is known
good by its (path, size, modification time) until it changes, so later runs, and every run of a
comparison, only ``stat`` the files. Under torchrun the check runs once per node (its local rank
0 checks, the node's other ranks take its report), not once per process.

The manifest lives in the user's cache folder ($FLYP_CACHE, else $XDG_CACHE_HOME/flyp, else
~/.cache/flyp), never in the dataset (which may be shared or read-only): one JSON file per data
root, written atomically. Only good images are recorded; a bad one is decoded again each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import PIL
from PIL import Image

from flyp.data.folders import SKIP_HINT, DataError, Sample, decode_rgb
from flyp.data.records import container
from flyp.distributed import local_rank, on_node_main
from flyp.paths import link_fault

CHECK_VERSION = 2  # bumped when what the check accepts changes (2: past MAX_ASPECT): older manifests are ignored
CHUNK = 64  # images per task: few enough futures for 1.28M images, small enough to spread
PROGRESS_EVERY_S = 15.0
SHOW_SKIPPED = 10  # skipped images named on stderr (the rest counted)


@dataclass
class CheckReport:
    """What the image check did, for ``flyp data`` and the run's log."""

    images: int = 0  # distinct files checked
    cached: int = 0  # known good from the manifest (same size and modification time)
    decoded: int = 0  # decoded now
    bad: dict[str, str] = field(default_factory=dict)  # path -> reason (left out under skip)
    seconds: float = 0.0
    workers: int = 1
    manifest: str | None = None
    # Images inside shards or tables (flyp.data.records): a seeded sample of this many was
    # checked; the others are decoded as they are read, and a bad one stops the run naming it.
    sampled_from: int | None = None

    def summary(self) -> str:
        sampled = (
            f" (a seeded sample of the {self.sampled_from} images in shards/tables; the others "
            "are checked as they are read)"
            if self.sampled_from is not None
            else ""
        )
        return (
            f"image check: {self.images} images{sampled} in {self.seconds:.1f} s ({self.decoded} "
            f"decoded with {self.workers} threads, {self.cached} known good from {self.manifest}); "
            f"{len(self.bad)} bad"
        )


def cache_dir() -> Path:
    """$FLYP_CACHE, else $XDG_CACHE_HOME/flyp, else ~/.cache/flyp."""
    if os.environ.get("FLYP_CACHE"):
        return Path(os.environ["FLYP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "flyp"


def manifest_path(root: str) -> Path:
    key = hashlib.sha1(root.encode()).hexdigest()[:16]
    return cache_dir() / "image-check" / f"{key}.json"


def default_workers() -> int:
    """$FLYP_CHECK_WORKERS, else the CPUs this process may use (at most 32)."""
    text = os.environ.get("FLYP_CHECK_WORKERS", "")
    if text:
        if not text.isdigit() or int(text) < 1:
            raise DataError(f"FLYP_CHECK_WORKERS must be a whole number >= 1, got '{text}'")
        return int(text)
    return max(1, min(32, len(os.sched_getaffinity(0))))


def _header() -> dict:
    """What a manifest's verdicts depend on: a manifest written under other rules is ignored."""
    return {
        "version": CHECK_VERSION,
        "pillow": PIL.__version__,
        "max_image_pixels": Image.MAX_IMAGE_PIXELS,
    }


def _read_manifest(path: Path, root: str) -> dict[str, list[int]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("root") != root or data.get("header") != _header():
        return {}
    images = data.get("images")
    return images if isinstance(images, dict) else {}


def _write_manifest(path: Path, root: str, good: dict[str, list[int]], gone: set[str]) -> None:
    """Merge into what is on disk now (another run may have added to it), then replace it
    atomically. Best effort: the manifest only saves time, so an unwritable cache is no error."""
    try:
        images = _read_manifest(path, root)
        for rel in gone:
            images.pop(rel, None)
        images.update(good)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"root": root, "header": _header(), "images": images}, f)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


def _why_bad(path: str) -> str | None:
    """None if the image decodes to RGB exactly as the loader will decode it, else why not."""
    try:
        decode_rgb(path)
    except Image.DecompressionBombError as err:
        return f"possible decompression bomb, shrink it if it is genuine: {err}"
    except Exception as err:  # noqa: BLE001 - any failure to decode is this file's fault
        return f"{type(err).__name__}: {err}"
    return None


def _decode_chunk(paths: Sequence[str]) -> list[str | None]:
    return [_why_bad(p) for p in paths]


def _stat(path: str) -> list[int] | None:
    """(size, modification time) of the file, or of the shard / table file holding a record."""
    try:
        st = os.stat(container(path))
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def check_paths(paths: Sequence[str], workers: int | None = None) -> CheckReport:
    """Decode every image not known good; returns the report (``bad`` names each failure).

    Under torchrun the check runs once per node, not once per process: the node's local rank 0
    decodes (and writes the manifest), its other ranks wait and get its report, good or bad,
    so every rank keeps or refuses the same images with the same message.
    """
    return on_node_main(partial(_check_here, paths, workers))


def _check_here(paths: Sequence[str], workers: int | None) -> CheckReport:
    """The check in this process alone."""
    start = time.perf_counter()
    unique = sorted({os.path.abspath(p) for p in paths})
    report = CheckReport(images=len(unique), workers=workers or default_workers())
    if not unique:
        return report
    root = os.path.commonpath(unique)
    root = root if os.path.isdir(root) else os.path.dirname(root)
    where = manifest_path(root)
    cut = len(root.rstrip(os.sep)) + 1  # path[cut:] is relative to root, faster than relpath
    report.manifest = str(where)
    known = _read_manifest(where, root)
    todo, stats = [], {}
    for path in unique:
        stat = _stat(path)
        if stat is None:
            report.bad[path] = link_fault(Path(path)) or "no such file"
            continue
        stats[path] = stat
        if known.get(path[cut:]) == stat:
            report.cached += 1
        else:
            todo.append(path)
    good: dict[str, list[int]] = {}
    gone = {p[cut:] for p in report.bad}
    pool = ThreadPoolExecutor(report.workers)
    try:
        chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]
        last = time.perf_counter()
        for chunk, reasons in zip(chunks, pool.map(_decode_chunk, chunks), strict=True):
            for path, reason in zip(chunk, reasons, strict=True):
                rel = path[cut:]
                if reason is None:
                    good[rel] = stats[path]
                else:
                    report.bad[path] = reason
                    gone.add(rel)
            report.decoded += len(chunk)
            if time.perf_counter() - last > PROGRESS_EVERY_S:
                last = time.perf_counter()
                print(f"image check: {report.decoded}/{len(todo)} decoded", file=sys.stderr)
    finally:  # also when interrupted: what was decoded so far is not lost
        pool.shutdown(cancel_futures=True)
        if good or gone:
            _write_manifest(where, root, good, gone)
    report.seconds = time.perf_counter() - start
    return report


def check_samples(
    samples: Sequence[Sample], on_bad_image: str = "error", workers: int | None = None
) -> tuple[list[Sample], CheckReport]:
    """Samples whose images decode; a bad image is an error naming it, or (``skip``) is left out,
    named on stderr and listed in the report."""
    if on_bad_image not in ("error", "skip"):
        raise DataError(f"data.on_bad_image must be 'error' or 'skip', got '{on_bad_image}'")
    report = check_paths([s.path for s in samples], workers)
    if report.bad and on_bad_image == "error":
        path, reason = next(iter(sorted(report.bad.items())))
        more = f" (and {len(report.bad) - 1} more bad images)" if len(report.bad) > 1 else ""
        raise DataError(
            f"cannot read image {path} ({reason}){more}; remove or replace it, or {SKIP_HINT}"
        )
    if local_rank() == 0:  # said once per node: its other ranks hold the same report
        for path, reason in sorted(report.bad.items())[:SHOW_SKIPPED]:
            print(f"image check: skipped {path} ({reason})", file=sys.stderr)
        if len(report.bad) > SHOW_SKIPPED:
            print(f"image check: skipped {len(report.bad) - SHOW_SKIPPED} more", file=sys.stderr)
    kept = [s for s in samples if os.path.abspath(s.path) not in report.bad]
    return kept, report
