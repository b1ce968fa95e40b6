"""How well `bnadapt bench` keeps 8 ranks busy: round-robin rounds (each rank waiting for the others after every
cell, as before) against longest first from a shared queue (now), simulated from per-cell times.

Efficiency = the work (sum of the cell times) / (ranks x the wall time); 1.0 is a perfect balance. The longest-first
rows order the queue by the benchmark's own cost estimate (bnadapt.schedule.item_cost), as a run does, and, for
comparison, by the true times.

Per-cell times, either
- ``--results DIR``: a run's results.jsonl, each cell's time the sum of its rows' ``seconds`` (adaptation and
  forwards; loading is not in it), or
- by default, measured here: the numpy engine's time per 224x224 image for each of the 15 benchmark corruptions x 5
  severities (``--images`` images of ../shared/data/imagenet_val1300), with the prepared clean cell's reading taken as
  free, combined with a forward rate as if on a GPU:
  cell time = images x max(corruption time / workers, variants / forward rate), loading overlapped with the forward.
  The scenarios use the H200's measured ResNet-50 rates (docs/results.md: 7462/s fp32, 15293/s bf16).

    PYTHONPATH=src python benchmarks/schedule_sim.py
    PYTHONPATH=src python benchmarks/schedule_sim.py --results runs/lite0_gpu
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bnadapt.schedule import item_cost, simulate

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def measured_cells(images: int) -> tuple[list[tuple[str, int]], list[float]]:
    """The clean cell and the 75 benchmark cells in plan order, with the numpy engine's seconds per image here."""
    from PIL import Image

    from bnadapt.corruptions import COMMON, corrupt
    from bnadapt.data import resize_crop

    files = sorted((SHARED / "data" / "imagenet_val1300" / "images").glob("*.JPEG"))[:images]
    if files:
        x = np.stack([np.asarray(resize_crop(Image.open(f).convert("RGB"))) for f in files])
    else:
        x = np.random.default_rng(0).integers(0, 256, (images, 224, 224, 3), dtype=np.uint8)
    cells, seconds = [("clean", 0)], [0.0]
    for name in COMMON:
        corrupt(x[:1], name, 1, "imagenet", 0)  # first-call costs (textures, imports) are not per image
        for s in range(1, 6):
            t0 = time.perf_counter()
            corrupt(x, name, s, "imagenet", 0)
            cells.append((name, s))
            seconds.append((time.perf_counter() - t0) / len(x))
    return cells, seconds


def results_cells(folder: Path) -> tuple[list[tuple[str, int]], list[float], list[float]]:
    """Each cell of a results.jsonl (first model), its time (sum of its rows' seconds) and its estimated cost."""
    from bnadapt.results import read_results

    headers, rows = read_results(folder / "results.jsonl" if folder.is_dir() else folder)
    generated = any(h.get("data", {}).get("kind") == "generate" for h in headers)
    model = rows[0]["model"]
    times: dict[tuple[str, int], float] = {}
    variants: dict[tuple[str, int], int] = {}
    images: dict[tuple[str, int], int] = {}
    for r in rows:
        if r["model"] == model:
            key = (r["corruption"], int(r["severity"]))
            times[key] = times.get(key, 0.0) + float(r["seconds"])
            variants[key] = variants.get(key, 0) + 1
            images[key] = int(r["total"])
    cells = list(times)
    costs = [item_cost([c], [images[c]], variants[c], generated) for c in cells]
    return cells, [times[c] for c in cells], costs


def efficiencies(times: list[float], costs: list[float], ranks: int) -> tuple[float, float, float]:
    work = sum(times)
    rr = simulate(times, ranks, "round-robin")
    estimated = simulate(times, ranks, "longest-first", costs)
    oracle = simulate(times, ranks, "longest-first")
    return work / (ranks * rr), work / (ranks * estimated), work / (ranks * oracle)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, help="a results folder or results.jsonl to take the cell times from")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--images", type=int, default=8, help="images per corruption and severity to time (default: 8)")
    p.add_argument("--cell-images", type=int, default=1300, help="images per cell (default: 1300)")
    p.add_argument("--variants", type=int, default=7, help="variants per cell (default: 7, source + 2 methods x 3)")
    args = p.parse_args(argv)
    print(f"{'scenario':<52} {'round-robin':>11} {'longest-first (estimate)':>24} {'(true times)':>12}")
    if args.results is not None:
        cells, times, costs = results_cells(args.results)
        rr, est, oracle = efficiencies(times, costs, args.ranks)
        print(
            f"{f'{args.results}: {len(cells)} cells, {args.ranks} ranks':<52} {rr:>11.3f} {est:>24.3f} {oracle:>12.3f}"
        )
        return 0
    cells, per_image = measured_cells(args.images)
    n, v = args.cell_images, args.variants
    costs = [item_cost([c], [n], v, True) for c in cells]
    for rate, workers, what in ((7462, 14, "fp32"), (7462, 8, "fp32"), (15293, 14, "bf16"), (15293, 8, "bf16")):
        times = [n * max(t / workers, v / rate) for t in per_image]
        rr, est, oracle = efficiencies(times, costs, args.ranks)
        label = f"{len(cells)} cells x {n} images, {what} {rate}/s, {workers} workers/rank"
        print(f"{label:<52} {rr:>11.3f} {est:>24.3f} {oracle:>12.3f}")
    slowest = max(range(len(cells)), key=per_image.__getitem__)
    mean, top = 1000 * np.mean(per_image[1:]), 1000 * per_image[slowest]
    print(f"\nnumpy engine here: {mean:.1f} ms/image on average, slowest {cells[slowest]} {top:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
