"""Tables of issue 15's protocol grid (benchmarks/protocol_grid.sh): mean accuracy per method for every setting x
order x batch size, and the goals for our methods (auto, bank) against source and the peers' BN-statistics methods.

    python benchmarks/protocol_table.py OUT

Means are over the corrupted rows of each folder (every visit of a cell in ``gradual``); the clean cell is left out.
``prior+r`` and ``auto+r`` are the offline estimators adapting again every 32 images on the latest 32 (``--refresh
32``, the ``refresh_*`` folders); in ``reset`` there is nothing to refresh and they are ``prior`` and ``auto``.
``bank-a`` is ``bank`` with ``--opt assign=auto`` (a batch that agrees on no entry is assigned per image).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from bnadapt.results import read_results

METHODS = ("source", "test-batch", "ema", "rbn", "dua", "tent", "prior", "auto", "bank", "prior+r", "auto+r", "bank-a")
PEERS_BN = ("test-batch", "ema", "rbn", "dua", "prior", "prior+r")  # the peers' BN-statistics estimators
OURS = ("auto", "bank", "auto+r", "bank-a")
SETTINGS = ("reset", "continual", "gradual", "mixed")
ORDERS = ("shuffled", "dirichlet0.1")
BATCHES = (200, 16, 1)


def means(folder: Path, expected: int) -> dict[str, float]:
    """Mean accuracy (%) per method over the corrupted rows of one bench folder, for the methods that have all
    ``expected`` rows (a run still going has fewer)."""
    if not (folder / "results.jsonl").exists():
        return {}
    acc = defaultdict(list)
    for r in read_results(folder)[1]:
        if r["corruption"] != "clean":
            acc[r["method"]].append(r["accuracy"])
    return {m: 100 * sum(v) / len(v) for m, v in acc.items() if len(v) == expected}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    out = p.parse_args().out
    grid = {}
    for s in SETTINGS:
        for o in ORDERS:
            for b in BATCHES:
                tag = f"{s}_{o}_b{b}"
                expected = 15 * (9 if s == "gradual" else 1)  # 15 corruptions; gradual visits 1..5..1
                row = {**means(out / f"peers_{tag}", expected), **means(out / f"ours_{tag}", expected)}
                refreshed = means(out / f"refresh_{tag}", expected) if s != "reset" else row
                row.update({f"{m}+r": refreshed[m] for m in ("prior", "auto") if m in refreshed})
                assigned = means(out / f"banka_{tag}", expected)
                if "bank" in assigned:
                    row["bank-a"] = assigned["bank"]
                if row:
                    grid[(s, o, b)] = row
    print("| setting | order | b | " + " | ".join(METHODS) + " |")
    print("|---|---|---:|" + "---:|" * len(METHODS))
    for (s, o, b), row in grid.items():
        cells = " | ".join(f"{row[m]:.1f}" if m in row else "-" for m in METHODS)
        print(f"| {s} | {o.replace('dirichlet', 'dirichlet:')} | {b} | {cells} |")
    complete = {k: r for k, r in grid.items() if all(m in r for m in METHODS)}
    print(f"\n{len(complete)} of {len(SETTINGS) * len(ORDERS) * len(BATCHES)} configurations complete.")
    if not complete:
        return
    print("\n| method | worst (method - source), pp | where | never below source? |")
    print("|---|---:|---|---|")
    for m in (*OURS, *PEERS_BN, "tent"):
        worst = min(complete, key=lambda k: complete[k][m] - complete[k]["source"])
        d = complete[worst][m] - complete[worst]["source"]
        print(f"| {m} | {d:+.1f} | {worst[0]} {worst[1]} b={worst[2]} | {'yes' if d >= 0 else 'no'} |")
    print("\n| setting | best peer BN method (mean over orders x b) | its mean | " + " | ".join(OURS) + " |")
    print("|---|---|---:|" + "---:|" * len(OURS))
    gaps = {m: [] for m in OURS}
    for s in SETTINGS:
        keys = [k for k in complete if k[0] == s]
        if not keys:
            continue
        avg = {m: sum(complete[k][m] for k in keys) / len(keys) for m in METHODS}
        best = max(PEERS_BN, key=avg.get)
        for m in OURS:
            gaps[m].append(avg[m] - avg[best])
        print(f"| {s} | {best} | {avg[best]:.1f} | " + " | ".join(f"{avg[m]:.1f}" for m in OURS) + " |")
    # prior+r is the peers' estimator re-adapted by our --refresh: the goal is also read against their own methods.
    own = [m for m in PEERS_BN if m != "prior+r"]
    for m in OURS:
        g = sum(gaps[m]) / len(gaps[m])
        per = []
        for s in SETTINGS:
            keys = [k for k in complete if k[0] == s]
            if keys:
                avg = {x: sum(complete[k][x] for k in keys) / len(keys) for x in (m, *own)}
                per.append(avg[m] - max(avg[x] for x in own))
        print(
            f"\n{m}: {g:+.2f} pp above the best peer BN method, averaged over settings (goal: >= +1.0); "
            f"{sum(per) / len(per):+.2f} pp without prior+r"
        )


if __name__ == "__main__":
    main()
