"""``bnadapt adapt`` (save a model adapted to target images) and ``bnadapt corrupt`` (write a corrupted dataset)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..names import BUILTIN_METHODS
from .args import (
    Progress,
    add_device_arg,
    add_follow_links_arg,
    add_model_args,
    add_no_progress_arg,
    add_option_arg,
    add_preprocessing_args,
    device_of,
    expand_corruptions,
    list_flag,
    model_loading,
    positive_int,
    preprocessing_overrides,
    severities,
)

__all__ = ["add_adapt_parser", "add_corrupt_parser", "cmd_adapt", "cmd_corrupt"]


def add_adapt_parser(sub) -> None:
    """Add ``adapt`` to the ``bnadapt`` subparsers ``sub``."""
    p = sub.add_parser("adapt", help="adapt a model's BN statistics to unlabeled target images and save it")
    add_model_args(p)
    add_preprocessing_args(p)
    p.add_argument(
        "--images",
        required=True,
        type=Path,
        help="image folder, or .npz/.npy of uint8 NHWC images; brought to the model's input size (see preprocessing)",
    )
    _add_adaptation_args(p)
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output: .pt (adapted checkpoint) or .safetensors (BN statistics only)",
    )
    add_follow_links_arg(p)


def _add_adaptation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("adaptation")
    # Checked when the command runs (_check_method), against the registry: building the parser imports no torch.
    g.add_argument(
        "--method",
        default="replace",
        metavar="NAME",
        help=f"one of {', '.join(BUILTIN_METHODS)} (default: replace)",
    )
    g.add_argument("--n", type=positive_int, default=32, help="adaptation images drawn from the input (default: 32)")
    g.add_argument(
        "--seed", type=int, default=0, help="seed of the draw of the n adaptation images from --images (default: 0)"
    )
    g.add_argument("--prior", type=float, help="prior strength N for --method prior (default: 16)")
    g.add_argument("--part", choices=("both", "mean", "var"), default="both", help="statistics to adapt")
    g.add_argument(
        "--layers",
        **list_flag(),
        metavar="PATTERN",
        help="adapt only BN layers matching these globs (spaces or commas)",
    )
    depth = g.add_mutually_exclusive_group()
    depth.add_argument("--first", type=positive_int, metavar="K", help="adapt only the first K BN layers")
    depth.add_argument("--last", type=positive_int, metavar="K", help="adapt only the last K BN layers")
    add_option_arg(g)
    g.add_argument("-b", "--batch-size", type=positive_int, default=256, help="micro-batch size (default: 256)")
    add_device_arg(g)


def add_corrupt_parser(sub) -> None:
    """Add ``corrupt`` to the ``bnadapt`` subparsers ``sub``."""
    p = sub.add_parser("corrupt", help="write a corrupted copy of a dataset in the CIFAR-10-C or ImageNet-C layout")
    p.add_argument("--input", required=True, type=Path, help=".npz with x (N,H,W,3) uint8 and y, or a class folder")
    p.add_argument("--profile", required=True, choices=("cifar", "imagenet"), help="severity constants to use")
    p.add_argument("--format", required=True, choices=("cifar-c", "imagenet-c"), help="output layout")
    p.add_argument("--out", required=True, type=Path, help="output directory (created, with missing parents)")
    p.add_argument(
        "--corruptions",
        **list_flag(),
        metavar="NAME",
        help="names, or common, extra, all, noise, blur, weather, digital, by spaces or commas (default: all 19)",
    )
    p.add_argument(
        "--severities", **list_flag(severities), default=(1, 2, 3, 4, 5), help="e.g. 1-5 or 1,3,5 (default 1-5)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the corruption noise (same seed, same bytes, whatever -j; default: 0)",
    )
    p.add_argument("-j", "--jobs", type=positive_int, default=1, help="worker processes (default: 1)")
    p.add_argument("--no-resize", action="store_true", help="imagenet-c: skip the resize 256 + centre crop 224")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable images with a warning instead of failing")
    p.add_argument("--force", action="store_true", help="write into a folder made with other options")
    add_no_progress_arg(p)
    add_follow_links_arg(p)


def cmd_adapt(args: argparse.Namespace) -> int:
    """Run ``bnadapt adapt``: adapt --model on --images and save it (or its BN statistics) to --out."""
    import json

    import torch

    from .._io import atomic_path
    from ..adapt import OPTION_ALIASES, adapt, is_online, method_options, parse_options, resolve_aliases
    from ..bn import BNStats, bn_layers
    from ..data import read_images
    from ..models import load_model, override_preprocessing, preprocess_of

    _check_method(args.method)
    out: Path = args.out
    if out.suffix not in (".pt", ".pth", ".safetensors"):
        raise ValueError(f"expected --out to end in .pt, .pth or .safetensors, got {out.name!r}")
    if is_online(args.method):
        raise ValueError(
            f"expected a method that produces fixed statistics to save, got {args.method!r}, which adapts while it "
            "runs; use it from the library (bnadapt.adapt) or in bnadapt bench"
        )
    options = parse_options([args.method], args.opt)
    model = load_model(args.model, **model_loading(args))
    model = override_preprocessing(model, inplace=True, **preprocessing_overrides(args))
    x, _ = read_images(args.images, preprocess=preprocess_of(model))
    t0 = time.perf_counter()
    try:
        adapted = adapt(
            model.to(device_of(args)),
            x,
            method=args.method,
            n=args.n,
            seed=args.seed,
            prior=args.prior,
            part=args.part,
            layers=args.layers,
            first=args.first,
            last=args.last,
            batch_size=args.batch_size,
            options=options,
        )
    except (RuntimeError, AssertionError) as e:  # the network could not run on these images (timm asserts sizes)
        raise ValueError(
            f"expected images the model can take, got {tuple(x.shape[1:])} (H, W, C) that it could not run on: "
            f"{str(e).splitlines()[0]}"
        ) from None
    adapted = adapted.cpu()  # the saved tensors then load on any machine, GPU or not
    layers = [n for n, _ in bn_layers(adapted)]
    meta = {
        "method": args.method,
        "n": str(args.n),
        "seed": str(args.seed),
        "model": args.model,
        "images": str(args.images),
        # The saved checkpoint holds the network only: the resize/crop and mean/std it was adapted under go with it.
        "preprocessing": json.dumps(model.preprocessing, sort_keys=True),
    }
    # The aliased options (prior's N) are recorded with their effective value, given or not.
    aliased = resolve_aliases(args.method, options, prior=args.prior)
    meta.update({k: str(aliased.get(k, v)) for k, v in method_options(args.method).items() if k in OPTION_ALIASES})
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


def _check_method(name: str) -> None:
    """argparse's own ``invalid choice`` message, against the registry as it is when the command runs."""
    from ..adapt import method_names

    known = method_names()
    if name not in known:
        raise ValueError(f"argument --method: invalid choice: {name!r} (choose from {', '.join(map(repr, known))})")


