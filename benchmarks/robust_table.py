"""The paper's second claim as a table: does adaptation still help a model that is already robust, and by how much?

Usage: python benchmarks/robust_table.py OUT   (OUT: a `bnadapt bench` folder with several models, e.g.)

    bnadapt bench --model cifar10_resnet20 cifar10_resnet20_augmix --methods source replace prior auto --n 32 \
        --seeds 0-2 --data generate:cifar:../shared/data/cifar10/test1000_lossless.npz --out runs/robust

Reads OUT/summary.json and prints, per model and method: clean top-1, the mean over the 15 benchmark corruptions x
the severities run (mean over seeds, with the seed spread), the mean over the 4 held-out corruptions, and the gain
over the same model's source with its paired bootstrap 95% interval over the cells. Accuracies in %.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}"


def table(summary: list[dict]) -> str:
    """The markdown table of ``summary`` (summary.json's list), one row per (model, method, n)."""
    lines = [
        "| model | method | n | seeds | clean | 15 x 5 mean | seed std | 4 held-out | gain over source [95% CI] |",
        "|---|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for s in summary:
        ci = s.get("diff_to_source_ci95")
        gain = "" if s["diff_to_source"] is None else f"{100 * s['diff_to_source']:+.2f}"
        if ci:
            gain += f" [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}]"
        seeds = ",".join(str(x) for x in s["seeds"] if x is not None) or "-"
        lines.append(
            f"| {s['model']} | {s['method']} | {s['n']} | {seeds} | {_pct(s['clean_acc'])} | {_pct(s['mean_acc'], 2)} "
            f"| {_pct(s['seed_std'], 2)} | {_pct(s['mean_acc_extra'], 2)} | {gain} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    summary = json.loads((Path(sys.argv[1]) / "summary.json").read_text())
    print(table(summary))


if __name__ == "__main__":
    main()
