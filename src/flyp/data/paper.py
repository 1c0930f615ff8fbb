"""Pieces shared by the paper's benchmarks (ImageNet, WILDS, transfer): reading labelled folders
and where each set lives. The step that turns their splits into a Benchmark is
:func:`flyp.data.sets.finish`, shared with every other builder."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from flyp.data.folders import IMAGE_SUFFIXES, DataError, Sample, account_links, nfc
from flyp.paths import link_fault
from flyp.recipe import DataConfig


def images_in(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted (hidden files, such as macOS's '._x.jpg'
    resource forks, are not images)."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES
        and not p.name.startswith(".")
        and (p.is_file() or link_fault(p))  # a link to nowhere: the image check names it
    )


def labelled_folders(folder: Path, index: Mapping[str, int], what: str) -> list[Sample]:
    """``folder/<name>/<image>`` labelled by ``index[name]``; unknown sub-folders are an error."""
    account_links(folder, None, "class folder")  # a class folder that leads nowhere: refused
    samples = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if nfc(sub.name) not in index:
            raise DataError(
                f"folder {sub} is not a class of {what}; remove it or point the root elsewhere"
            )
        samples.extend(Sample(str(p), index[nfc(sub.name)]) for p in images_in(sub))
    if not samples:
        raise DataError(f"{folder} holds no <class>/<image> files for {what}")
    return samples


def set_root(cfg: DataConfig, name: str, default: str | None) -> Path | None:
    """Folder of one set: ``data.roots[name]``, else ``<data.root>/<default>``; None if unset."""
    roots = cfg.roots or {}
    if not isinstance(roots, dict):
        raise DataError(f"data.roots must map set names to folders, got {roots!r}")
    if name in roots:
        return Path(str(roots[name])).expanduser()
    if cfg.root is None or default is None:
        return None
    return Path(cfg.root).expanduser() / default


