"""Corruption engine: numpy path vs torch path, ms per image at severity 3 (imagenet profile, 224x224), and agreement.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_corruptions_torch.py --device cpu --quick   # < 60 s
    PYTHONPATH=src .venv/bin/python benchmarks/bench_corruptions_torch.py --device cuda --fidelity

The numpy column times ``corrupt(host array)``; the torch column times ``corrupt(tensor on --device,
backend="torch")`` with the input already on the device (CUDA timings are bracketed by torch.cuda.synchronize).
Corruptions without a torch path run on numpy on both columns (the torch one also pays the copies). Each corruption is
run once untimed (caches, CUDA kernels), then ``--reps`` times; the median is reported. Images: the first ImageNet
validation images of ../shared (resized and centre-cropped to 224), else synthetic ones. ``--fidelity`` also prints,
per torch-path corruption, the fraction of identical bytes, of bytes within 1 level, the max and mean |diff| over
severities 1, 3, 5 in both profiles (4 images of 64x64 for cifar, 2 of 224x224 for imagenet).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bnadapt.corruptions import corrupt, corruption_names, torch_corruption_names

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def load_images(n: int, size: int, first: int = 0) -> tuple[np.ndarray, str]:
    """``n`` ImageNet validation images at ``size`` x ``size`` from ../shared, else smooth synthetic ones."""
    from PIL import Image

    folder = SHARED / "data" / "imagenet_val1300" / "images"
    if folder.is_dir():
        from bnadapt.data import resize_crop

        files = sorted(folder.iterdir())[first : first + n]
        ims = [np.asarray(resize_crop(Image.open(f).convert("RGB"), max(size, 256 * size // 224), size)) for f in files]
        return np.stack(ims), "ImageNet val (../shared)"
    rng = np.random.default_rng(first)
    coarse = rng.integers(0, 256, (n, size // 8, size // 8, 3), dtype=np.uint8)
    ims = [np.asarray(Image.fromarray(c).resize((size, size), Image.BILINEAR)) for c in coarse]
    return np.stack(ims), "synthetic"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up: kernel caches, lru caches, CUDA context
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_table(x: np.ndarray, names: list[str], device: torch.device, reps: int) -> None:
    t = torch.from_numpy(x).to(device)
    has_torch = set(torch_corruption_names())
    print(f"| corruption | path | numpy ms/image | torch ({device.type}) ms/image | speed-up |")
    print("|---|---|---:|---:|---:|")
    tot_np = tot_t = 0.0
    for name in names:
        try:
            corrupt(x[:1], name, 3, seed=0)
        except FileNotFoundError as e:  # frost without its textures (imagecorruptions not installed)
            print(f"| {name} | skipped: {str(e).split(';')[0]} | | | |")
            continue
        a = time_call(lambda name=name: corrupt(x, name, 3, seed=0), reps, device)
        b = time_call(lambda name=name: corrupt(t, name, 3, seed=0, backend="torch"), reps, device)
        tot_np, tot_t = tot_np + a, tot_t + b
        path = "torch" if name in has_torch else "numpy fallback"
        n = len(x)
        print(f"| {name} | {path} | {1e3 * a / n:.2f} | {1e3 * b / n:.2f} | {a / b:.1f}x |", flush=True)
    n = len(x)
    print(f"| **all {len(names)}** | | {1e3 * tot_np / n:.2f} | {1e3 * tot_t / n:.2f} | {tot_np / tot_t:.1f}x |")


def fidelity_table(device: torch.device) -> None:
    sets = {"cifar": load_images(4, 64, first=20)[0], "imagenet": load_images(2, 224, first=30)[0]}
    print("| corruption | values differing | identical | within 1 | max diff | mean diff |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in torch_corruption_names():
        try:
            corrupt(sets["cifar"][:1], name, 1, profile="cifar")
        except FileNotFoundError:
            print(f"| {name} | skipped (missing data) | | | | |")
            continue
        diffs = []
        for profile, x in sets.items():
            for s in (1, 3, 5):
                ref = corrupt(x, name, s, profile=profile, seed=0)
                out = corrupt(torch.from_numpy(x).to(device), name, s, profile=profile, seed=0, backend="torch")
                diffs.append(np.abs(out.cpu().numpy().astype(int) - ref).ravel())
        d = np.concatenate(diffs)
        same, near = (d == 0).mean(), (d <= 1).mean()
        row = f"| {name} | {int((d != 0).sum())} / {d.size} | {same:.5f} | {near:.5f} | {d.max()} | {d.mean():.5f} |"
        print(row, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", help="torch device for the torch path: cpu or cuda[:i]")
    ap.add_argument("--images", type=int, default=16, help="batch size (224x224 images)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (numpy's own code is single-threaded)")
    ap.add_argument("--quick", action="store_true", help="4 images, 1 repetition: a smoke run under a minute on a CPU")
    ap.add_argument("--names", default="all", help="a corruption subset (common, extra, all, ...) or comma list")
    ap.add_argument("--fidelity", action="store_true", help="also print the torch vs numpy agreement table")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("expected a CUDA device for --device cuda, none is available; use --device cpu")
    torch.set_num_threads(args.threads)
    n, reps = (4, 1) if args.quick else (args.images, args.reps)
    names = args.names.split(",") if "," in args.names or args.names in corruption_names("all") else None
    names = names or corruption_names(args.names)
    x, source = load_images(n, 224)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(
        f"### {n} x 224x224 images ({source}), severity 3, imagenet profile, median of {reps}; "
        f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__}, {args.threads} torch thread(s)"
        f"{gpu}\n"
    )
    t0 = time.perf_counter()
    speed_table(x, names, device, reps)
    if args.fidelity:
        print(f"\n### torch path ({device.type}) vs numpy path, severities 1, 3, 5, both profiles, seed 0\n")
        fidelity_table(device)
    print(f"\nwall time {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
