"""``bnadapt report``: regenerate the summary, the report and the plots of a results folder."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_report_parser", "cmd_report"]


def add_report_parser(sub) -> None:
    """Add ``report`` to the ``bnadapt`` subparsers ``sub``."""
    p = sub.add_parser("report", help="regenerate summary.json, report.md/csv and plots from a results folder")
    p.add_argument("dir", type=Path, help="a folder written by bnadapt bench")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format (default: md)")
    p.add_argument("--baseline", type=Path, help="JSON of baseline errors for CE/mCE")
    p.add_argument("--no-plots", action="store_true", help="tables only")


def cmd_report(args: argparse.Namespace) -> int:
    """Run ``bnadapt report``: write the report of the results folder DIR in --format and list the files."""
    from ..metrics import load_baseline
    from ..report import write_report

    baseline = load_baseline(args.baseline) if args.baseline else None
    written = write_report(args.dir, args.format, baseline, plots=not args.no_plots)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
