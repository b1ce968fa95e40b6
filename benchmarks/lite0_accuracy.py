"""Top-1 of the built-in efficientnet_lite0 on ../shared/data/imagenet_val1300 (1300 ImageNet validation images).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lite0_accuracy.py [--limit N] [--resample bicubic]

Preprocessing is the ImageNet-C protocol: shorter side resized to 256 (PIL bilinear, which antialiases when it
shrinks), centre crop 224, [0, 1] floats; the model's own scaling ``(x*255 - 127) / 128`` is folded into it.
``dataset.txt`` holds lines ``images/<file>, <class 0..999>`` (read by bnadapt's list-file reader).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bnadapt import load_model, to_float_nchw
from bnadapt.data import open_clean, resize_crop

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/imagenet_val1300"


def read_val(root: Path = DATA, limit: int | None = None, resample: str = "bilinear") -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` images of ``root/dataset.txt`` (uint8 NHWC, resized and cropped) and their labels."""
    images = open_clean(root, prepare="resize256-crop224")
    idx = np.arange(len(images) if limit is None else min(limit, len(images)))
    if resample == "bilinear":  # the protocol, as bnadapt bench reads generate:imagenet: data
        return images.get(idx), images.labels[idx]
    x = []
    for i in idx:
        with Image.open(images.files[i]) as im:
            x.append(np.asarray(resize_crop(im.convert("RGB"), resample=resample)))
    return np.stack(x), images.labels[idx]


def top1(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 50) -> float:
    """Top-1 accuracy (fraction) of ``model`` on uint8 NHWC images ``x``."""
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            pred = model(to_float_nchw(x[i : i + batch_size])).argmax(1).numpy()
            correct += int((pred == y[i : i + batch_size]).sum())
    return correct / len(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N images")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--resample", choices=("bicubic", "bilinear"), default="bilinear", help="resize filter")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared
    t0 = time.perf_counter()
    x, y = read_val(limit=args.limit, resample=args.resample)
    model = load_model("efficientnet_lite0")
    acc = top1(model, x, y, args.batch_size)
    n = len(y)
    where = f"{n} images of {DATA.name}, {args.resample} resize"
    print(f"efficientnet_lite0 top-1 on {where}: {100 * acc:.2f}% ({round(acc * n)} correct)")
    print(f"preprocessing: {model.preprocessing}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
