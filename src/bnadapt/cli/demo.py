"""``bnadapt demo``: the self-contained demo on scikit-learn's digits, printed as a table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

__all__ = ["add_demo_parser", "cmd_demo"]


def add_demo_parser(sub) -> None:
    """Add ``demo`` to the ``bnadapt`` subparsers ``sub``."""
    p = sub.add_parser("demo", help="self-contained demo on scikit-learn's digits (no data, no network)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, training and draws (default: 0)")
    p.add_argument("--out", type=Path, default=Path("bnadapt-demo"), help="report folder (default: ./bnadapt-demo)")


def cmd_demo(args: argparse.Namespace) -> int:
    """Run ``bnadapt demo``: train, corrupt, adapt, print the accuracy table and write a report with a plot."""
    from ..demo import METHODS, run_demo

    t0 = time.perf_counter()
    print("bnadapt demo: a small BN CNN trained on clean scikit-learn digits (32x32 grey), tested on corrupted ones")
    print("(CIFAR-10-C constants); adaptation sees 32 unlabeled corrupted test images, no labels, no training.\n")
    clean, rows, report = run_demo(args.out, seed=args.seed)
    print(f"clean test accuracy: {100 * clean:.1f}%   accuracy in % on corrupted test digits:\n")
    header = f"{'corruption':<16}{'severity':>8}" + "".join(f"{m:>9}" for m in METHODS)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r.corruption:<16}{r.severity:>8}" + "".join(f"{100 * r.accuracy[m]:>9.1f}" for m in METHODS))
    print("-" * len(header))
    means = [100 * sum(r.accuracy[m] for r in rows) / len(rows) for m in METHODS]
    print(f"{'mean':<24}" + "".join(f"{v:>9.1f}" for v in means))
    print(
        "\nreplace: statistics of the 32 images (Benz et al. 2021); prior: N=16 source + n=32 target "
        "(Schneider et al. 2020)."
    )
    print(f"report with a plot: {report} ({time.perf_counter() - t0:.0f}s)")
    return 0
