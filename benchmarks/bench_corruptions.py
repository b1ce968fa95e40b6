"""Corruption engine speed: bnadapt vs imagecorruptions-imaug, per corruption and in total, on the same images.

imagecorruptions-imaug ships a module named ``imagecorruptions`` (as the package whose frost textures bnadapt reads),
so it is installed into its own folder and timed in a subprocess:

    .venv/bin/python -m pip install --target /tmp/imaug imagecorruptions-imaug numba
    .venv/bin/python benchmarks/bench_corruptions.py --imaug-dir /tmp/imaug

Sizes: 1000 CIFAR-10 test images at 32x32 and 50 ImageNet validation images resized/cropped to 224x224, from
../shared. Per-corruption times are one process on one core (all 5 severities); the CIFAR total is also measured as
``export_corrupted`` with 2 worker processes (every cell computed and written), which is the issue's goal.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

_IMAUG_SCRIPT = r"""
import json, sys, time, warnings
import numpy as np
warnings.filterwarnings("ignore")
from imagecorruptions import corrupt
x = np.load(sys.argv[1])["x"]
names = json.loads(sys.argv[2])
out = {}
for name in names:
    t0 = time.perf_counter()
    for s in range(1, 6):
        for i, im in enumerate(x):
            np.random.seed(i)
            corrupt(im, corruption_name=name, severity=s)
    out[name] = time.perf_counter() - t0
print(json.dumps(out))
"""


def load_images() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    from bnadapt.data import resize_crop

    cifar = np.load(SHARED / "data" / "cifar10" / "test1000_lossless.npz")["x"]
    files = sorted((SHARED / "data" / "imagenet_val1300" / "images").iterdir())[:50]
    imagenet = np.stack([np.asarray(resize_crop(Image.open(f).convert("RGB"))) for f in files])
    return cifar, imagenet


def time_ours(x: np.ndarray, profile: str, names: list[str]) -> dict[str, float]:
    from bnadapt import corrupt

    times = {}
    for name in names:
        corrupt(x[:2], name, 1, profile=profile)  # first-call costs (texture loading, imports) are not per-image
        t0 = time.perf_counter()
        for s in range(1, 6):
            corrupt(x, name, s, profile=profile, seed=0)
        times[name] = time.perf_counter() - t0
    return times


def time_imaug(x: np.ndarray, names: list[str], imaug_dir: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        np.savez(Path(d) / "x.npz", x=x)
        env = {**os.environ, "PYTHONPATH": imaug_dir, "OMP_NUM_THREADS": "1"}
        res = subprocess.run([sys.executable, "-c", _IMAUG_SCRIPT, str(Path(d) / "x.npz"), json.dumps(names)],
                             capture_output=True, text=True, env=env, check=True)  # fmt: skip
        return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--imaug-dir", help="folder where imagecorruptions-imaug was pip-installed with --target")
    p.add_argument("--corruptions", nargs="+", help="subset to time (default: all 19)")
    args = p.parse_args()
    import cv2

    from bnadapt import corruption_names
    from bnadapt.corruptions.export import export_corrupted

    cv2.setNumThreads(1)  # one core per process, for a like-for-like comparison with the single-threaded imaug
    names = args.corruptions or corruption_names("all")
    cifar, imagenet = load_images()
    rows = {}
    for label, x, profile in (("32x32", cifar, "cifar"), ("224x224", imagenet, "imagenet")):
        ours = time_ours(x, profile, names)
        theirs = time_imaug(x, names, args.imaug_dir) if args.imaug_dir else {}
        rows[label] = (ours, theirs, len(x))
    with tempfile.TemporaryDirectory() as d:
        np.savez(Path(d) / "c.npz", x=cifar, y=np.zeros(len(cifar), np.int64))
        t0 = time.perf_counter()
        export_corrupted(Path(d) / "c.npz", Path(d) / "out", corruptions=names, jobs=2)
        total_j2 = time.perf_counter() - t0

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    print("seconds for all 5 severities, one process (imaug: ImageNet constants at every size, as it has no other)\n")
    print("| corruption | ours 32x32 (1000 img) | imaug 32x32 | ours 224x224 (50 img) | imaug 224x224 | speed-up 224 |")
    print("|---|---|---|---|---|---|")
    (o32, t32, _), (o224, t224, n224) = rows["32x32"], rows["224x224"]
    for name in names:
        ratio = f"{t224[name] / o224[name]:.1f}x" if name in t224 else "-"
        print(f"| {name} | {o32[name]:.2f} | {t32.get(name, float('nan')):.2f} | {o224[name]:.2f} | "
              f"{t224.get(name, float('nan')):.2f} | {ratio} |")  # fmt: skip
    s_o32, s_o224 = sum(o32.values()), sum(o224.values())
    s_t32, s_t224 = sum(t32.values()) if t32 else float("nan"), sum(t224.values()) if t224 else float("nan")
    print(f"| **total** | {s_o32:.1f} | {s_t32:.1f} | {s_o224:.1f} | {s_t224:.1f} | {s_t224 / s_o224:.1f}x |")
    print(f"\n224x224 images/s over the whole suite ({len(names)} corruptions x 5 severities), one process: ours "
          f"{len(names) * 5 * n224 / s_o224:.1f}, imaug {len(names) * 5 * n224 / s_t224:.1f}")  # fmt: skip
    print(f"CIFAR profile, {len(names)} x 5 cells of 1000 images written as CIFAR-10-C with 2 worker processes "
          f"(export_corrupted jobs=2): {total_j2:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
