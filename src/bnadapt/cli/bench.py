"""``bnadapt bench|sweep|analyze``: the benchmark protocol and the style-shift analyses from the command line."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..names import ANALYSES, BUILTIN_METHODS
from .args import (
    Progress,
    add_bench_data_args,
    add_follow_links_arg,
    add_no_progress_arg,
    add_option_arg,
    add_run_args,
    add_seeds_arg,
    device_of,
    expand_corruptions,
    int_list,
    list_flag,
    model_loading,
    positive_int,
    preprocessing_overrides,
)

__all__ = ["SWEEP_NS", "add_analyze_parser", "add_bench_parsers", "cmd_analyze", "cmd_bench"]

SWEEP_NS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def add_bench_parsers(sub) -> None:
    """Add ``bench`` and ``sweep`` (bench with a list of sample sizes by default) to the subparsers ``sub``."""
    for name, text in (
        ("bench", "benchmark models on corrupted data: source vs adapted accuracy per cell"),
        ("sweep", "bench with a list of sample sizes (default --n 1,2,4,...,256)"),
    ):
        p = sub.add_parser(name, help=text)
        _add_bench_args(p, sweep=name == "sweep")
        add_follow_links_arg(p)


def _add_bench_args(p: argparse.ArgumentParser, sweep: bool) -> None:
    add_bench_data_args(p)
    g = p.add_argument_group("protocol")
    g.add_argument(
        "--methods",
        **list_flag(),
        default=("source", "replace"),
        metavar="M",
        help=f"some of {', '.join(BUILTIN_METHODS)}, by spaces or commas (default: source,replace)",
    )
    g.add_argument(
        "--n",
        **list_flag(int_list),
        default=SWEEP_NS if sweep else (32,),
        metavar="N",
        help="adaptation images per cell, several for a sweep (default: "
        f"{','.join(map(str, SWEEP_NS)) if sweep else 32})",
    )
    add_seeds_arg(g)
    g.add_argument("--prior", type=float, help="prior strength N for the prior method (default: 16)")
    g.add_argument("--momentum", type=float, help="ema's step towards each batch's statistics (default: 0.1)")
    g.add_argument("--part", choices=("both", "mean", "var"), default="both", help="statistics to adapt")
    depth = g.add_mutually_exclusive_group()
    depth.add_argument("--first", type=positive_int, metavar="K", help="adapt only the first K BN layers")
    depth.add_argument("--last", type=positive_int, metavar="K", help="adapt only the last K BN layers")
    add_option_arg(g)
    g.add_argument(
        "--adapt-on", metavar="CELL", help="adapt on this one cell (e.g. fog:3, or clean) and evaluate on every cell"
    )
    g.add_argument(
        "--order",
        default="shuffled",
        metavar="ORDER",
        help="order of each cell's images for online methods: shuffled (seeded), sorted (the data's own order), or "
        "dirichlet:ALPHA (label-correlated, NOTE/RoTTA; e.g. dirichlet:0.1) (default: shuffled)",
    )
    g.add_argument(
        "--setting",
        default="reset",
        choices=("reset", "continual", "gradual", "mixed"),
        help="reset: every cell from the source model; continual: the corruptions in a row per severity, no reset "
        "(CoTTA); gradual: severities 1..5..1 per corruption, no reset; mixed: all cells' images interleaved in one "
        "stream (default: reset)",
    )
    g.add_argument(
        "--refresh",
        type=positive_int,
        default=0,
        metavar="K",
        help="with --setting continual, gradual or mixed: offline methods (replace, prior, auto, ...) adapt again "
        "every K images, on the latest n images of the stream (default: once, on the stream's first n)",
    )
    add_run_args(p)
    _add_bench_output_args(p)


def _add_bench_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, help="results folder (results.jsonl, summary.json, report.md)")
    g.add_argument("--resume", action="store_true", help="skip the cells already in --out")
    g.add_argument("--force", action="store_true", help="write into a folder holding results of another command")
    g.add_argument("--baseline", type=Path, help="JSON of baseline errors for CE/mCE (default: AlexNet on ImageNet-C)")
    g.add_argument("--no-plots", action="store_true", help="tables only")
    add_no_progress_arg(g)
    g = p.add_argument_group("distributed (launch with torchrun --nproc-per-node K -m bnadapt bench ...)")
    g.add_argument(
        "--shard-cells",
        action="store_true",
        help="split each cell's images (and replace/prior's adaptation sample) over the ranks, instead "
        "of giving each rank whole cells",
    )
    g.add_argument(
        "--dist-timeout",
        type=float,
        default=1800.0,
        metavar="SECONDS",
        help="how long a rank waits for the others (default: 1800)",
    )


def add_analyze_parser(sub) -> None:
    """Add ``analyze`` (transfer, parts, depth) to the ``bnadapt`` subparsers ``sub``."""
    p = sub.add_parser("analyze", help="style-shift analyses: transfer matrix, mean vs variance, first vs last layers")
    p.add_argument(
        "analysis",
        choices=ANALYSES,
        help="transfer: adapt on A, evaluate on B; parts: mean/var/both; depth: first-k vs last-k layers",
    )
    add_bench_data_args(p, default_severities=(5,))
    g = p.add_argument_group("protocol")
    g.add_argument("--n", type=positive_int, default=32, help="adaptation images per run (default: 32)")
    add_seeds_arg(g)
    g.add_argument(
        "--ks",
        **list_flag(int_list),
        metavar="K",
        help="depth: numbers of BN layers (default: powers of two below the model's BN layer count)",
    )
    add_run_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, type=Path, help="folder; the analysis writes into OUT/<analysis>/")
    g.add_argument("--resume", action="store_true", help="skip the cells already finished in OUT/<analysis>/")
    g.add_argument("--no-plots", action="store_true", help="tables only")
    add_no_progress_arg(g)
    add_follow_links_arg(p)


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


def _load_models(args: argparse.Namespace) -> dict:
    """--model name -> model, each with the preprocessing flags applied."""
    from ..models import load_model, override_preprocessing

    models = {m: load_model(m, **model_loading(args)) for m in args.model}
    return {
        m: override_preprocessing(model, inplace=True, **preprocessing_overrides(args)) for m, model in models.items()
    }


def _open_bench_data(args: argparse.Namespace, models: dict):
    """The cells of --data x --corruptions x --severities, as bench and analyze take them; folder:/npz: data (and
    cifar-c's --clean) brought to the models' input size."""
    from ..data import cache_dir, open_data
    from ..models import preprocess_of

    names = expand_corruptions(args.corruptions)
    return open_data(
        args.data,
        names,
        args.severities,
        args.allow_partial,
        args.corrupt_seed,
        clean=args.clean,
        limit=args.limit_per_cell,
        release_jpeg=args.release_jpeg,
        preprocess={name: preprocess_of(m) for name, m in models.items()},
        cache=None if args.no_cache else args.cache_dir or cache_dir(),
        jobs=_workers(args),
    )


def _workers(args: argparse.Namespace) -> int:
    if args.workers is not None or device_of(args) == "cpu":
        return args.workers or 0
    # torchrun's processes on one node share its cores.
    return max(1, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


def _method_names() -> list[str]:
    from ..adapt import method_names

    return method_names()


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``bnadapt bench`` or ``sweep`` (also as one rank of torchrun), then print the summary table."""
    from ..distributed import RankFailure, check_shardable, init_from_env

    if args.shard_cells:  # refused before joining the others: every rank runs the same check
        check_shardable([m for m in args.methods if m in _method_names()])
    dist, device = init_from_env(device_of(args), args.dist_timeout, args.shard_cells)
    try:
        return _bench(args, dist, device)
    except RankFailure as e:
        if dist.rank == 0 or e.rank == 0:
            print(
                f"bnadapt: error: {e}; finished cells are in {args.out / 'results.jsonl'}, rerun with --resume",
                file=sys.stderr,
            )
        return e.exit_code
    finally:
        dist.close()


def _bench(args: argparse.Namespace, dist, device: str) -> int:
    from ..report import build_summary, write_report

    baseline, data, models = _bench_inputs(args, dist)
    config = _bench_config(args, device)
    t0 = time.perf_counter()
    if not _run_bench(args, dist, models, data, config):
        return 130
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


def _bench_inputs(args: argparse.Namespace, dist) -> tuple:
    """The baseline, the data and the models, or the first rank's error raised on every rank."""
    from ..metrics import load_baseline

    try:  # a mistake on one rank stops every rank, before anything is written
        if args.checkpoint is not None and len(args.model) > 1:
            raise ValueError(
                f"expected one --model with --checkpoint, got {len(args.model)} models; run them separately"
            )
        baseline = load_baseline(args.baseline) if args.baseline else None
        models = _load_models(args)  # first: folder: data is read at the models' input size
        data = _open_bench_data(args, models)
    except Exception as e:
        dist.gathered(e, None)
        raise
    dist.gathered(None, None)
    return baseline, data, models


def _bench_config(args: argparse.Namespace, device: str):
    """The BenchConfig of bench and sweep, from their flags."""
    from ..adapt import parse_options
    from ..benchmark import BenchConfig

    extra = {"clean": str(args.clean) if args.clean else None}
    if args.limit_per_cell is not None:  # only when set: results of earlier versions stay resumable
        extra["limit_per_cell"] = args.limit_per_cell
    if args.release_jpeg:
        extra["release_jpeg"] = True
    return BenchConfig(
        methods=tuple(args.methods),
        ns=tuple(args.n),
        seeds=tuple(args.seeds),
        batch_size=args.batch_size,
        jobs=_workers(args),
        device=device,
        amp=args.amp,
        channels_last=args.channels_last,
        prior=args.prior,
        momentum=args.momentum,
        part=args.part,
        adapt_on=args.adapt_on,
        extra=extra,
        first=args.first,
        last=args.last,
        # Unknown methods are left to config.validate(), whose message names --methods.
        options=parse_options([m for m in args.methods if m in _method_names()], args.opt),
        decode="cpu" if args.cpu_decode else "auto",
        order=args.order,
        setting=args.setting,
        refresh=args.refresh,
    )


def _run_bench(args: argparse.Namespace, dist, models: dict, data, config) -> bool:
    """Run the benchmark with a progress bar; False when interrupted (the finished cells are kept)."""
    from ..benchmark import run_benchmark

    bar = Progress(not args.no_progress and dist.rank == 0, "cell")

    try:
        run_benchmark(
            models,
            data,
            config,
            out=args.out,
            command=["bnadapt", *args.argv],
            resume=args.resume,
            force=args.force,
            progress=bar.update,
            dist=dist,
        )
    except KeyboardInterrupt:
        bar.close()
        print(
            f"bnadapt: interrupted; finished cells are in {args.out / 'results.jsonl'}: rerun with --resume to "
            "continue",
            file=sys.stderr,
        )
        return False
    finally:
        bar.close()
    return True


def cmd_analyze(args: argparse.Namespace) -> int:
    """Run ``bnadapt analyze``: one analysis of one model, its table printed and written under OUT/<analysis>/."""
    from ..analyze import run_analysis
    from ..benchmark import BenchConfig

    if len(args.model) > 1:
        raise ValueError(f"expected one --model for analyze, got {len(args.model)}; run one analysis per model")
    models = _load_models(args)
    data = _open_bench_data(args, models)
    model = models[args.model[0]]
    config = BenchConfig(
        ns=(args.n,),
        seeds=tuple(args.seeds),
        batch_size=args.batch_size,
        jobs=_workers(args),
        device=device_of(args),
        amp=args.amp,
        channels_last=args.channels_last,
        decode="cpu" if args.cpu_decode else "auto",
    )
    bar = Progress(not args.no_progress, "cell")

    t0 = time.perf_counter()
    try:
        result = run_analysis(
            args.analysis,
            {args.model[0]: model},
            data,
            config,
            args.out,
            ks=args.ks,
            command=["bnadapt", *args.argv],
            resume=args.resume,
            plots=not args.no_plots,
            progress=bar.update,
        )
    except KeyboardInterrupt:
        print(
            f"bnadapt: interrupted; finished cells are kept in {args.out / args.analysis}: rerun with --resume to "
            "continue",
            file=sys.stderr,
        )
        return 130
    finally:
        bar.close()
    print(result.table)
    print(f"\nwrote {', '.join(str(p) for p in result.files)} in {time.perf_counter() - t0:.0f}s")
    return 0
