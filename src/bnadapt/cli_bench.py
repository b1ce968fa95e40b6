"""`bnadapt bench|sweep|analyze`: run the benchmark protocol from the command line (kept apart from cli.py for size)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ._cli_util import _add_option_arg, _advance, _int_list, _name_list, _positive_int, _progress_bar, _severities

SWEEP_NS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _add_bench_data_args(p: argparse.ArgumentParser, severities: tuple[int, ...] = (1, 2, 3, 4, 5)) -> None:
    """The model and data groups of bench, sweep and analyze."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        required=True,
        nargs="+",
        metavar="NAME",
        help="one or more of cifar10_resnet20/32/44/56/110, torchvision:<name>, timm:<name>",
    )
    g.add_argument("--checkpoint", type=Path, help="state dict to load into --model (one model only)")
    g.add_argument("--weights", help="torchvision weights enum (e.g. IMAGENET1K_V1), from the local cache only")
    g.add_argument("--trust-checkpoint", action="store_true", help="allow unpickling Python objects (trusted files)")
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=True,
        help="cifar-c:DIR, imagenet-c:DIR, folder:DIR, npz:FILE or "
        "generate:<cifar|imagenet>:<npz|DIR> (clean images corrupted on the fly)",
    )
    g.add_argument("--clean", type=Path, help="clean .npz or class folder to evaluate too (cifar-c/imagenet-c data)")
    g.add_argument(
        "--corruptions",
        nargs="+",
        metavar="NAME",
        help="names, or common, extra, all, noise, blur, weather, digital (default: all 19)",
    )
    g.add_argument("--severities", "--severity", dest="severities", type=_severities, default=severities,
                   help=f"e.g. 1-5 or 1,3,5 (default: {','.join(map(str, severities))})")  # fmt: skip
    g.add_argument("--corrupt-seed", type=int, default=0, help="seed of generate:'s corruptions (default: 0)")
    g.add_argument("--allow-partial", action="store_true", help="run the cells the data has, skip missing ones")
    g.add_argument("--release-jpeg", action="store_true",
                   help="generate: JPEG q85 round trip after each corruption, as ImageNet-C's files had")  # fmt: skip
    g.add_argument(
        "--limit-per-cell",
        type=int,
        metavar="K",
        help="evaluate K images per cell, spread evenly over it (a subset, recorded in the results)",
    )


def _add_seeds_arg(g) -> None:
    g.add_argument("--seeds", "--seed", dest="seeds", type=_int_list, default=(0,), metavar="S1,S2",
                   help="seeds of the draws, e.g. 0,1,2 or 0-4 (default: 0)")  # fmt: skip


def _add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("-b", "--batch-size", type=_positive_int, default=256, help="evaluation batch (default: 256)")
    g.add_argument("-j", "--workers", type=int, help="DataLoader workers (default: 0 on cpu, min(8, cores) on cuda)")
    g.add_argument("--device", help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    g.add_argument("--amp", nargs="?", const=True, default=False, choices=("bf16", "fp16"),
                   help="autocast evaluation to bf16 or fp16 (bare --amp: bf16 on cpu, fp16 on cuda); BN statistics "
                   "are always estimated in float32")  # fmt: skip
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--cpu-decode", action="store_true",
                   help="on a GPU, still decode JPEGs and run generate:'s corruptions on the CPU workers")  # fmt: skip


