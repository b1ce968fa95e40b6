"""Held-out evaluation of the statistics bank (docs/results.md).

The 1000 lossless CIFAR-10 test images are split: images 0..499 build a ResNet-20 bank (the 15 benchmark corruptions
at severities 1, 3, 5, plus clean; n=64), images 500..999 are corrupted on the fly with all 19 corruptions x 5
severities (+ clean) and classified one batch at a time by

- ``source``, ``test-batch`` and ``bank`` (default options: pooled covariance, clean_prior 0.5) and ``bank`` with
  ``covariance=diagonal`` at batch size 1 and at batch size 16 (a fresh copy per cell, as ``bnadapt bench`` does for
  online methods), run side by side on the same images, timed per call;
- the oracle: the bank's own entry of the right corruption at the nearest stored severity (2 -> 3, 4 -> 5: ties go
  to the stronger one), i.e. ``replace`` with n=64 statistics of the build half; known corruptions only.

Selection accuracy: the share of the bank's calls whose chosen entry has the cell's corruption (clean cells: the
clean entry or the fallback, which both hold the source statistics).

Usage (from the repository root):
    PYTHONPATH=src python benchmarks/bank_eval.py --out runs/bank_eval [--limit-per-cell 200]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bnadapt import adapt, load_model
from bnadapt.bank import FALLBACK, Bank, build_bank_from_data
from bnadapt.corruptions import GROUPS
from bnadapt.data import CLEAN, open_data, read_images, to_float_nchw
from bnadapt.report import ABBR

STORED = (1, 3, 5)
ONLINE = ("source", "test-batch", "bank", "bank-diagonal")
BANKS = ("bank", "bank-diagonal")


def _split(src: Path, out: Path) -> tuple[Path, Path]:
    x, y = read_images(src)
    assert y is not None
    paths = out / "build500.npz", out / "eval500.npz"
    np.savez(paths[0], x=x[:500], y=y[:500])
    np.savez(paths[1], x=x[500:1000], y=y[500:1000])
    return paths


def _nearest(severity: int) -> int:
    return min(STORED, key=lambda s: (abs(s - severity), -s))


def _run_cell(model, options, x, y, batch):
    """Accuracy per method at one batch size, the banks' selection counts, and seconds per method."""
    models = {m: adapt(model, method=m) for m in ONLINE[:2]}
    models["bank"] = adapt(model, method="bank", options=options)
    models["bank-diagonal"] = adapt(model, method="bank", options={**options, "covariance": "diagonal"})
    correct = dict.fromkeys(ONLINE, 0)
    seconds = dict.fromkeys(ONLINE, 0.0)
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            xb, yb = x[i : i + batch], y[i : i + batch]
            for m, net in models.items():  # side by side: the machine's load hits every method alike
                t0 = time.perf_counter()
                pred = net(xb).argmax(1)
                seconds[m] += time.perf_counter() - t0
                correct[m] += int((pred == yb).sum())
    return {m: correct[m] / len(x) for m in ONLINE}, {m: dict(models[m].counts) for m in BANKS}, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=Path, default=Path("../shared/data/cifar10/test1000_lossless.npz"))
    p.add_argument("--model", default="cifar10_resnet20")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-per-cell", type=int, help="evaluate K of the 500 images per cell (spread evenly)")
    p.add_argument("--opt", action="append", default=[], help="bank method option KEY=VALUE (e.g. mix=true)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-image calls)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tables-only", action="store_true", help="print the tables of a finished run in --out")
    args = p.parse_args()
    if args.tables_only:
        print(tables(json.loads((args.out / "bank_eval.json").read_text())["rows"]))
        return
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    build_npz, eval_npz = _split(args.images, args.out)
    model = load_model(args.model).eval()
    bank_path = args.out / "bank.safetensors"
    t0 = time.perf_counter()
    data = open_data(f"generate:cifar:{build_npz}", list(GROUPS["common"]), STORED)
    build_bank_from_data(model, data, args.n, args.seed, model_name=args.model).save(bank_path)
    build_s = time.perf_counter() - t0
    print(f"bank of {len(data.cells)} conditions built in {build_s:.1f}s -> {bank_path}", flush=True)
    bank = Bank.load(bank_path, model)
    options = {"bank": str(bank_path), **dict(o.split("=", 1) for o in args.opt)}
    oracle = {c: bank.stats[c].apply_to(adapt(model, method="source")) for c in bank.conditions}

    evaluation = open_data(f"generate:cifar:{eval_npz}", list(GROUPS["all"]), (1, 2, 3, 4, 5),
                           limit=args.limit_per_cell)  # fmt: skip
    rows = []
    t_start = time.perf_counter()
    for k, (c, s) in enumerate(evaluation.cells):
        images = evaluation.cell(c, s)
        x = to_float_nchw(images.get(np.arange(len(images))))
        y = torch.from_numpy(images.labels)
        row = {"corruption": c, "severity": s, "total": len(x), "known": c == CLEAN or c in GROUPS["common"]}
        for batch in (1, 16):
            acc, counts, secs = _run_cell(model, options, x, y, batch)
            row[f"b{batch}"] = {"accuracy": acc, "seconds": secs}
            for m in BANKS:
                row[f"b{batch}"][m] = _selection(counts[m], c, s, row["known"])
        entry = CLEAN if c == CLEAN else f"{c}:{_nearest(s)}"
        if entry in oracle:
            with torch.inference_mode():
                row["oracle"] = float((oracle[entry](x).argmax(1) == y).float().mean())
            row["oracle_entry"] = entry
        rows.append(row)
        accs = " ".join(f"{m} {100 * a:.1f}" for m, a in row["b1"]["accuracy"].items())
        b1, b16 = row["b1"], row["b16"]
        print(f"[{k + 1}/{len(evaluation.cells)}] {c}:{s} b1 {accs} sel {100 * b1['bank']['selection']:.0f}% | "
              f"b16 bank {100 * b16['accuracy']['bank']:.1f} sel {100 * b16['bank']['selection']:.0f}% | "
              f"oracle {100 * row.get('oracle', float('nan')):.1f} ({time.perf_counter() - t_start:.0f}s)",
              flush=True)  # fmt: skip
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "build_seconds": build_s,
              "eval_seconds": time.perf_counter() - t_start, "thresholds": bank.thresholds, "rows": rows}  # fmt: skip
    (args.out / "bank_eval.json").write_text(json.dumps(result, indent=1))
    print(tables(rows))


