"""The ``bnadapt`` command: parses arguments, calls one library function per subcommand, prints the result.

User mistakes (bad paths, names, shapes) end with a one-line ``bnadapt: error: ...`` and exit code 2, never a
traceback, and nothing half-written.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._cli_util import (
    EXIT_USAGE,
    USER_ERRORS,
    _add_model_args,
    _add_option_arg,
    _advance,
    _int_list,
    _Parser,
    _positive_int,
    _progress_bar,
    _severities,
)
from .cli_bank import add_bank_parser, cmd_bank
from .cli_bench import (
    _add_bench_args,
    _add_bench_data_args,
    _add_run_args,
    _add_seeds_arg,
    _corruption_names,
    cmd_analyze,
    cmd_bench,
)


def _add_adapt_args(p: argparse.ArgumentParser) -> None:
    from .adapt import method_names

    g = p.add_argument_group("adaptation")
    g.add_argument("--method", default="replace", choices=method_names(), metavar="NAME",
                   help=f"one of {', '.join(method_names())} (default: replace)")  # fmt: skip
    g.add_argument("--n", type=_positive_int, default=32, help="adaptation images drawn from the input (default: 32)")
    g.add_argument("--seed", type=int, default=0, help="seed of the draw (default: 0)")
    g.add_argument("--prior", type=float, default=16.0, help="prior strength N for --method prior (default: 16)")
    g.add_argument("--part", choices=("both", "mean", "var"), default="both", help="statistics to adapt")
    g.add_argument("--layers", nargs="+", metavar="PATTERN", help="adapt only BN layers matching these globs")
    depth = g.add_mutually_exclusive_group()
    depth.add_argument("--first", type=_positive_int, metavar="K", help="adapt only the first K BN layers")
    depth.add_argument("--last", type=_positive_int, metavar="K", help="adapt only the last K BN layers")
    _add_option_arg(g)
    g.add_argument("-b", "--batch-size", type=_positive_int, default=256, help="micro-batch size (default: 256)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
    from .analyze import ANALYSES

    parser = _Parser(prog="bnadapt", description="BatchNorm statistics adaptation for corrupted or shifted inputs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("adapt", help="adapt a model's BN statistics to unlabeled target images and save it")
    _add_model_args(p)
    p.add_argument("--images", required=True, type=Path, help="image folder, or .npz/.npy of uint8 NHWC images")
    _add_adapt_args(p)
    p.add_argument("--out", required=True, type=Path,
                   help="output: .pt (adapted checkpoint) or .safetensors (BN statistics only)")  # fmt: skip

    p = sub.add_parser("corrupt", help="write a corrupted copy of a dataset in the CIFAR-10-C or ImageNet-C layout")
    p.add_argument("--input", required=True, type=Path, help=".npz with x (N,H,W,3) uint8 and y, or a class folder")
    p.add_argument("--profile", required=True, choices=("cifar", "imagenet"), help="severity constants to use")
    p.add_argument("--format", required=True, choices=("cifar-c", "imagenet-c"), help="output layout")
    p.add_argument("--out", required=True, type=Path, help="output directory (created if its parent exists)")
    p.add_argument("--corruptions", nargs="+", metavar="NAME", help="names, or a subset: common, extra, all, noise, "
                   "blur, weather, digital (default: all 19)")  # fmt: skip
    p.add_argument("--severities", type=_severities, default=(1, 2, 3, 4, 5), help="e.g. 1-5 or 1,3,5 (default 1-5)")
    p.add_argument("--seed", type=int, default=0, help="corruption seed (default: 0)")
    p.add_argument("-j", "--jobs", type=_positive_int, default=1, help="worker processes (default: 1)")
    p.add_argument("--no-resize", action="store_true", help="imagenet-c: skip the resize 256 + centre crop 224")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning instead of failing")
    p.add_argument("--force", action="store_true", help="write into a folder made with other options")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("demo", help="self-contained demo on scikit-learn's digits (no data, no network)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, training and draws (default: 0)")
    p.add_argument("--out", type=Path, default=Path("bnadapt-demo"), help="report folder (default: ./bnadapt-demo)")

    for name, text in (
        ("bench", "benchmark models on corrupted data: source vs adapted accuracy per cell"),
        ("sweep", "bench with a list of sample sizes (default --n 1,2,4,...,256)"),
    ):
        p = sub.add_parser(name, help=text)
        _add_bench_args(p, sweep=name == "sweep")

    p = sub.add_parser("analyze", help="style-shift analyses: transfer matrix, mean vs variance, first vs last layers")
    p.add_argument(
        "analysis",
        choices=ANALYSES,
        help="transfer: adapt on A, evaluate on B; parts: mean/var/both; depth: first-k vs last-k layers",
    )
    _add_bench_data_args(p, severities=(5,))
    g = p.add_argument_group("protocol")
    g.add_argument("--n", type=_positive_int, default=32, help="adaptation images per run (default: 32)")
    _add_seeds_arg(g)
    g.add_argument(
        "--ks",
        type=_int_list,
        metavar="K1,K2",
        help="depth: numbers of BN layers (default: powers of two below the model's BN layer count)",
    )
    _add_run_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, help="folder; the analysis writes into OUT/<analysis>/")
    g.add_argument("--resume", action="store_true", help="skip the cells already finished in OUT/<analysis>/")
    g.add_argument("--no-plots", action="store_true", help="tables only")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")  # fmt: skip

    add_bank_parser(sub)

    p = sub.add_parser("report", help="regenerate summary.json, report.md/csv and plots from a results folder")
    p.add_argument("dir", type=Path, help="a folder written by bnadapt bench")
    p.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format (default: md)")
    p.add_argument("--baseline", type=Path, help="JSON of baseline errors for CE/mCE")
    p.add_argument("--no-plots", action="store_true", help="tables only")  # fmt: skip
    for name in ("adapt", "corrupt", "bench", "sweep", "analyze"):
        sub.choices[name].add_argument(
            "--follow-links",
            action="store_true",
            help="read symlinked files and folders that point outside the input folder (skipped by default)",
        )
    return parser


def cmd_adapt(args: argparse.Namespace) -> int:
    import torch

    from ._io import atomic_path
    from .adapt import adapt, is_online, parse_options
    from .bn import BNStats, bn_layers
    from .data import read_images
    from .models import load_model

    out: Path = args.out
    if out.suffix not in (".pt", ".pth", ".safetensors"):
        raise ValueError(f"expected --out to end in .pt, .pth or .safetensors, got {out.name!r}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"expected an existing directory for --out, got none at {out.parent}; create it first")
    if is_online(args.method):
        raise ValueError(
            f"expected a method that produces fixed statistics to save, got {args.method!r}, which adapts while it "
            "runs; use it from the library (bnadapt.adapt) or in bnadapt bench"
        )
    options = parse_options([args.method], args.opt)
    model = load_model(args.model, args.checkpoint, args.weights, args.trust_checkpoint)
    x, _ = read_images(args.images)
    t0 = time.perf_counter()
    try:
        adapted = adapt(
            model.to(args.device), x, method=args.method, n=args.n, seed=args.seed, prior=args.prior,
            part=args.part, layers=args.layers, first=args.first, last=args.last, batch_size=args.batch_size,
            options=options,
        )  # fmt: skip
    except RuntimeError as e:  # the network could not run on these images (size, channels)
        raise ValueError(
            f"expected images the model can take, got {tuple(x.shape[1:])} (H, W, C) that it could not run on: "
            f"{str(e).splitlines()[0]}"
        ) from None
    layers = [n for n, _ in bn_layers(adapted)]
    meta = {"method": args.method, "n": str(args.n), "seed": str(args.seed), "model": args.model,
            "images": str(args.images)}  # fmt: skip
    if args.method == "prior":
        meta["prior"] = str(args.prior)
    meta.update({f"option.{k}": str(v) for k, v in options.items()})
    if out.suffix == ".safetensors":
        stats = BNStats.from_model(adapted)
        stats.metadata.update(meta)
        stats.save(out)
    else:
        net = getattr(adapted, "net", adapted)
        with atomic_path(out) as tmp:
            torch.save({"state_dict": net.state_dict(), "bnadapt": meta}, tmp)
    print(
        f"adapted {len(layers)} BN layers of {args.model} with {args.method} on {min(args.n, len(x))} of {len(x)} "
        f"images (seed {args.seed}) in {time.perf_counter() - t0:.1f}s -> {out}"
    )
    return 0


def cmd_corrupt(args: argparse.Namespace) -> int:
    from .corruptions.export import export_corrupted

    names = _corruption_names(args.corruptions)
    t0 = time.perf_counter()
    bar = _progress_bar(0, not args.no_progress, "img")

    def progress(step: int, total: int) -> None:
        _advance(bar, step, total)

    try:
        done = export_corrupted(
            args.input, args.out, args.format, args.profile, names, args.severities, args.seed, args.jobs,
            resize=not args.no_resize, skip_bad=args.skip_bad, force=args.force, progress=progress,
        )  # fmt: skip
    finally:
        bar.close()
    kind = "files" if args.format == "cifar-c" else "cells"
    n_images = (bar.total or 0) // max(1, len(names) * len(args.severities))
    print(f"wrote {len(done)} {kind} ({len(names)} corruptions x {len(args.severities)} severities of {n_images} "
          f"images) to {args.out} in {time.perf_counter() - t0:.1f}s")  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import METHODS, run_demo

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


def cmd_report(args: argparse.Namespace) -> int:
    from .metrics import load_baseline
    from .report import write_report

    baseline = load_baseline(args.baseline) if args.baseline else None
    written = write_report(args.dir, args.format, baseline, plots=not args.no_plots)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


COMMANDS = {"adapt": cmd_adapt, "corrupt": cmd_corrupt, "demo": cmd_demo, "bench": cmd_bench, "sweep": cmd_bench,
            "analyze": cmd_analyze, "bank": cmd_bank, "report": cmd_report}  # fmt: skip


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
        from .data import follow_outside_links

        with follow_outside_links(getattr(args, "follow_links", False)):
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
        from .results import OutOfSpaceError

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
