"""The measurements behind the design notes of `auto` in docs/methods.md (ResNet-20, the 1000 lossless images).

    OMP_NUM_THREADS=1 python benchmarks/auto_diagnostics.py

Prints (1) the root-mean-square log-ratio of each BN layer's variance, target (all 1000 images, `sequential`) vs
source, on clean images and under Gaussian noise severity 5; (2) accuracy of `source`, `replace` with all 1000 clean
images, and `auto` with each `select` (n=32, seeds 0-2) on clean images and Gaussian noise severity 5.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch

from bnadapt import adapt, bn_layers, corrupt, load_model, to_float_nchw

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/cifar10/test1000_lossless.npz"


def accuracy(model, x, y) -> float:
    with torch.inference_mode():
        return 100 * float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    d = np.load(DATA)
    y = torch.from_numpy(d["y"])
    model = load_model("cifar10_resnet20").eval()
    source = {n: m.running_var.clone() for n, m in bn_layers(model)}
    cells = {"clean": d["x"], "gaussian_noise:5": corrupt(d["x"], "gaussian_noise", 5, profile="cifar", seed=0)}
    for name, images in cells.items():
        x = to_float_nchw(np.asarray(images))
        full = adapt(model, x, method="sequential", batch_size=len(x))
        rms = [float(torch.log(m.running_var / source[n]).pow(2).mean().sqrt()) for n, m in bn_layers(full)]
        print(f"{name}: log-variance rms per BN layer: " + " ".join(f"{v:.2f}" for v in rms))
        row = {"source": accuracy(model, x, y), "replace n=1000": accuracy(adapt(model, x, method="replace"), x, y)}
        for select in ("none", "entropy", "im"):
            accs = [accuracy(adapt(model, x, method="auto", n=32, seed=s, options={"select": select}), x, y)
                    for s in range(3)]  # fmt: skip
            row[f"auto select={select} (seeds 0-2)"] = statistics.fmean(accs)
        print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