def _add_bench_args(p: argparse.ArgumentParser, sweep: bool) -> None:
    from .adapt import method_names

    _add_bench_data_args(p)
    g = p.add_argument_group("protocol")
    g.add_argument(
        "--methods",
        type=_name_list,
        default=("source", "replace"),
        metavar="M1,M2",
        help=f"comma list of {', '.join(method_names())} (default: source,replace)",
    )
    g.add_argument(
        "--n",
        type=_int_list,
        default=SWEEP_NS if sweep else (32,),
        metavar="N1,N2",
        help="adaptation images per cell, a comma list for a sweep (default: "
        f"{','.join(map(str, SWEEP_NS)) if sweep else 32})",
    )
    _add_seeds_arg(g)
    g.add_argument("--prior", type=float, default=16.0, help="prior strength N for the prior method (default: 16)")
    g.add_argument("--part", choices=("both", "mean", "var"), default="both", help="statistics to adapt")
    depth = g.add_mutually_exclusive_group()
    depth.add_argument("--first", type=_positive_int, metavar="K", help="adapt only the first K BN layers")
    depth.add_argument("--last", type=_positive_int, metavar="K", help="adapt only the last K BN layers")
    _add_option_arg(g)
    g.add_argument(
        "--adapt-on", metavar="CELL", help="adapt on this one cell (e.g. fog:3, or clean) and evaluate on every cell"
    )
    _add_run_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, help="results folder (results.jsonl, summary.json, report.md)")
    g.add_argument("--resume", action="store_true", help="skip the cells already in --out")
    g.add_argument("--force", action="store_true", help="write into a folder holding results of another command")
    g.add_argument("--baseline", type=Path, help="JSON of baseline errors for CE/mCE (default: AlexNet on ImageNet-C)")
    g.add_argument("--no-plots", action="store_true", help="tables only")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")  # fmt: skip
    g = p.add_argument_group("distributed (launch with torchrun --nproc-per-node K -m bnadapt bench ...)")
    g.add_argument("--shard-cells", action="store_true",
                   help="split each cell's images (and replace/prior's adaptation sample) over the ranks, instead "
                   "of giving each rank whole cells")  # fmt: skip
    g.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="how long a rank waits for the others (default: 1800)")  # fmt: skip


def _print_summary(summary: list[dict]) -> None:
    many = len({s["model"] for s in summary}) > 1
    header = (
        f"{'model  ' if many else ''}{'method':<12}{'n':>5}{'seeds':>7}{'mean acc %':>14}{'clean %':>9}{'mCE %':>8}"
    )
    print(header)
    print("-" * len(header))
    for s in summary:
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
        mean = pct(s["mean_acc"]) + (f"±{100 * s['mean_acc_std']:.1f}" if s["mean_acc_std"] else "")
        seeds = len([t for t in s["seeds"] if t is not None]) or "-"
        print(
            f"{s['model'] + '  ' if many else ''}{s['method']:<12}{s['n'] or '-':>5}{seeds:>7}{mean:>14}"
            f"{pct(s['clean_acc']):>9}{pct(s['mce']):>8}"
        )


def _corruption_names(items: Sequence[str] | None) -> list[str]:
    """--corruptions (names or groups such as common; default all 19) as a list of names without repeats."""
    from .corruptions import GROUPS

    names: list[str] = []
    for item in items or ["all"]:
        names.extend(GROUPS.get(item, (item,)))
    return list(dict.fromkeys(names))


def _open_bench_data(args: argparse.Namespace):
    """The cells of --data x --corruptions x --severities, as bench and analyze take them."""
    from .data import open_data

    names = _corruption_names(args.corruptions)
    return open_data(args.data, names, args.severities, args.allow_partial, args.corrupt_seed, clean=args.clean,
                     limit=args.limit_per_cell, release_jpeg=args.release_jpeg)  # fmt: skip


def _device(args: argparse.Namespace) -> str:
    """--device, defaulting to cuda when a GPU is usable."""
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def _workers(args: argparse.Namespace) -> int:
    if args.workers is not None or _device(args) == "cpu":
        return args.workers or 0
    # torchrun's processes on one node share its cores.
    return max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def cmd_bench(args: argparse.Namespace) -> int:
    from .distributed import RankFailure, check_shardable, init_from_env

    if args.shard_cells:  # refused before joining the others: every rank runs the same check
        check_shardable([m for m in args.methods if m in _method_names()])
    dist, device = init_from_env(_device(args), args.dist_timeout, args.shard_cells)
    try:
        return _bench(args, dist, device)
    except RankFailure as e:
        if dist.rank == 0 or e.rank == 0:
            print(f"bnadapt: error: {e}; finished cells are in {args.out / 'results.jsonl'}, rerun with --resume",
                  file=sys.stderr)  # fmt: skip
        return e.exit_code
    finally:
        dist.close()


def _method_names() -> list[str]:
    from .adapt import method_names

    return method_names()


