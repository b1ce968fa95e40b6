"""Top-1 of the built-in EfficientNet-Lites on ../shared/data/imagenet_val1300 (1300 ImageNet validation images).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/lite0_accuracy.py [--model NAME ...] [--limit N]
        [--resample bicubic]

Each model reads the images as its ``preprocessing`` says (``bnadapt.models.preprocess_of``): shorter side resized to
its resolution + 32 (PIL, which antialiases when it shrinks), centre crop to its resolution (224, 240, 260 for Lite0,
1, 2; for Lite0 this is the ImageNet-C protocol, resize 256, crop 224), [0, 1] floats; the model's own scaling
``(x*255 - 127) / 128`` is folded into it. ``--resample`` changes only the filter. ``dataset.txt`` holds lines
``images/<file>, <class 0..999>`` (read by bnadapt's list-file reader).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from bnadapt import load_model, to_float_nchw
from bnadapt.data import Preprocess, open_clean
from bnadapt.models import preprocess_of

DATA = Path(__file__).resolve().parents[1].parent / "shared/data/imagenet_val1300"
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def read_val(prepare: Preprocess, root: Path = DATA, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` images of ``root/dataset.txt`` (uint8 NHWC, resized and cropped) and their labels.

    Example:
        >>> x, y = read_val(Preprocess(224, 256), limit=2)  # doctest: +SKIP
        >>> x.shape
        (2, 224, 224, 3)
    """
    images = open_clean(root, prepare=prepare)
    idx = np.arange(len(images) if limit is None else min(limit, len(images)))
    return images.get(idx), images.labels[idx]


def top1(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = 50) -> float:
    """Top-1 accuracy (fraction) of ``model`` on uint8 NHWC images ``x``."""
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            pred = model(to_float_nchw(x[i : i + batch_size])).argmax(1).numpy()
            correct += int((pred == y[i : i + batch_size]).sum())
    return correct / len(x)


def measure(name: str, limit: int | None, resample: str, batch_size: int) -> None:
    """Print ``name``'s top-1 on the shared images, its preprocessing and the wall time."""
    t0 = time.perf_counter()
    model = load_model(name)
    prepare = preprocess_of(model).replace(interpolation=resample)
    x, y = read_val(prepare, limit=limit)
    acc = top1(model, x, y, batch_size)
    n = len(y)
    print(f"{name} top-1 on {n} images of {DATA.name}, {prepare}: {100 * acc:.2f}% ({round(acc * n)} correct)")
    print(f"preprocessing: {model.preprocessing}")
    print(f"wall time: {time.perf_counter() - t0:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", choices=LITES, default=["efficientnet_lite0"], help="one or more models")
    ap.add_argument("--limit", type=int, default=None, help="only the first N images")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--resample", choices=("bicubic", "bilinear"), default="bilinear", help="resize filter")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared
    for name in args.model:
        measure(name, args.limit, args.resample, args.batch_size)


if __name__ == "__main__":
    main()
