"""Throughput of the benchmark harness vs a bare ``model(x)`` loop, on the same preloaded images.

Usage: python benchmarks/bench_harness.py [--model cifar10_resnet20] [--images 1000] [-b 256] [--repeat 3]

Both paths see the same uint8 images of one cell (gaussian_noise severity 5, corrupted once, up front) already in
memory; the bare loop also gets them pre-converted to float, so the harness pays for the conversion, the accuracy
bookkeeping and the journal. Prints a table; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bnadapt import corrupt, load_model
from bnadapt.benchmark import BenchConfig, run_benchmark
from bnadapt.data import ArrayImages, BenchData, DataSpec, to_float_nchw
from bnadapt.models import cifar_resnet

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10" / "test1000_lossless.npz"


def _images(count: int) -> tuple[np.ndarray, np.ndarray]:
    if SHARED.is_file():
        with np.load(SHARED) as z:
            x, y = z["x"], z["y"]
    else:  # no ../shared: random images (the speed is what matters here)
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, count)
    reps = -(-count // len(x))
    x, y = np.concatenate([x] * reps)[:count], np.concatenate([y] * reps)[:count]
    return corrupt(x, "gaussian_noise", 5, profile="cifar", seed=0), y.astype(np.int64)


def bare(model, xf: torch.Tensor, batch: int) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        for a in range(0, len(xf), batch):
            model(xf[a : a + batch])
        return len(xf) / (time.perf_counter() - t0)


def harness(model, x: np.ndarray, y: np.ndarray, batch: int, methods: tuple[str, ...]) -> float:
    cell = ArrayImages(x, y, name="gaussian_noise:5")
    data = BenchData(DataSpec("npz", Path("preloaded")), [("gaussian_noise", 5)], [], lambda c, s: cell)
    config = BenchConfig(methods=methods, ns=(32,), batch_size=batch)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        run_benchmark({"model": model}, data, config, out=Path(out) / "r")
        return len(x) * len(methods) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar10_resnet20")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("-b", "--batch-size", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    try:
        model = load_model(args.model)
    except FileNotFoundError:
        model = cifar_resnet(20)
    x, y = _images(args.images)
    xf = to_float_nchw(x)
    bare(model, xf[: args.batch_size], args.batch_size)  # warm-up
    results = {"bare model(x)": [], "bench (source)": [], "bench (source+replace)": []}
    for _ in range(args.repeat):  # interleaved, so a busy machine slows every path alike
        results["bare model(x)"].append(bare(model, xf, args.batch_size))
        results["bench (source)"].append(harness(model, x, y, args.batch_size, ("source",)))
        results["bench (source+replace)"].append(harness(model, x, y, args.batch_size, ("source", "replace")))
    ref = max(results["bare model(x)"])
    print(f"{args.model}, {args.images} images of 32x32, -b {args.batch_size}, best of {args.repeat}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print(f"{'path':<26}{'images/s':>10}{'vs bare':>9}")
    for name, values in results.items():
        print(f"{name:<26}{max(values):>10.0f}{100 * max(values) / ref:>8.0f}%")


if __name__ == "__main__":
    main()
