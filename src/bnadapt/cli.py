"""The ``bnadapt`` command: parses arguments, calls one library function per subcommand, prints the result.

User mistakes (bad paths, names, shapes) end with a one-line ``bnadapt: error: ...`` and exit code 2, never a
traceback, and nothing half-written.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2

# Errors that mean "the input or the options are wrong"; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like every other user error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _severities(text: str) -> tuple[int, ...]:
    try:
        if "-" in text:
            lo, hi = (int(t) for t in text.split("-", 1))
            values = tuple(range(lo, hi + 1))
        else:
            values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected severities like 1-5 or 1,3,5, got {text!r}") from None
    if not values or any(not 1 <= v <= 5 for v in values):
        raise argparse.ArgumentTypeError(f"expected severities within 1..5, got {text!r}")
    return values


def _progress_bar(total: int, enabled: bool, unit: str):
    """A tqdm bar on a terminal (and when not disabled), else a no-op with the same update()/close() calls."""
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, dynamic_ncols=True, disable=not enabled or not sys.stderr.isatty())


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="cifar10_resnet20/32/44/56/110, torchvision:<name> or timm:<name>")
    g.add_argument("--checkpoint", type=Path, help="state dict to load into --model (.pt/.pth/.th)")
    g.add_argument("--weights", help="torchvision weights enum (e.g. IMAGENET1K_V1), from the local cache only")
    g.add_argument(
        "--trust-checkpoint", action="store_true", help="allow unpickling Python objects (trusted files only)"
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
    g.add_argument("-b", "--batch-size", type=_positive_int, default=256, help="micro-batch size (default: 256)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def cmd_adapt(args: argparse.Namespace) -> int:
    import torch

    from .adapt import adapt, is_online
    from .bn import BNStats, atomic_path, bn_layers
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
    model = load_model(args.model, args.checkpoint, args.weights, args.trust_checkpoint)
    x, _ = read_images(args.images)
    t0 = time.perf_counter()
    try:
        adapted = adapt(
            model.to(args.device), x, method=args.method, n=args.n, seed=args.seed, prior=args.prior,
            part=args.part, layers=args.layers, first=args.first, last=args.last, batch_size=args.batch_size,
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
    from .corruptions import GROUPS
    from .corruptions.export import export_corrupted
    from .data import read_images

    names: list[str] = []
    for item in args.corruptions or ["all"]:
        names.extend(GROUPS.get(item, (item,)))
    names = list(dict.fromkeys(names))
    if args.format == "cifar-c" or not args.input.is_dir():
        n_images = len(read_images(args.input)[0]) if args.input.exists() else 0
    else:
        from .data import list_image_files

        n_images = len(list_image_files(args.input))
    t0 = time.perf_counter()
    bar = _progress_bar(n_images * len(names) * len(args.severities), not args.no_progress, "img")
    try:
        done = export_corrupted(
            args.input, args.out, args.format, args.profile, names, args.severities, args.seed, args.jobs,
            resize=not args.no_resize, skip_bad=args.skip_bad, force=args.force, progress=bar.update,
        )  # fmt: skip
    finally:
        bar.close()
    kind = "files" if args.format == "cifar-c" else "cells"
    print(f"wrote {len(done)} {kind} ({len(names)} corruptions x {len(args.severities)} severities of {n_images} "
          f"images) to {args.out} in {time.perf_counter() - t0:.1f}s")  # fmt: skip
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    t0 = time.perf_counter()
    print("bnadapt demo: a small BN CNN trained on clean scikit-learn digits (32x32 grey), tested on corrupted ones;")
    print("adaptation sees 32 unlabeled corrupted test images, no labels, no training. Accuracy in %:\n")
    clean, rows = run_demo(seed=args.seed)
    print(f"clean test accuracy: {100 * clean:.1f}%\n")
    header = f"{'corruption':<16}{'profile':<10}{'severity':>8}{'source':>9}{'replace':>9}{'prior':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        a = r.accuracy
        print(f"{r.corruption:<16}{r.profile:<10}{r.severity:>8}"
              f"{100 * a['source']:>9.1f}{100 * a['replace']:>9.1f}{100 * a['prior']:>9.1f}")  # fmt: skip
    means = {m: 100 * sum(r.accuracy[m] for r in rows) / len(rows) for m in ("source", "replace", "prior")}
    print("-" * len(header))
    print(f"{'mean':<34}{means['source']:>9.1f}{means['replace']:>9.1f}{means['prior']:>9.1f}")
    print(f"\nreplace: statistics of the 32 images (Benz et al. 2021); prior: N=16 source + n=32 target "
          f"(Schneider et al. 2020). {time.perf_counter() - t0:.0f}s.")  # fmt: skip
    return 0


COMMANDS = {"adapt": cmd_adapt, "corrupt": cmd_corrupt, "demo": cmd_demo}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bnadapt`` command; returns the exit code.

    Example:
        >>> main(["adapt", "--model", "nope", "--images", "x.npz", "--out", "y.pt"])  # doctest: +SKIP
        2
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="bnadapt: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except USER_ERRORS as e:
        if args.verbose:
            raise
        print(f"bnadapt: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("bnadapt: interrupted; finished outputs are kept, rerun the same command to continue", file=sys.stderr)
        return 130
