"""Fidelity of the corruption engine against outputs of the ORIGINAL generation code (../shared fixtures).

For every corruption, profile and severity: the fraction of pixel values within +-1 of the reference (and exactly
equal) when the original's draws are replayed (seed="legacy"), and the distortion strength mean|out - clean| with the
engine's own seeds (8 seeds) divided by the reference's. Prints a markdown table (worst severity per cell).

    .venv/bin/python benchmarks/corruption_fidelity.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bnadapt import corrupt, corruption_names

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "corruptions"
FILES = {"cifar": "cifar_ref16.npz", "imagenet": "imagenet_ref4.npz"}


def main() -> None:
    refs = {p: np.load(REF / f) for p, f in FILES.items()}
    print("| corruption | cifar: within +-1 | cifar: exact | cifar: strength ratio | "
          "imagenet: within +-1 | imagenet: exact | imagenet: strength ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in corruption_names("all"):
        cells = []
        for profile, ref in refs.items():
            clean = ref["clean"]
            within, exact, ratio = [], [], []
            for s in range(1, 6):
                target = ref[name][s - 1].astype(int)
                ours = corrupt(clean, name, s, profile=profile, seed="legacy").astype(int)
                within.append((np.abs(ours - target) <= 1).mean())
                exact.append((ours == target).mean())
                strength = np.mean([np.abs(corrupt(clean, name, s, profile=profile, seed=k).astype(int) - clean).mean()
                                    for k in range(8)])  # fmt: skip
                ref_strength = np.abs(target - clean).mean()
                ratio.append(strength / ref_strength if ref_strength else 1.0)
            worst = max(ratio, key=lambda r: abs(r - 1))
            cells += [f"{100 * min(within):.2f}%", f"{100 * min(exact):.2f}%", f"{worst:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
