"""The bank's ``assign`` option (issue 15): how often a batch's images agree with the batch's choice, and accuracy
with ``assign`` = batch / image / auto, for batches of one condition (known and unseen corruptions, clean) and for
batches of a mixed stream of the 15 benchmark corruptions.

    python benchmarks/bank_assign.py runs/protocols [--images 125] [-b 16]

``runs/protocols`` is the folder of benchmarks/protocol_grid.sh (its eval.npz and bank.safetensors; the bank was
built from the other half of the images). Corruption seed 0, one torch thread.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from bnadapt import adapt, corrupt, corruption_names
from bnadapt.models import load_model

UNSEEN = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ASSIGN = ("batch", "image", "auto")


def evaluate(net, bank: Path, x: np.ndarray, y: np.ndarray, b: int) -> dict[str, float]:
    """Accuracy (%) per ``assign`` and the mean share of a batch's images whose own best entry is the batch's."""
    images = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    out = {}
    for assign in ASSIGN:
        model = adapt(net, method="bank", options={"bank": str(bank), "assign": assign})
        hits, agree = 0, []
        with torch.no_grad():
            for k in range(0, len(images), b):
                xb = images[k : k + b]
                if assign == "batch":
                    score, _ = model.image_scores(xb)
                    agree.append(float((score.argmin(1) == score.mean(0).argmin()).float().mean()))
                hits += int((model(xb).argmax(1) == torch.from_numpy(y[k : k + b])).sum())
        out[assign] = 100 * hits / len(images)
        if agree:
            out["agree"] = 100 * float(np.mean(agree))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", type=Path)
    p.add_argument("--images", type=int, default=125, help="evaluation images per cell, spread evenly")
    p.add_argument("-b", type=int, default=16)
    a = p.parse_args()
    torch.set_num_threads(1)
    d = np.load(a.grid / "eval.npz")
    at = np.linspace(0, len(d["y"]) - 1, a.images).round().astype(int)
    x0, y0 = d["x"][at], d["y"][at]
    net = load_model("cifar10_resnet20").eval()
    bank = a.grid / "bank.safetensors"
    rows = [("clean", "-", x0, y0)]
    for name in (*corruption_names("common"), *UNSEEN):
        for sev in (3, 5):
            rows.append((name, sev, corrupt(x0, name, sev, profile="cifar", seed=0), y0))
    common = [r for r in rows if r[0] in corruption_names("common") and r[1] == 5]
    mixed = np.random.default_rng(0).permutation(len(common) * len(y0))
    xs, ys = np.concatenate([r[2] for r in common]), np.concatenate([r[3] for r in common])
    rows.append(("mixed stream, 15 corruptions", 5, xs[mixed], ys[mixed]))
    print(f"| cell (-b {a.b}, {a.images} images) | severity | agree % | batch | image | auto |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, sev, x, y in rows:
        r = evaluate(net, bank, x, y, a.b)
        tag = f"{name} (unseen)" if name in UNSEEN else name
        cells = " | ".join(f"{r[k]:.1f}" for k in ASSIGN)
        print(f"| {tag} | {sev} | {r['agree']:.0f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
