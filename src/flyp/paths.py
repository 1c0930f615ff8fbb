"""Paths a user points at that lead nowhere: symbolic links that dangle or loop.

Python's own answers to them mislead (``is_dir()`` is False, so a dangling class folder looks
like no folder; ``mkdir`` says "File exists" for a dangling --out; ``resolve()`` raises a
RuntimeError for a loop): these say what the link is, for a message naming it and the fix.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path


def link_fault(path: Path | str) -> str | None:
    """Why the symbolic link ``path`` leads nowhere, in words ("a symbolic link that loops
    (...)", "a dangling symbolic link (to X, which does not exist)"), or None: no link, or one
    that leads to a file or folder."""
    path = Path(path)
    if not path.is_symlink():
        return None
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link that loops (it leads back to itself)"
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return f"a dangling symbolic link (to {os.readlink(path)}, which does not exist)"
        return f"a symbolic link that cannot be followed ({err.strerror})"
    return None


def broken_link(path: Path | str) -> str | None:
    """The refusal for a run file that is a link leading nowhere ("RUN/recipe.yaml is a
    dangling symbolic link (to X, which does not exist); ..."), or None. Checked before a
    missing file is taken for an unfinished run or a folder that is no run."""
    why = link_fault(path)
    if why is None:
        return None
    return f"{path} is {why}; restore the file it points to, or replace the link with the file"


def resolved(path: Path | str) -> Path:
    """``path`` absolute with its links followed, as ``Path.resolve()``; a link loop on the way
    is an OSError ELOOP naming the path (the CLI's one line), not resolve()'s RuntimeError."""
    try:
        return Path(path).expanduser().resolve()
    except RuntimeError:  # "Symlink loop from ..." (Python < 3.13)
        raise OSError(errno.ELOOP, "a symbolic link loops", str(path)) from None
