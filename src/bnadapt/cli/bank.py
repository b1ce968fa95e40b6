"""``bnadapt bank build|show``: build a bank of BN statistics of known conditions, or print one."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .args import (
    Parser,
    Progress,
    add_corrupt_seed_arg,
    add_device_arg,
    add_model_args,
    add_no_progress_arg,
    device_of,
    expand_corruptions,
    list_flag,
    model_loading,
    positive_int,
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
        **list_flag(),
        metavar="NAME",
        default=("common",),
        help="names, or common, extra, all, noise, blur, weather, digital, by spaces or commas (default: common)",
    )
    p.add_argument("--severities", **list_flag(severities), default=(1, 3, 5), help="e.g. 1,3,5 (default) or 1-5")
    add_corrupt_seed_arg(p)
    p.add_argument("--limit-per-cell", type=int, metavar="K", help="draw from K images per cell, spread evenly")
    p.add_argument("--n", type=positive_int, default=64, help="images per condition (default: 64)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the draw of the n images of each condition (default: 0)"
    )
    p.add_argument("--k-signature", type=positive_int, default=3, help="BN layers the signature reads (default: 3)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=256, help="micro-batch size (default: 256)")
    add_device_arg(p)
    p.add_argument("--out", required=True, type=Path, help="the bank file to write (.safetensors)")
    add_no_progress_arg(p)
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
    data = open_data(
        args.data,
        expand_corruptions(args.corruptions),
        args.severities,
        seed=args.corrupt_seed,
        clean=args.clean,
        limit=args.limit_per_cell,
    )
    device = device_of(args)
    model = load_model(args.model, **model_loading(args)).to(device)
    bar = Progress(not args.no_progress, "cond")
    t0 = time.perf_counter()
    try:
        bank = build_bank_from_data(
            model,
            data,
            args.n,
            args.seed,
            args.k_signature,
            args.batch_size,
            device,
            model_name=args.model,
            progress=lambda done, total, name: bar.update(done, total, name),
        )
    finally:
        bar.close()
    bank.save(args.out)
    print(
        f"built a bank of {len(bank.conditions)} conditions (n={args.n}, seed {args.seed}) for {args.model} in "
        f"{time.perf_counter() - t0:.1f}s -> {args.out}"
    )
    return 0
