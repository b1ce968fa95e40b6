"""``bnadapt bank build|show``: build a bank of BN statistics of known conditions, or print one."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .args import (
    Parser,
    add_model_args,
    advance,
    expand_corruptions,
    model_loading,
    positive_int,
    progress_bar,
    severities,
)

__all__ = ["add_bank_parser", "cmd_bank"]


def add_bank_parser(sub) -> None:
    """Add ``bank build`` and ``bank show`` to the ``bnadapt`` subparsers ``sub``."""
    p = sub.add_parser("bank", help="build or show a bank of BN statistics of known conditions (method bank)")
    bank = p.add_subparsers(dest="bank_command", metavar="{build,show}", required=True, parser_class=Parser)
    p = bank.add_parser("build", help="estimate BN statistics and signatures per condition into one .safetensors")
    add_model_args(p)
    # Not bench's data group: bank build has its own defaults and no group heading in its help.
    p.add_argument("--data", required=True, help="like bench's --data, e.g. generate:cifar:clean.npz (needs clean)")
    p.add_argument("--clean", type=Path, help="clean .npz or class folder (cifar-c/imagenet-c data)")
    p.add_argument(
        "--corruptions",
        nargs="+",
        metavar="NAME",
        default=["common"],
        help="names, or common, extra, all, noise, blur, weather, digital (default: common)",
    )
    p.add_argument("--severities", type=severities, default=(1, 3, 5), help="e.g. 1,3,5 (default) or 1-5")
    p.add_argument("--corrupt-seed", type=int, default=0, help="seed of generate:'s corruptions (default: 0)")
    p.add_argument("--limit-per-cell", type=int, metavar="K", help="draw from K images per cell, spread evenly")
    p.add_argument("--n", type=positive_int, default=64, help="images per condition (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw of those images (default: 0)")
    p.add_argument("--k-signature", type=positive_int, default=3, help="BN layers the signature reads (default: 3)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=256, help="micro-batch size (default: 256)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--out", required=True, type=Path, help="the bank file to write (.safetensors)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = bank.add_parser("show", help="print a bank file's conditions and how it was built")
    p.add_argument("file", type=Path, help="a .safetensors bank from bnadapt bank build")


def cmd_bank(args: argparse.Namespace) -> int:
    """Run ``bnadapt bank show`` (print a bank file) or ``bnadapt bank build`` (write one to --out)."""
    if args.bank_command == "show":
        return _show(args)
    return _build(args)


def _show(args: argparse.Namespace) -> int:
    from ..bank import Bank

    bank = Bank.load(args.file)
    info = bank.info
    print(
        f"bank {args.file}: {len(bank.conditions)} conditions, {len(bank.layers)} BN layers of "
        f"{info.get('model')}, n={info.get('n')} seed={info.get('seed')}, signature of the first "
        f"{len(bank.signature_layers)} BN layers, fallback thresholds "
        f"{', '.join(f'{k} {v:.3g}' for k, v in bank.thresholds.items())}, bnadapt "
        f"{info.get('bnadapt_version')}"
    )
    if info.get("data"):
        print(f"data: {info['data']}")
    print("conditions: " + " ".join(bank.conditions))
    return 0


def _build(args: argparse.Namespace) -> int:
    from ..bank import build_bank_from_data
    from ..data import open_data
    from ..models import load_model

    if args.out.suffix != ".safetensors":
        raise ValueError(f"expected --out to end in .safetensors, got {args.out.name!r}")
    if not args.out.parent.is_dir():
        raise FileNotFoundError(f"expected an existing directory for --out, got none at {args.out.parent}; create it")
    data = open_data(
        args.data,
        expand_corruptions(args.corruptions),
        args.severities,
        seed=args.corrupt_seed,
        clean=args.clean,
        limit=args.limit_per_cell,
    )
    model = load_model(args.model, **model_loading(args)).to(args.device)
    bar = progress_bar(0, not args.no_progress, "cond")
    t0 = time.perf_counter()
    try:
        bank = build_bank_from_data(
            model,
            data,
            args.n,
            args.seed,
            args.k_signature,
            args.batch_size,
            args.device,
            model_name=args.model,
            progress=lambda done, total, name: advance(bar, 1, total),
        )
    finally:
        bar.close()
    bank.save(args.out)
    print(
        f"built a bank of {len(bank.conditions)} conditions (n={args.n}, seed {args.seed}) for {args.model} in "
        f"{time.perf_counter() - t0:.1f}s -> {args.out}"
    )
    return 0
