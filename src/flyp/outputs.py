"""What flyp writes: targets that destroy nothing, and names that inject nothing.

Output paths. Every verb that writes a file checks its targets with :func:`check_output`
before any work: a target may not be one of the verb's inputs (the same file, symlinks
resolved), nor one of a run directory's own files (weights, training state, recipe, metrics,
log), which only training writes.

Names. Class, domain and method names come from folder names, CSV files and weights metadata,
so they may hold anything. On their way out they are neutralised for the sink they reach:
:func:`for_terminal` (no control characters: an ANSI escape cannot repaint the terminal),
:func:`csv_cell` (no cell a spreadsheet would run as a formula, OWASP's rule),
:func:`md_cell` (no Markdown table break, no HTML) and :func:`plot_label` (no matplotlib
math text).
"""

from __future__ import annotations

import html
import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from flyp.paths import link_fault, resolved

# The files a training run owns in its run directory (flyp.train): only training writes them.
RUN_FILES = (
    "recipe.yaml",
    "model.safetensors",
    "metrics.json",
    "state.pt",
    "last.safetensors",
    "log.jsonl",
    "wise.json",
    ".flyp.lock",
)
# What marks a folder as a run directory (one of these is there from the first checkpoint on).
RUN_MARKERS = ("recipe.yaml", "state.pt", "model.safetensors", "metrics.json")


class OutputError(FileExistsError):
    """An output target that would destroy an input or a run's files; the message names both
    and the fix. A FileExistsError, so the CLI prints it as one line like other path errors."""


def is_run_dir(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in RUN_MARKERS)


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name the same file or folder (symlinks resolved; either may not exist)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return resolved(a) == resolved(b)


def data_folders(recipe) -> list[str]:
    """The data folders a recipe reads whose layout is discovered (domain and class folders,
    stray images refused): no output may go in them. A CSV benchmark lists its images, so
    what is written next to them is never read; its folder is left out."""
    data = recipe.data
    if data.benchmark == "csv":
        return []
    return [str(p) for p in (data.root, *data.roots.values()) if p]


