"""The paper's effect on real data: a ResNet from ../shared on the 1000 lossless CIFAR-10 test images, one corruption.

Prints clean and corrupted accuracy of source, replace (n images, several seeds) and prior, as a markdown table.

    .venv/bin/python benchmarks/paper_effect.py --model cifar10_resnet20 --corruption gaussian_noise --severity 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import bnadapt

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="cifar10_resnet20")
    p.add_argument("--corruption", default="gaussian_noise")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--prior", type=float, default=16.0)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    d = np.load(SHARED / "data" / "cifar10" / "test1000_lossless.npz")
    model = bnadapt.load_model(args.model)
    x = bnadapt.corrupt(d["x"], args.corruption, args.severity, profile="cifar", seed=0)

    def acc(m: torch.nn.Module, imgs: np.ndarray) -> float:
        with torch.inference_mode():
            return 100 * float((m(bnadapt.to_float_nchw(imgs)).argmax(1).numpy() == d["y"]).mean())

    t0 = time.perf_counter()
    rows = [("source, clean images", [acc(model, d["x"])]), ("source", [acc(model, x)])]
    for method in ("replace", "prior"):
        accs = [acc(bnadapt.adapt(model, x, method=method, n=args.n, seed=s, prior=args.prior), x)
                for s in range(args.seeds)]  # fmt: skip
        label = f"{method} (n={args.n}, N={args.prior:g})" if method == "prior" else f"{method} (n={args.n})"
        rows.append((label, accs))
    print(f"{args.model}, CIFAR-10-C-profile {args.corruption} severity {args.severity} (seed 0), "
          f"1000 lossless CIFAR-10 test images; {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {time.perf_counter() - t0:.0f}s\n")  # fmt: skip
    print("| method | accuracy % (mean over seeds) | per seed |")
    print("|---|---|---|")
    for name, accs in rows:
        print(f"| {name} | {statistics.mean(accs):.1f} | {' / '.join(f'{a:.1f}' for a in accs)} |")


if __name__ == "__main__":
    main()
