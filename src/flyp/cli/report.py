"""flyp report: rebuild the report from finished run directories, or folders holding them."""

from __future__ import annotations

import argparse
from pathlib import Path

from flyp.cli._common import out_folder


def register(sub: argparse._SubParsersAction) -> None:
    """Add `flyp report` and its options to the subcommands ``sub``."""
    p = sub.add_parser("report", help="rebuild the report from finished run directories")
    p.add_argument("run_dirs", nargs="+", help="run directories, or folders holding them")
    p.add_argument(
        "--out", required=True, help="folder for report.md, results.json, results.csv, figure.png"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flyp.outputs import for_terminal_lines
    from flyp.report import ReportError, write_report
    from flyp.rundir import run_data_folders

    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not d.is_dir():
            raise FileNotFoundError(
                f"{d} does not exist; pass run directories or folders holding them"
            )
    expanded = [
        r
        for d in dirs
        for r in (
            [d]
            if (d / "metrics.json").exists() or (d / "metrics.json").is_symlink()
            else sorted(
                p.parent
                for p in d.glob("**/metrics.json")
                # a sweep's runs are candidates, not the comparison's seeds
                if not any((q / "sweep.json").exists() for q in p.parents if d in q.parents)
                # a run's WiSE-FT model (RUN/wise-model) is in the run's own WiSE columns
                and not (p.parent.name == "wise-model" and (p.parent.parent / "wise.json").exists())
            )
        )
    ]
    if not expanded:
        raise ReportError(
            f"no finished runs (metrics.json) under {', '.join(map(str, dirs))}; "
            "finish or resume them with flyp finetune --resume RUN_DIR"
        )
    reads = [r / name for r in expanded for name in ("metrics.json", "wise.json")]
    data = [p for r in expanded for p in run_data_folders(r)]
    writes = ("results.json", "results.csv", "figure.png", "report.md")
    out = out_folder(args.out, reads, writes, data)
    write_report(expanded, out)
    print(for_terminal_lines((out / "report.md").read_text()))
    return 0