def _bench(args: argparse.Namespace, dist, device: str) -> int:
    from .adapt import parse_options
    from .benchmark import BenchConfig, run_benchmark
    from .metrics import load_baseline
    from .models import load_model
    from .report import build_summary, write_report

    try:  # a mistake on one rank stops every rank, before anything is written
        if args.checkpoint is not None and len(args.model) > 1:
            raise ValueError(
                f"expected one --model with --checkpoint, got {len(args.model)} models; run them separately"
            )
        baseline = load_baseline(args.baseline) if args.baseline else None
        data = _open_bench_data(args)
        models = {m: load_model(m, args.checkpoint, args.weights, args.trust_checkpoint) for m in args.model}
    except Exception as e:
        dist.gathered(e, None)
        raise
    dist.gathered(None, None)
    extra = {"clean": str(args.clean) if args.clean else None}
    if args.limit_per_cell is not None:  # only when set: results of earlier versions stay resumable
        extra["limit_per_cell"] = args.limit_per_cell
    if args.release_jpeg:
        extra["release_jpeg"] = True
    config = BenchConfig(
        tuple(args.methods),
        tuple(args.n),
        tuple(args.seeds),
        args.batch_size,
        _workers(args),
        device,
        args.amp,
        args.channels_last,
        args.prior,
        args.part,
        args.adapt_on,
        extra,
        args.first,
        args.last,
        # Unknown methods are left to config.validate(), whose message names --methods.
        parse_options([m for m in args.methods if m in _method_names()], args.opt),
        decode="cpu" if args.cpu_decode else "auto",
    )
    bar = _progress_bar(0, not args.no_progress and dist.rank == 0, "cell")

    def progress(done: int, total: int, label: str, accs: dict[str, float]) -> None:
        shown = " ".join(f"{k} {100 * v:.1f}%" for k, v in list(accs.items())[:4])
        bar.set_postfix_str(f"{label}: {shown}", refresh=False)
        _advance(bar, 1, total)

    t0 = time.perf_counter()
    try:
        run_benchmark(
            models,
            data,
            config,
            out=args.out,
            command=["bnadapt", *args.argv],
            resume=args.resume,
            force=args.force,
            progress=progress,
            dist=dist,
        )
    except KeyboardInterrupt:
        bar.close()
        print(
            f"bnadapt: interrupted; finished cells are in {args.out / 'results.jsonl'}: rerun with --resume to "
            "continue",
            file=sys.stderr,
        )
        return 130
    finally:
        bar.close()
    if dist.rank != 0:  # rank 0 writes the results, the summary and the report
        return 0
    loaded = build_summary(args.out, baseline)
    write_report(args.out, "md", baseline, plots=not args.no_plots, loaded=loaded)
    _print_summary(loaded.summary)
    print(
        f"\n{len(loaded.rows)} results in {args.out} (results.jsonl, summary.json, report.md) in "
        f"{time.perf_counter() - t0:.0f}s"
    )
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analyze import run_analysis
    from .benchmark import BenchConfig
    from .models import load_model

    if len(args.model) > 1:
        raise ValueError(f"expected one --model for analyze, got {len(args.model)}; run one analysis per model")
    data = _open_bench_data(args)
    model = load_model(args.model[0], args.checkpoint, args.weights, args.trust_checkpoint)
    config = BenchConfig(ns=(args.n,), seeds=tuple(args.seeds), batch_size=args.batch_size, jobs=_workers(args),
                         device=_device(args), amp=args.amp, channels_last=args.channels_last,
                         decode="cpu" if args.cpu_decode else "auto")  # fmt: skip
    bar = _progress_bar(0, not args.no_progress, "cell")

    def progress(done: int, total: int, label: str, accs: dict[str, float]) -> None:
        bar.set_postfix_str(f"{label}: " + " ".join(f"{k} {100 * v:.1f}%" for k, v in accs.items()), refresh=False)
        _advance(bar, done - bar.n, total)

    t0 = time.perf_counter()
    try:
        result = run_analysis(args.analysis, {args.model[0]: model}, data, config, args.out, ks=args.ks,
                              command=["bnadapt", *args.argv], resume=args.resume, plots=not args.no_plots,
                              progress=progress)  # fmt: skip
    except KeyboardInterrupt:
        print(f"bnadapt: interrupted; finished cells are kept in {args.out / args.analysis}: rerun with --resume to "
              "continue", file=sys.stderr)  # fmt: skip
        return 130
    finally:
        bar.close()
    print(result.table)
    print(f"\nwrote {', '.join(str(p) for p in result.files)} in {time.perf_counter() - t0:.0f}s")
    return 0
