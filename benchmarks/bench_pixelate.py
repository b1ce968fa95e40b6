"""pixelate at 224x224: bnadapt vs the ``imagecorruptions`` package (issue 19), same images, same severity constants.

    .venv/bin/python benchmarks/bench_pixelate.py [--repeats 7] [--images 50]

Both make each image small with Pillow's BOX filter and bring it back to 224x224: imagecorruptions with NEAREST,
bnadapt (as the original ImageNet-C code) with BOX, whose bytes it keeps (checked here against Pillow, per image).
Each repeat times all 5 severities of both, interleaved, in this one process; the table gives the medians of CPU
time (what the code costs, whatever else runs on the machine) and of wall time. Images: the first ImageNet
validation images of ../shared, resized and centre-cropped to 224x224 (random images when ../shared is absent).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np

SHARED = Path(os.environ.get("BNADAPT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def load_images(count: int) -> tuple[np.ndarray, str]:
    from PIL import Image

    from bnadapt.data import resize_crop

    folder = SHARED / "data" / "imagenet_val1300" / "images"
    if not folder.is_dir():
        return np.random.default_rng(0).integers(0, 256, (count, 224, 224, 3), dtype=np.uint8), "random"
    files = sorted(folder.iterdir())[:count]
    return np.stack([np.asarray(resize_crop(Image.open(f).convert("RGB"))) for f in files]), str(folder)


def import_imagecorruptions():
    """imagecorruptions' corrupt(); it imports pkg_resources (setuptools) only to find its frost files."""
    if importlib.util.find_spec("pkg_resources") is None:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = lambda package, name: str(Path(importlib.util.find_spec(package).origin).parent / name)
        sys.modules["pkg_resources"] = shim
    from imagecorruptions import corrupt

    return corrupt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--images", type=int, default=50)
    args = p.parse_args()
    from PIL import Image

    from bnadapt import corrupt
    from bnadapt.corruptions.params import severity_param

    peer = import_imagecorruptions()
    x, source = load_images(args.images)
    box = Image.Resampling.BOX
    for s in range(1, 6):  # the engine's bytes: the original code's two BOX resizes, per image
        small = int(224 * severity_param("imagenet", "pixelate", s))
        ref = [np.asarray(Image.fromarray(im).resize((small, small), box).resize((224, 224), box)) for im in x]
        if not np.array_equal(corrupt(x, "pixelate", s, profile="imagenet"), np.stack(ref)):
            raise SystemExit(f"pixelate severity {s}: not the original code's bytes")

    def ours() -> None:
        for s in range(1, 6):
            corrupt(x, "pixelate", s, profile="imagenet", seed=0)

    def theirs() -> None:
        for s in range(1, 6):
            for im in x:
                peer(im, severity=s, corruption_name="pixelate")

    runs = {"bnadapt": ours, "imagecorruptions": theirs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    wall: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():
        fn()  # warm-up: first-call costs are not per image
    for _ in range(args.repeats):
        for name, fn in runs.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    med = {k: (float(np.median(cpu[k])), float(np.median(wall[k]))) for k in runs}
    n = 5 * len(x)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; python {platform.python_version()}; images: {source}")
    print(f"pixelate, 5 severities x {len(x)} images at 224x224, medians of {args.repeats} interleaved repeats\n")
    print("| code | CPU s | wall s | images/s (CPU) |")
    print("|---|---|---|---|")
    for name, (c, w) in med.items():
        print(f"| {name} | {c:.3f} | {w:.3f} | {n / c:.0f} |")
    (oc, ow), (tc, tw) = med["bnadapt"], med["imagecorruptions"]
    print(f"\nspeed vs imagecorruptions: {tc / oc:.2f}x (CPU time), {tw / ow:.2f}x (wall time)")


if __name__ == "__main__":
    main()
