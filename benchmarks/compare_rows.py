"""Compare the result rows of two runs of benchmarks/rows_grid.sh (timings and paths left out), and their files.

Usage: python benchmarks/compare_rows.py BEFORE_DIR AFTER_DIR
Prints, per bench run: rows, identical rows, the largest accuracy difference, whether the resume fingerprints agree
(paths made relative); then whether the adapted statistics files hold the same tensors. Exit 0 always: it reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors import safe_open


def _rows(path: Path) -> tuple[list[dict], dict]:
    rows, header = [], {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "header" in r:
            header = header or r["header"]
            continue
        r.pop("seconds", None)
        rows.append(r)
    return rows, header


def _relative(value, root: str):
    return json.loads(json.dumps(value).replace(root, "<out>"))


def main(before: Path, after: Path) -> None:
    for run in sorted(p.name for p in before.iterdir() if (p / "results.jsonl").is_file()):
        a, ha = _rows(before / run / "results.jsonl")
        b, hb = _rows(after / run / "results.jsonl")
        same = sum(x == y for x, y in zip(a, b, strict=False))
        worst = max((abs(x["accuracy"] - y["accuracy"]) for x, y in zip(a, b, strict=False)), default=0.0)
        fa, fb = _relative(ha.get("fingerprint"), str(before)), _relative(hb.get("fingerprint"), str(after))
        agree = "agree" if fa == fb else "DIFFER"
        print(f"{run}: {len(a)} vs {len(b)} rows, {same} identical, accuracy differs by <= {100 * worst:.2f} points")
        print(f"{run}: resume fingerprints {agree}")
    for name in ("p.safetensors", "bank.safetensors"):
        if (before / name).is_file() and (after / name).is_file():
            with safe_open(str(before / name), "pt") as x, safe_open(str(after / name), "pt") as y:
                keys = sorted(x.keys())
                diff = max(float((x.get_tensor(k) - y.get_tensor(k)).abs().max()) for k in keys)
                print(f"{name}: {len(keys)} tensors, largest absolute difference {diff:.3g}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
