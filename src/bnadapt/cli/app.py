"""The ``bnadapt`` command: builds the parser from the subcommand modules, runs one, turns user errors into exit 2.

User mistakes (bad paths, names, shapes) end with a one-line ``bnadapt: error: ...`` and exit code 2, never a
traceback, and nothing half-written.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Sequence

from ..errors import EXIT_USAGE, USER_ERRORS
from .adapt import add_adapt_parser, add_corrupt_parser, cmd_adapt, cmd_corrupt
from .args import Parser, made_parents
from .bank import add_bank_parser, cmd_bank
from .bench import add_analyze_parser, add_bench_parsers, cmd_analyze, cmd_bench
from .demo import add_demo_parser, cmd_demo
from .report import add_report_parser, cmd_report

__all__ = ["COMMANDS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``bnadapt`` and all its subcommands (imports torch, for the method names).

    Example:
        >>> build_parser().parse_args(["report", "results"]).command  # doctest: +SKIP
        'report'
    """
    parser = Parser(prog="bnadapt", description="BatchNorm statistics adaptation for corrupted or shifted inputs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    # The order here is the order of the subcommands in --help.
    add_adapt_parser(sub)
    add_corrupt_parser(sub)
    add_demo_parser(sub)
    add_bench_parsers(sub)
    add_analyze_parser(sub)
    add_bank_parser(sub)
    add_report_parser(sub)
    return parser


COMMANDS = {
    "adapt": cmd_adapt,
    "corrupt": cmd_corrupt,
    "demo": cmd_demo,
    "bench": cmd_bench,
    "sweep": cmd_bench,
    "analyze": cmd_analyze,
    "bank": cmd_bank,
    "report": cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnadapt`` command; returns the exit code.

    Example:
        >>> main(["adapt", "--model", "nope", "--images", "x.npz", "--out", "y.pt"])  # doctest: +SKIP
        2
    """
    try:
        args = build_parser().parse_args(argv)  # imports torch: a Ctrl-C here is a clean stop too
    except KeyboardInterrupt:
        print("bnadapt: interrupted before starting; nothing was written", file=sys.stderr)
        return 130
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="bnadapt: %(message)s")
    try:
        from ..data import follow_outside_links

        with follow_outside_links(getattr(args, "follow_links", False)), made_parents(getattr(args, "out", None)):
            return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"bnadapt: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bnadapt: interrupted; finished outputs are kept, rerun the same command to continue", file=sys.stderr)
        return 130
    except OSError as e:
        from ..results import OutOfSpaceError

        if e.errno == errno.EROFS and not args.verbose:  # the user's choice of --out, not a fault of the machine
            msg = f"cannot write {e.filename or 'the outputs'}: read-only file system; pass a writable --out"
            print(f"bnadapt: error: {msg}", file=sys.stderr)
            return EXIT_USAGE
        if not (isinstance(e, OutOfSpaceError) or e.errno in (errno.ENOSPC, errno.EDQUOT)) or args.verbose:
            raise
        msg = (
            str(e)
            if isinstance(e, OutOfSpaceError)
            else (
                f"no space left on the device writing {e.filename or 'the outputs'}; finished outputs are kept: free "
                "space and rerun the same command to continue"
            )
        )
        print(f"bnadapt: error: {msg}", file=sys.stderr)
        return 1
