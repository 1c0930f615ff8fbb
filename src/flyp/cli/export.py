"""flyp export: a finished run as an open_clip checkpoint, a Hugging Face folder or flyp's own
format (docs/export.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add `flyp export` and its options to the subcommands ``sub``."""
    p = sub.add_parser(
        "export",
        help="write a finished run as an open_clip checkpoint, a Hugging Face folder or flyp's own format",
    )
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--format", required=True, help="open_clip, hf or flyp (docs/export.md)")
    p.add_argument("--out", required=True, help="folder to write (must not exist, or be empty)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flyp.export import export_run

    out = export_run(Path(args.run_dir), args.format, Path(args.out))
    print(f"exported {args.run_dir} as {args.format} to {out} (how to load it: {out / 'README.md'})")
    return 0
