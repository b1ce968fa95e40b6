"""Print issue 6's goal table from one or more bench results folders: per method (and prior N), mean accuracy over
the 15 x 5 benchmark grid, the 4 held-out corruptions x 5, clean, severity 1, and single cells, with the spread over
seeds.

    python benchmarks/method_goals.py runs/r20_auto [runs/r20_prior8 ...]

A method's mean is taken per seed (over the cells of that seed) and then averaged over seeds; +- is the standard
deviation over seeds. Only cells every listed method has are used, so folders run with different subsets compare fairly
only when their subsets agree (the header's limit_per_cell is printed).
"""

from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path

from bnadapt.corruptions import COMMON, EXTRA
from bnadapt.results import read_results


def _label(row: dict, header: dict) -> str:
    if row["method"] == "prior":
        return f"prior N={header['config']['prior']:g}"
    opts = header["fingerprint"].get("options")
    return row["method"] + (f" {opts}" if opts and row["method"] == "auto" else "")


def load(folders: list[Path], seeds: set[int] | None = None) -> dict[str, dict[int | None, dict[tuple, float]]]:
    """label -> seed -> (corruption, severity) -> accuracy (only ``seeds``, and the seedless rows, when given)."""
    out: dict[str, dict] = defaultdict(lambda: defaultdict(dict))
    for folder in folders:
        headers, rows = read_results(folder / "results.jsonl")
        header = headers[0]
        limit = header["fingerprint"].get("limit_per_cell")
        print(f"{folder}: {len(rows)} rows, limit_per_cell={limit}, model(s) {sorted({r['model'] for r in rows})}")
        for r in rows:
            if seeds is not None and r["seed"] is not None and r["seed"] not in seeds:
                continue
            out[_label(r, header)][r["seed"]][(r["corruption"], r["severity"])] = r["accuracy"]
    return out


GOALS = {
    "15x5": lambda c: c[0] in COMMON,
    "held-out 4x5": lambda c: c[0] in EXTRA,
    "clean": lambda c: c[0] == "clean",
    "severity 1 (15)": lambda c: c[0] in COMMON and c[1] == 1,
    "severity 5 (15)": lambda c: c[0] in COMMON and c[1] == 5,
}


def table(results: dict) -> str:
    labels = sorted(results)
    shared = set.intersection(*(set(cells) for per_seed in results.values() for cells in per_seed.values()))
    lines = ["| method | seeds | " + " | ".join(GOALS) + " |", "|---|---:|" + "---:|" * len(GOALS)]
    for label in labels:
        per_seed = results[label]
        cols = []
        for pick in GOALS.values():
            cells = [c for c in shared if pick(c)]
            if not cells:
                cols.append("")
                continue
            means = [100 * statistics.fmean(per_seed[s][c] for c in cells) for s in per_seed]
            sd = f" ± {statistics.stdev(means):.1f}" if len(means) > 1 else ""
            cols.append(f"{statistics.fmean(means):.1f}{sd}")
        lines.append(f"| {label} | {len(per_seed)} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--seeds", help="only these adaptation seeds, e.g. 0-2 or 0,1")
    args = p.parse_args()
    seeds = None
    if args.seeds:
        lo, _, hi = args.seeds.partition("-")
        seeds = set(range(int(lo), int(hi) + 1)) if hi else {int(s) for s in args.seeds.split(",")}
    print(table(load(args.folders, seeds)))


if __name__ == "__main__":
    main()
