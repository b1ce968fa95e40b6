"""Numbers quoted next to the `bnadapt analyze` tables in docs/results.md, read from its --out folder.

- transfer: mean gain over the source row of the diagonal, of same-family and of other-family (adapt on A, evaluate
  on B) pairs, families as in ``bnadapt.corruptions.GROUPS``;
- parts / depth: each run's mean accuracy over the corrupted cells, per seed (replace rows).

    PYTHONPATH=src .venv/bin/python benchmarks/analyze_breakdown.py runs/analyze
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

from bnadapt.corruptions import GROUPS
from bnadapt.results import read_results

FAMILIES = ("noise", "blur", "weather", "digital")


def transfer_families(path: Path) -> None:
    with open(path) as f:
        rows = {r["adapt_on"]: r for r in csv.DictReader(f)}
    source = rows.pop("source (no adaptation)")
    rows.pop("clean", None)
    family = {c: f for f in FAMILIES for c in GROUPS[f]}
    groups: dict[str, list[float]] = defaultdict(list)
    for a, row in rows.items():
        for b in rows:
            gain = 100 * (float(row[b]) - float(source[b]))
            kind = "diagonal" if a == b else ("same family" if family[a] == family[b] else "other family")
            groups[kind].append(gain)
            if a != b and family[a] == family[b]:
                groups[f"within {family[a]}"].append(gain)
    print(f"{path}: mean gain over source (pp)")
    for kind, gains in groups.items():
        print(f"  {kind:<16}{statistics.mean(gains):+6.1f}  ({len(gains)} pairs)")


def per_seed(root: Path) -> None:
    for run in sorted((root / "runs").iterdir()):
        acc: dict[object, list[float]] = defaultdict(list)
        for r in read_results(run)[1]:
            if r["method"] == "replace" and r["corruption"] != "clean":
                acc[r["seed"]].append(r["accuracy"])
        means = "  ".join(f"seed {s}: {100 * statistics.mean(v):.2f} ({len(v)} cells)" for s, v in sorted(acc.items()))
        print(f"{root.name}/{run.name:<10}{means}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the --out folder of bnadapt analyze")
    out = parser.parse_args().out
    if (out / "transfer" / "transfer.csv").is_file():
        transfer_families(out / "transfer" / "transfer.csv")
    for name in ("parts", "depth"):
        if (out / name / "runs").is_dir():
            per_seed(out / name)


if __name__ == "__main__":
    main()