def check_output(
    target: str | Path,
    inputs: Iterable[str | Path] = (),
    *,
    folder: bool = False,
    writes: Iterable[str] = (),
    data: Iterable[str | Path | None] = (),
    flag: str = "--out",
) -> Path:
    """Refuse an output ``target`` that would destroy something; return it as a Path.

    ``folder``: the target is a folder the verb writes ``writes`` (file names) into; otherwise a
    file. Refused: a file target that is a folder or a folder target that is a file; a target
    under a path that is a file; a written file that is one of ``inputs`` (the same file after
    resolving symlinks) or one of a run directory's own files (:data:`RUN_FILES`); a file target
named like an image (``.png``, ``.jpg``, ...: text would replace a dataset's image); a folder
    target that is a run directory; a target in one of the ``data`` folders the verb reads (what
    it writes there would be read back as a domain, class or image by the next run).
    """
    target = Path(target)
    why = link_fault(target)
    if why:  # written through, or replaced: neither is what a link to nowhere asks
        raise OutputError(f"{flag} {target} is {why}; remove the link or pass another path")
    if folder and target.exists() and not target.is_dir():
        raise OutputError(f"{flag} {target} is a file; pass a folder (new or empty)")
    if not folder and target.is_dir():
        raise OutputError(f"{flag} {target} is a folder; pass a file name")
    if not folder:
        from flyp.data.folders import IMAGE_SUFFIXES  # PIL and numpy: only when a file is asked

        if target.suffix.lower() in IMAGE_SUFFIXES:  # an image (of a dataset) overwritten by text
            raise OutputError(
                f"{flag} {target} names an image file, and flyp writes text there (CSV or JSON); "
                "pass another file name"
            )
    above = next((p for p in target.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise OutputError(f"{flag} {target} lies under {above}, which is a file; pass another path")
    files = [target, *(target / name for name in writes)] if folder else [target]
    inputs = [Path(p) for p in inputs]
    for file in files:
        for given in inputs:
            if _same(file, given):
                raise OutputError(
                    f"{flag} {target} would overwrite the input {given}; "
                    "choose an output path that is not one of the inputs"
                )
        real = resolved(file)
        if real.name in RUN_FILES and is_run_dir(real.parent):
            raise OutputError(
                f"{flag} {target} would overwrite {real.name} of the run directory "
                f"{real.parent}, which only training writes; choose a path outside the run's own "
                "files"
            )
    for root in (Path(p) for p in data if p):
        if _same(target, root) or resolved(root) in resolved(target).parents:
            raise OutputError(
                f"{flag} {target} lies in the data folder {root}, where what flyp writes would "
                "be read as a domain, class or image by the next run; choose a path outside it"
            )
    if folder and is_run_dir(target):
        raise OutputError(
            f"{flag} {target} is a run directory; pass a new folder (flyp finetune --resume "
            f"{target} continues a killed run)"
        )
    return target


def runs_inside(folder: Path) -> list[Path]:
    """The run directories under ``folder`` (a comparison's or a sweep's --out), sorted."""
    if not folder.is_dir():
        return []
    return sorted(p.parent for p in folder.glob("**/recipe.yaml") if p.parent != folder)


def not_a_run(folder: Path) -> str | None:
    """The explanation for a folder of runs passed where one run is expected, else None."""
    runs = runs_inside(folder)
    if not runs:
        return None
    kind = "comparison" if (folder / "report.md").exists() else "folder of runs"
    shown = ", ".join(str(r.relative_to(folder)) for r in runs[:6])
    more = f" and {len(runs) - 6} more" if len(runs) > 6 else ""
    return (
        f"{folder} is a {kind} holding {len(runs)} runs, not one run; point at one run inside "
        f"it, e.g. {runs[0]} (runs: {shown}{more})"
    )


def unfinished(run_dir: Path) -> str | None:
    """Why ``run_dir`` is not a finished run (it has training state and no metrics.json: killed,
    or still training), or None. A finished run has metrics.json; training deletes state.pt."""
    if (run_dir / "state.pt").exists() and not (run_dir / "metrics.json").exists():
        return (
            f"{run_dir} is an unfinished run (state.pt and no metrics.json: killed or still "
            "training), so its model.safetensors holds only the best weights so far"
        )
    return None


# ---- names on their way out ----

BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def _controls_escaped(text: str, keep: str = "") -> str:
    out = []
    for ch in text:
        if ch not in keep and (unicodedata.category(ch) == "Cc" or ch in BIDI):
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def for_terminal(text: str) -> str:
    """``text`` with control characters (ANSI escapes, carriage returns, bidi overrides) written
    as visible escapes (``\\x1b``), so a name cannot repaint or hide what the terminal shows.
    Newlines and tabs stay only where ``text`` is whole output lines, never in a name."""
    return _controls_escaped(str(text))


def for_terminal_lines(text: str) -> str:
    """As :func:`for_terminal`, keeping newlines (a Markdown report printed as it was written)."""
    return _controls_escaped(str(text), keep="\n")


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a string starting with = + - @ tab or CR gets a
    leading quote (OWASP's CSV injection rule). Numbers pass unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def md_cell(text: object) -> str:
    """``text`` safe in a Markdown table cell and in the HTML it renders to: ``& < > "``
    as HTML entities, ``|`` ``[`` ``]`` and backticks escaped, line breaks and other control
    characters made visible, so a name cannot end the cell, the row, or start a tag or link."""
    text = str(text).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    text = html.escape(_controls_escaped(text), quote=True)
    for ch in "\\|[]`":
        text = text.replace(ch, "\\" + ch if ch != "`" else "&#96;")
    return text


def plot_label(text: object) -> str:
    """``text`` shown literally by matplotlib: ``$`` escaped (no math text), controls visible."""
    return _controls_escaped(str(text)).replace("$", r"\$")
