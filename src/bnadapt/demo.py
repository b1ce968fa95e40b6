"""The self-contained demo: a small BN CNN on scikit-learn's bundled digits, corrupted, then adapted.

Needs no data and no network: the digits ship inside scikit-learn. The trained network is cached under the user
cache directory so a rerun takes seconds. The evaluation is the benchmark's own path (``run_benchmark`` on
``generate:cifar:`` data), so the demo writes the same results, summary and report files as ``bnadapt bench``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._io import atomic_path
from .adapt import adapt
from .data import cache_dir as user_cache_dir
from .data import to_float_nchw
from .models import Classifier

log = logging.getLogger(__name__)

# CIFAR-10-C strength (the digits are 32x32). Glass blur rather than a smooth blur: the 4x upsampling of the 8x8
# digits already smooths them, so Gaussian or defocus blur at CIFAR strength barely changes them.
CORRUPTIONS = ("gaussian_noise", "glass_blur", "contrast")
SEVERITIES = (1, 3, 5)
_SIZE = 32
_VERSION = 4  # bump when the network or its training changes, so stale caches are not reused


METHODS = ("source", "replace", "prior")
# Files the demo writes into its output folder (and replaces on a rerun); nothing else there is touched.
_OUTPUTS = (
    "digits_test.npz",
    "results.jsonl",
    "summary.json",
    "report.md",
    "gain_heatmap.png",
    "acc_vs_severity.png",
    "acc_vs_n.png",
)


@dataclass(frozen=True)
class DemoRow:
    corruption: str
    severity: int
    accuracy: dict[str, float]


def cache_dir() -> Path:
    """``$BNADAPT_CACHE``, else ``$XDG_CACHE_HOME/bnadapt``, else ``~/.cache/bnadapt`` (the data cache's folder)."""
    return user_cache_dir()


def digits_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 32x32 grey images, split 2:1 into train and test (seeded)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    small = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    big = F.interpolate(small, size=(_SIZE, _SIZE), mode="bilinear", align_corners=False)
    x = (big.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    order = np.random.default_rng(seed).permutation(len(x))
    cut = len(x) * 2 // 3
    tr, te = order[:cut], order[cut:]
    return x[tr], d.target[tr].astype(np.int64), x[te], d.target[te].astype(np.int64)


def digits_cnn() -> Classifier:
    """Three conv-BN-ReLU stages, global pooling, a linear head: 10 classes, grey 32x32 input."""

    def stage(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    net = nn.Sequential(
        *stage(1, 16),
        nn.MaxPool2d(2),
        *stage(16, 32),
        nn.MaxPool2d(2),
        *stage(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    return Classifier(net, mean=(0.5,), std=(0.5,), preprocessing={"input_size": [1, _SIZE, _SIZE]})


def trained_digits_cnn(x: np.ndarray, y: np.ndarray, epochs: int = 10, seed: int = 0) -> Classifier:
    """Train :func:`digits_cnn` on clean digits, or load it from the cache when it was trained before."""
    # Seeded weights and batch order, drawn from a forked generator: the caller's global RNG state is left alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = digits_cnn()
        path = cache_dir() / f"digits_cnn_v{_VERSION}_s{seed}.pt"
        if path.is_file():
            try:
                model.net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                return model.eval()
            except (RuntimeError, OSError, ValueError) as e:
                log.warning("ignoring the unreadable demo cache %s (%s); retraining", path, e)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        xt, yt = to_float_nchw(x), torch.from_numpy(y)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(xt), generator=g).split(64):
                opt.zero_grad()
                F.cross_entropy(model(xt[idx]), yt[idx]).backward()
                opt.step()
    # Running averages lag behind the last weight updates; exact population statistics over the training set
    # (PreciseBN, our own estimator with n = all images) give the source model its best clean accuracy.
    model = adapt(model, xt, method="replace", inplace=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(model.net.state_dict(), tmp)
    except OSError as e:
        log.warning("could not cache the demo network in %s (%s); the next run trains again", path, e)
    return model


def run_demo(out: str | os.PathLike[str] = "bnadapt-demo", n: int = 32, prior: float = 16.0, seed: int = 0):
    """Benchmark ``source``, ``replace`` and ``prior`` on the corrupted digits; write the report into ``out``.

    Returns:
        ``(clean accuracy, rows per corruption and severity, report path)``.

    Example:
        >>> clean, rows, report = run_demo("/tmp/demo")  # doctest: +SKIP
    """
    from .benchmark import BenchConfig, run_benchmark
    from .data import open_data
    from .report import write_report

    out = Path(out)
    # Checked before the (possibly minutes long) training, not after it.
    if not out.parent.is_dir():
        raise FileNotFoundError(f"expected an existing parent directory for --out {out}; create {out.parent} first")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"expected a non-negative integer --seed, got {seed!r}")
    xtr, ytr, xte, yte = digits_data(seed)
    model = trained_digits_cnn(xtr, ytr, seed=seed)
    out.mkdir(exist_ok=True)
    for name in _OUTPUTS:
        (out / name).unlink(missing_ok=True)
    with atomic_path(out / "digits_test.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, x=xte, y=yte)
    data = open_data(f"generate:cifar:{out / 'digits_test.npz'}", list(CORRUPTIONS), SEVERITIES, seed=seed)
    config = BenchConfig(methods=METHODS, ns=(n,), seeds=(seed,), prior=prior)
    results = run_benchmark({"digits_cnn": model}, data, config, out=out, command=["bnadapt", "demo"])
    report = write_report(out, "md")
    acc = {(r["corruption"], r["severity"], r["method"]): r["accuracy"] for r in results}
    clean = acc[("clean", 0, "source")]
    rows = [DemoRow(c, s, {m: acc[(c, s, m)] for m in METHODS}) for c in CORRUPTIONS for s in SEVERITIES]
    return clean, rows, next(p for p in report if p.name == "report.md")