def cmd_corrupt(args: argparse.Namespace) -> int:
    """Run ``bnadapt corrupt``: write --input's images corrupted, in the --format layout, to --out."""
    from ..corruptions.export import export_corrupted

    names = expand_corruptions(args.corruptions)
    t0 = time.perf_counter()
    # A line per tenth of the images when not on a terminal; the first call counts what a resumed run had done.
    bar = Progress(not args.no_progress, "img", every=0.1)
    started = False

    def progress(step: int, total: int) -> None:
        nonlocal started
        if started:
            bar.advance(step, total, "images")
        else:
            bar.skip(step, total)
            started = True

    try:
        done = export_corrupted(
            args.input,
            args.out,
            args.format,
            args.profile,
            names,
            args.severities,
            args.seed,
            args.jobs,
            resize=not args.no_resize,
            skip_bad=args.skip_bad,
            force=args.force,
            progress=progress,
        )
    finally:
        bar.close()
    kind = "files" if args.format == "cifar-c" else "cells"
    n_images = bar.total // max(1, len(names) * len(args.severities))
    # What is on disk, not what was read: skipped images are not in the cells.
    written = n_images if args.format == "cifar-c" or not done else sum(1 for _ in done[0].rglob("*.JPEG"))
    skipped = f"; {n_images - written} unreadable skipped" if written != n_images else ""
    print(
        f"wrote {len(done)} {kind} ({len(names)} corruptions x {len(args.severities)} severities of {written} "
        f"images{skipped}) to {args.out} in {time.perf_counter() - t0:.1f}s"
    )
    return 0
