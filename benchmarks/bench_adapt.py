"""What one ``bnadapt.adapt`` costs, as a multiple of one eval forward of the same images.

Usage: python benchmarks/bench_adapt.py [--n 32] [--repeat 15] [--threads 1] [--methods replace,prior,sequential,auto]
       [--parts]

ResNet-20 (random init: the cost does not depend on the weights) on n random 32x32 images, one torch thread by
default. Each repeat times an eval forward and every method once, interleaved, so a busy machine slows all alike;
the table gives medians and each method's median ratio to the forward. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bnadapt import adapt
from bnadapt.bn import bn_layers, copy_model
from bnadapt.models import cifar_resnet


def _seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default="replace,prior,sequential,auto")
    ap.add_argument("--parts", action="store_true", help="also time a train-mode forward and the model copy alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = cifar_resnet(20).eval()
    x = torch.rand(args.n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    methods = args.methods.split(",")

    def forward() -> None:
        with torch.no_grad():
            model(x)

    # A copy in train mode: its running statistics drift with every call, the measured model's must not.
    twin = copy_model(model)
    for _, bn in bn_layers(twin):
        bn.train()

    def train_forward() -> None:  # what replace's one forward cannot avoid: BN computing the batch statistics
        with torch.no_grad():
            twin(x)

    jobs = {"eval forward": forward}
    if args.parts:
        jobs.update({"train-mode fwd": train_forward, "copy_model": lambda: copy_model(model)})
    jobs.update({m: (lambda m=m: adapt(model, x, method=m, n=args.n)) for m in methods})
    for fn in jobs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(args.repeat):
        for k, fn in jobs.items():
            times[k].append(_seconds(fn))
    base = statistics.median(times["eval forward"])
    print(f"ResNet-20, n={args.n} images 32x32, {args.threads} torch thread(s), {args.repeat} interleaved repeats")
    print(f"| {'what':<14} | median ms | x eval forward |")
    print(f"|{'-' * 16}|-----------|----------------|")
    for k, t in times.items():
        med = statistics.median(t)
        print(f"| {k:<14} | {1000 * med:9.2f} | {med / base:14.2f} |")


if __name__ == "__main__":
    main()