def _selection(counts: dict[str, int], c: str, s: int, known: bool) -> dict:
    calls = sum(counts.values())
    right = sum(v for e, v in counts.items() if e.split(":")[0] == c or (c == CLEAN and e == FALLBACK))
    exact = counts.get(CLEAN if c == CLEAN else f"{c}:{s}", 0) + (counts[FALLBACK] if c == CLEAN else 0)
    if not known:  # no entry of this corruption: nothing is right
        right = exact = float("nan")
    return {"counts": counts, "calls": calls, "selection": right / calls, "exact": exact / calls,
            "fallback": counts[FALLBACK] / calls}  # fmt: skip


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def tables(rows: list[dict]) -> str:
    """Markdown tables: accuracy by group, selection, and time per image at batch size 1."""
    groups = {
        "clean": lambda r: r["corruption"] == CLEAN,
        "known (15x5)": lambda r: r["known"] and r["corruption"] != CLEAN,
        "known, stored sev 1,3,5": lambda r: r["known"] and r["corruption"] != CLEAN and r["severity"] in STORED,
        "known, sev 2,4": lambda r: r["known"] and r["corruption"] != CLEAN and r["severity"] not in STORED,
        "unseen (4x5)": lambda r: not r["known"],
    }
    pct = lambda v: "-" if v != v else f"{100 * v:.1f}"  # noqa: E731 - NaN: not defined
    out = ["| method | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for batch in (1, 16):
        for m in ONLINE:
            vals = [_mean(r[f"b{batch}"]["accuracy"][m] for r in rows if f(r)) for f in groups.values()]
            out.append(f"| {m} -b {batch} | " + " | ".join(pct(v) for v in vals) + " |")
    vals = [_mean(r["oracle"] for r in rows if f(r) and "oracle" in r) for f in groups.values()]
    out.append("| oracle (bank entry, nearest stored severity) | " + " | ".join(pct(v) for v in vals) + " |")
    out += ["", "| bank selection | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for m in BANKS:
        for batch in (1, 16):
            for key, text in (("selection", "right corruption"), ("exact", "exact entry"), ("fallback", "fallback")):
                vals = [_mean(r[f"b{batch}"][m][key] for r in rows if f(r)) for f in groups.values()]
                out.append(f"| {m} -b {batch}: {text} | " + " | ".join(pct(v) for v in vals) + " |")
    images = sum(r["total"] for r in rows)
    ms = {m: 1000 * sum(r["b1"]["seconds"][m] for r in rows) / images for m in ONLINE}
    out += ["", "| -b 1, per image | " + " | ".join(ONLINE) + " |", "|---|" + "---:|" * len(ONLINE),
            "| ms | " + " | ".join(f"{ms[m]:.2f}" for m in ONLINE) + " |",
            "| x source | " + " | ".join(f"{ms[m] / ms['source']:.2f}" for m in ONLINE) + " |"]  # fmt: skip
    names = list(GROUPS["all"])
    out += ["", "| -b 1 (mean over severities) | " + " | ".join(ABBR[n] for n in names) + " |",
            "|---|" + "---:|" * len(names)]  # fmt: skip
    for label, get in (
        ("source", lambda r: r["b1"]["accuracy"]["source"]),
        ("bank", lambda r: r["b1"]["accuracy"]["bank"]),
        ("bank-diagonal", lambda r: r["b1"]["accuracy"]["bank-diagonal"]),
        ("oracle", lambda r: r.get("oracle", float("nan"))),
        ("bank: right corruption", lambda r: r["b1"]["bank"]["selection"]),
    ):
        out.append(f"| {label} | " + " | ".join(pct(_mean(get(r) for r in rows if r["corruption"] == n))
                                                 for n in names) + " |")  # fmt: skip
    return "\n".join(out)


if __name__ == "__main__":
    main()
