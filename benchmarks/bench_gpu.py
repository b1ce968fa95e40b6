"""Throughput of the GPU path, in one table: images/s for
(a) the bare model forward on device-resident tensors (fp32, and bf16 autocast + channels-last),
(b) `bnadapt bench` (run_benchmark, the code the command runs) on an ImageNet-C-layout JPEG folder, decoding on the GPU,
(c) the same with CPU decoding in DataLoader workers,
(d) the corruption engine: numpy on the CPU vs the torch path on the device, per corruption.

The model is a randomly initialised torchvision ResNet-50 (no download); the JPEG folder is synthetic and written by
the script itself into a temporary folder (smooth random images, 224x224, quality 85, as ImageNet-C's files).

    python benchmarks/bench_gpu.py                         # on a GPU: ~3-5 minutes
    python benchmarks/bench_gpu.py --device cpu --tiny     # CI-sized smoke run on the CPU (~1 minute)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bnadapt.benchmark import BenchConfig, run_benchmark
from bnadapt.corruptions import COMMON, corrupt, torch_corruption_names
from bnadapt.data import open_data
from bnadapt.models import IMAGENET_MEAN, IMAGENET_STD, Classifier


def write_imagenet_c(root: Path, cells: list[tuple[str, int]], per_cell: int, size: int, classes: int = 10) -> None:
    """``root/<corruption>/<severity>/<wnid>/<file>.JPEG``: smooth random images, JPEG quality 85."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for c, s in cells:
        for i in range(per_cell):
            a, b, p = rng.uniform(0, 255, 3), rng.uniform(-120, 120, (2, 3)), rng.uniform(2, 12)
            img = a + b[0] * np.sin(p * xx)[..., None] + b[1] * np.cos(p * yy)[..., None]
            img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            folder = root / c / str(s) / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"ILSVRC2012_val_{i:08d}.JPEG", quality=85)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(model, device, batch: int, size: int, steps: int, amp: bool, channels_last: bool) -> float:
    x = torch.rand(batch, 3, size, size, device=device)
    m = model
    if channels_last:
        x, m = x.contiguous(memory_format=torch.channels_last), model.to(memory_format=torch.channels_last)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else torch.autocast(device.type, enabled=False)
    with torch.inference_mode(), ctx:
        for _ in range(2):
            m(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            m(x)
        sync(device)
    return batch * steps / (time.perf_counter() - t0)


def bench_rate(model, root: Path, device, batch: int, jobs: int, decode: str, methods: tuple[str, ...]) -> float:
    data = open_data(f"imagenet-c:{root}", ["fog"], [1, 2])
    images = sum(len(data.cell(*c)) for c in data.cells)
    n = min(32, *(len(data.cell(*c)) for c in data.cells))  # --tiny cells hold fewer than 32 images
    config = BenchConfig(methods=methods, ns=(n,), batch_size=batch, jobs=jobs, device=str(device), amp="bf16",
                         channels_last=True, decode=decode)  # fmt: skip
    run_benchmark({"resnet50": model}, data, config)  # warm-up: cuDNN autotuning, worker start, page cache
    sync(device)
    t0 = time.perf_counter()
    run_benchmark({"resnet50": model}, data, config)
    sync(device)
    return images / (time.perf_counter() - t0)


def _or_error(measure) -> str:
    """The measurement, or why it failed: one failing row must not lose the rest of the table."""
    try:
        return measure()
    except Exception as e:
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def corruption_rates(device, n: int, size: int, names: list[str]) -> list[tuple[str, float, str | None]]:
    from PIL import Image

    rng = np.random.default_rng(1)
    x = np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize((size, size)))
                  for _ in range(n)])  # fmt: skip
    xt = torch.from_numpy(x).to(device)
    out = []
    for name in names:
        t0 = time.perf_counter()
        corrupt(x, name, 3, "imagenet", 0)
        cpu = n / (time.perf_counter() - t0)
        dev = None
        if name in torch_corruption_names():

            def timed(name=name) -> str:
                corrupt(xt[:2], name, 3, "imagenet", 0, backend="torch")  # warm-up (kernels, caches)
                sync(device)
                t0 = time.perf_counter()
                corrupt(xt, name, 3, "imagenet", 0, backend="torch")
                sync(device)
                return f"{n / (time.perf_counter() - t0):.0f}"

            dev = _or_error(timed)
        out.append((name, cpu, dev))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a few small images: a smoke run that fits CI")
    p.add_argument("--per-cell", type=int, help="images per cell of the JPEG folder (2 cells)")
    p.add_argument("-b", "--batch-size", type=int)
    p.add_argument("-j", "--workers", type=int)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: error: --device cuda asked for, but CUDA is not available; use --device cpu --tiny",
              file=sys.stderr)  # fmt: skip
        return 2
    tiny = args.tiny
    size = 64 if tiny else 224
    per_cell = args.per_cell or (12 if tiny else 2500)
    batch = args.batch_size or (8 if tiny else 256)
    jobs = args.workers if args.workers is not None else (0 if tiny else min(8, os.cpu_count() or 1))
    torch.manual_seed(0)
    import torchvision

    model = Classifier(torchvision.models.resnet50(), IMAGENET_MEAN, IMAGENET_STD).eval().to(device)
    rows: list[tuple[str, str]] = []
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; images {size}x{size}; batch {batch}; workers {jobs}")
    steps = 2 if tiny else 20
    for label, fast in (("(a) forward fp32, device tensors", False), ("(a) forward bf16 + channels-last", True)):
        rows.append((label, f"{forward_rate(model, device, batch, size, steps, fast, fast):.0f}"))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_imagenet_c(Path(tmp), [("fog", 1), ("fog", 2)], per_cell, size)
        print(f"wrote {2 * per_cell} JPEGs in {time.perf_counter() - t0:.1f}s")
        for label, decode, methods in (
            ("(b) bench source, decode on device", "auto", ("source",)),
            ("(c) bench source, decode on CPU workers", "cpu", ("source",)),
            ("(b) bench source+replace n=32, decode on device", "auto", ("source", "replace")),
        ):
            if device.type == "cpu" and decode == "auto":
                label += " (no GPU: = CPU)"
            rate = _or_error(
                lambda d=decode, m=methods: f"{bench_rate(model, Path(tmp), device, batch, jobs, d, m):.0f}"
            )
            rows.append((label, rate))
    names = list(COMMON)[:3] if tiny else list(COMMON)
    for cname, cpu, dev in corruption_rates(device, 4 if tiny else 64, size, names):
        rows.append((f"(d) corrupt {cname} s3: numpy CPU | torch {device.type}",
                     f"{cpu:.0f} | {'-' if dev is None else dev}"))  # fmt: skip
    width = max(len(r[0]) for r in rows)
    print(f"\n{'what':<{width}}  images/s")
    print("-" * (width + 12))
    for what, rate in rows:
        print(f"{what:<{width}}  {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
