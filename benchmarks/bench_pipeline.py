"""The ImageNet-C data path against the model's forward, in one table of images/s:

(a) the bare model forward (random-init torchvision ResNet-18 by default, 224x224, fp32) on ready tensors;
(b) the data path alone, every image of the cells through ``iter_batches_of`` (the loader `bnadapt bench` uses) and
    nothing else, for ``imagenet-c:`` files (224x224 JPEG q85, as released) and ``generate:imagenet:`` (a clean folder
    resized 256 + cropped 224, then corrupted) with and without the prepared cache, with 0 and 2 DataLoader workers;
(c) ``run_benchmark`` (what ``bnadapt bench`` runs) with method ``source``, on the first ``--bench-cells`` cells and
    the clean one: data and forward together;
(d) bench's inner loop alone (load a batch, run the forward) with the prefetching stage off and on: on a GPU the
    stage finishes batch k+1 (decoding, torch-path corruption, the copy) on a side stream during batch k's forward.

The clean folder holds 500x375 JPEGs (quality 90, the usual ImageNet validation size), made by enlarging images of
../shared/data/imagenet_val1300 (227x227); synthetic images when ../shared is absent. The cells are the 15 benchmark
corruptions at severity 3. On a GPU the same script measures the device path (nvJPEG, torch-path corruption, the
prefetching stage): ``python benchmarks/bench_pipeline.py --device cuda --images 1000 -b 256 --workers 0,8``.

    PYTHONPATH=src python benchmarks/bench_pipeline.py              # this CPU: a few minutes
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
from bnadapt.corruptions import COMMON
from bnadapt.data import iter_batches_of, open_data, resize_crop
from bnadapt.models import IMAGENET_MEAN, IMAGENET_STD, Classifier

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def write_folders(root: Path, images: int, cells: list[tuple[str, int]], classes: int = 10) -> tuple[Path, Path]:
    """``root/clean/<class>/*.JPEG`` (500x375, q90) and ``root/imagenet-c/<corruption>/<severity>/<class>/*.JPEG``
    (224x224, q85: the clean images prepared, standing in for released files, which decode alike)."""
    from PIL import Image

    files = sorted((SHARED / "data" / "imagenet_val1300" / "images").glob("*.JPEG"))
    rng = np.random.default_rng(0)
    for i in range(images):
        if files:
            with Image.open(files[i % len(files)]) as im:
                big = im.convert("RGB").resize((500, 375), Image.BICUBIC)
        else:
            big = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
        name = f"n{i % classes:08d}/ILSVRC2012_val_{i:08d}.JPEG"
        (root / "clean" / name).parent.mkdir(parents=True, exist_ok=True)
        big.save(root / "clean" / name, quality=90)
        small = resize_crop(big)
        for c, s in cells:
            (root / "imagenet-c" / c / str(s) / name).parent.mkdir(parents=True, exist_ok=True)
            small.save(root / "imagenet-c" / c / str(s) / name, quality=85)
    return root / "clean", root / "imagenet-c"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_rate(model, device: torch.device, batch: int, steps: int) -> float:
    x = torch.rand(batch, 3, 224, 224, device=device)
    with torch.inference_mode():
        model(x)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x)
        sync(device)
    return batch * steps / (time.perf_counter() - t0)


def data_rate(data, device: torch.device, batch: int, jobs: int) -> float:
    sets = [data.cell(*c) for c in data.cells if c[0] != "clean"]
    t0 = time.perf_counter()
    n = 0
    for _, x, _ in iter_batches_of(sets, batch, jobs, device.type == "cuda", device):
        n += len(x)
    sync(device)
    return n / (time.perf_counter() - t0)


def loop_rate(model, data, device: torch.device, batch: int, jobs: int, prefetch: bool) -> float:
    """bench's inner loop alone: each batch loaded, then the forward; ``prefetch`` finishes the next batch meanwhile."""
    sets = [data.cell(*c) for c in data.cells if c[0] != "clean"]
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for _, x, _ in iter_batches_of(sets, batch, jobs, device.type == "cuda", device, prefetch=prefetch):
            model(x.permute(0, 3, 1, 2).float().div_(255))
            n += len(x)
    sync(device)
    return n / (time.perf_counter() - t0)


def bench_rate(model, data, device: torch.device, batch: int, jobs: int) -> float:
    config = BenchConfig(methods=("source",), batch_size=batch, jobs=jobs, device=str(device))
    images = sum(len(data.cell(*c)) for c in data.cells)
    t0 = time.perf_counter()
    run_benchmark({"m": model}, data, config)
    sync(device)
    return images / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=64, help="images per cell (default: 64)")
    p.add_argument("--cells", type=int, default=15, help="how many of the 15 benchmark corruptions (severity 3)")
    p.add_argument("--bench-cells", type=int, default=3, help="cells of the (c) rows (default: 3; the forward is slow)")
    p.add_argument("-b", "--batch-size", type=int, default=32)
    p.add_argument("--workers", default="0,2", help="DataLoader workers to try, a comma list (default: 0,2)")
    p.add_argument("--model", default="resnet18", help="a torchvision model name, random init (default: resnet18)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    workers = [int(w) for w in args.workers.split(",")]
    cells = [(c, 3) for c in list(COMMON)[: args.cells]]
    import torchvision

    torch.manual_seed(0)
    model = Classifier(getattr(torchvision.models, args.model)(), IMAGENET_MEAN, IMAGENET_STD).eval().to(device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"device {device}; {os.cpu_count()} cores, load {load:.1f}; torch {torch.__version__}; {args.model}; "
        f"{len(cells)} cells x {args.images} images; batch {args.batch_size}"
    )
    rows: list[tuple[str, str, float]] = []
    fwd = forward_rate(model, device, args.batch_size, max(2, 256 // args.batch_size))
    rows.append((f"(a) {args.model} forward fp32, ready tensors", "-", fwd))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        clean, released = write_folders(Path(tmp), args.images, cells)
        print(f"wrote the folders in {time.perf_counter() - t0:.0f}s")
        names, sev = [c for c, _ in cells], [3]
        gen = f"generate:imagenet:{clean}"
        for jobs in workers:
            t0 = time.perf_counter()
            cached = open_data(gen, names, sev, cache=Path(tmp) / f"cache{jobs}", jobs=jobs)
            built = args.images / (time.perf_counter() - t0)
            rows.append(("(b) prepared cache build (decode + resize once)", str(jobs), built))
            for label, data in (
                ("(b) data path: imagenet-c: files", open_data(f"imagenet-c:{released}", names, sev)),
                ("(b) data path: generate:imagenet, no cache", open_data(gen, names, sev)),
                ("(b) data path: generate:imagenet, prepared cache", cached),
            ):
                rows.append((label, str(jobs), data_rate(data, device, args.batch_size, jobs)))
        jobs, few = max(workers), names[: args.bench_cells]
        for label, data in (
            ("(c) bench source: imagenet-c: files", open_data(f"imagenet-c:{released}", few, sev)),
            ("(c) bench source: generate:imagenet, prepared cache", open_data(gen, few, sev, cache=Path(tmp) / "c")),
        ):
            rows.append((label, str(jobs), bench_rate(model, data, device, args.batch_size, jobs)))
        few_cells = open_data(gen, few, sev, cache=Path(tmp) / "c")
        for prefetch in (False, True):
            rate = loop_rate(model, few_cells, device, args.batch_size, jobs, prefetch)
            rows.append(
                (f"(d) load + forward loop, generate cache, prefetch {'on' if prefetch else 'off'}", str(jobs), rate)
            )
    width = max(len(r[0]) for r in rows)
    print(f"\n{'what':<{width}}  workers  images/s  x forward")
    for what, jobs, rate in rows:
        print(f"{what:<{width}}  {jobs:>7}  {rate:8.1f}  {rate / fwd:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
