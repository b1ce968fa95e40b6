"""Accuracy (top-1 and top-5), the corruption-benchmark metrics (corruption error (CE), mCE and relative mCE), and
the statistics summaries report (paired bootstrap interval, seed spread).

The functional forms and the stateful :class:`Accuracy` share one private ``_update``/``_compute`` pair (the
torchmetrics layout), so a streamed evaluation and a one-shot call count the same way. Top-5 counts a prediction as
right when the target is among the ``min(5, classes)`` highest logits: with fewer than 5 classes every target is,
and top-5 is honestly 1.0.

CE of corruption c: ``sum_s E(s, c) / sum_s E_base(s, c)``; mCE: the mean CE over the 15 benchmark corruptions;
relative mCE subtracts the clean error from both sides (Hendrycks & Dietterich 2019). The baseline is AlexNet on
ImageNet-C unless a baseline file is given (see :func:`load_baseline`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ALEXNET_CLEAN_ERROR",
    "ALEXNET_ERRORS",
    "Accuracy",
    "BOOTSTRAP_RESAMPLES",
    "TOP_K",
    "Baseline",
    "accuracy",
    "corruption_error",
    "load_baseline",
    "mce",
    "paired_bootstrap",
    "seed_spread",
    "top5_accuracy",
]

# AlexNet top-1 error on ImageNet-C, mean over the 5 severities, in the canonical order (REFERENCE section 3).
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}
ALEXNET_CLEAN_ERROR = 0.4348


TOP_K = 5  # top-5 accuracy: the target among the k highest logits, k = min(TOP_K, classes)
BOOTSTRAP_RESAMPLES = 10_000


def _update(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int, int]:
    """(top-1 correct, top-5 correct, total); logits (N, C), integer targets (N,)."""
    if logits.ndim != 2 or target.ndim != 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"expected logits (N, C) and targets (N,) with the same N, got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    target = target.to(logits.device)
    top1 = logits.argmax(dim=1) == target
    # The argmax hit counts too, so top-5 >= top-1 even when ties make topk pick other indices.
    top5 = top1 | (logits.topk(min(TOP_K, logits.shape[1]), dim=1).indices == target[:, None]).any(dim=1)
    return int(top1.sum()), int(top5.sum()), int(target.shape[0])


def _compute(correct: int, total: int) -> float:
    return correct / total if total else float("nan")


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        0.5
    """
    correct, _, total = _update(logits, target)
    return _compute(correct, total)


def top5_accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-5 accuracy as a fraction: the target among the ``min(5, classes)`` highest logits.

    Example:
        >>> logits = torch.tensor([[6.0, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6]])
        >>> top5_accuracy(logits, torch.tensor([5, 5])), top5_accuracy(logits[:, :3], torch.tensor([2, 2]))
        (0.5, 1.0)
    """
    _, correct5, total = _update(logits, target)
    return _compute(correct5, total)


class Accuracy:
    """Streaming top-1 and top-5 accuracy: ``update`` per batch, ``compute`` (top-1) and ``compute_top5`` at the end,
    ``reset`` to reuse.

    Example:
        >>> m = Accuracy()
        >>> m.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
        >>> m.update(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
        >>> m.correct, m.correct5, m.total, m.compute(), m.compute_top5()
        (1, 2, 2, 0.5, 1.0)
    """

    def __init__(self) -> None:
        self.correct = 0
        self.correct5 = 0
        self.total = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        c, c5, t = _update(logits, target)
        self.correct += c
        self.correct5 += c5
        self.total += t

    def compute(self) -> float:
        return _compute(self.correct, self.total)

    def compute_top5(self) -> float:
        return _compute(self.correct5, self.total)

    def reset(self) -> None:
        self.correct = self.correct5 = self.total = 0


class Baseline:
    """Per-corruption baseline errors: a mean over severities (``errors[c]`` a float) or one per severity (a list
    of 5), and the baseline's clean error (for the relative mCE)."""

    def __init__(self, errors: Mapping[str, float | Sequence[float]], clean_error: float | None, name: str) -> None:
        self.errors, self.clean_error, self.name = dict(errors), clean_error, name

    def total(self, corruption: str, severities: Sequence[int]) -> float | None:
        """Baseline error summed over ``severities``; None when it is not defined for them."""
        e = self.errors.get(corruption)
        if e is None:
            return None
        if isinstance(e, (int, float)):
            # A mean over the 5 severities only normalises a run of all 5.
            return 5 * float(e) if sorted(severities) == [1, 2, 3, 4, 5] else None
        return sum(float(e[s - 1]) for s in severities)


ALEXNET = Baseline(ALEXNET_ERRORS, ALEXNET_CLEAN_ERROR, "AlexNet (ImageNet-C)")


def load_baseline(path: str | os.PathLike[str]) -> Baseline:
    """Read a baseline JSON file: ``{"errors": {corruption: mean error or [e1..e5]}, "clean_error": e}`` (fractions).

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "b.json"
        >>> _ = f.write_text('{"errors": {"fog": [0.1, 0.2, 0.3, 0.4, 0.5]}, "clean_error": 0.05}')
        >>> load_baseline(f).total("fog", [1, 5])
        0.6
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a baseline JSON file at {path}, found none")
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"expected a readable baseline JSON file at {path}, got a damaged one ({e})") from e
    errors = obj.get("errors") if isinstance(obj, dict) else None
    ok = isinstance(errors, dict) and all(
        isinstance(v, (int, float))
        or (isinstance(v, list) and len(v) == 5 and all(isinstance(t, (int, float)) for t in v))
        for v in errors.values()
    )
    if not ok:
        raise ValueError(
            f'expected {{"errors": {{corruption: error or [5 errors]}}, "clean_error": e}} in {path}, got {obj!r:.80}'
        )
    clean = obj.get("clean_error")
    return Baseline(errors, None if clean is None else float(clean), path.name)


def corruption_error(
    errors: Mapping[int, float], baseline_total: float, clean: float = 0.0, base_clean: float = 0.0
) -> float:
    """CE of one corruption from its errors per severity; with clean errors given, the relative CE.

    Example:
        >>> corruption_error({1: 0.25, 2: 0.5}, baseline_total=1.5)
        0.5
    """
    den = baseline_total - len(errors) * base_clean
    return (sum(errors.values()) - len(errors) * clean) / den if den > 0 else math.nan


def mce(
    errors: Mapping[str, Mapping[int, float]],
    baseline: Baseline = ALEXNET,
    clean_error: float | None = None,
) -> tuple[float | None, float | None]:
    """(mCE, relative mCE) over the corruptions the baseline covers; None when a corruption or clean error is missing.

    ``errors[c][s]`` is the error on corruption c at severity s. Every corruption of the baseline must be present
    with the same severities.

    Example:
        >>> perfect = {c: {s: 0.0 for s in range(1, 6)} for c in ALEXNET_ERRORS}
        >>> mce(perfect)
        (0.0, None)
    """
    ces, rces = [], []
    for c in baseline.errors:
        if c not in errors:
            return None, None
        total = baseline.total(c, list(errors[c]))
        if total is None:
            return None, None
        ces.append(corruption_error(errors[c], total))
        if clean_error is not None and baseline.clean_error is not None:
            rces.append(corruption_error(errors[c], total, clean_error, baseline.clean_error))
    if not ces:
        return None, None
    return sum(ces) / len(ces), (sum(rces) / len(rces) if rces else None)


def paired_bootstrap(
    diffs: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, 2.5th, 97.5th percentile) of paired differences, the interval by resampling them with replacement.

    ``diffs`` holds one paired difference per unit (e.g. per cell: a method's accuracy minus source's on the same
    cell); the interval is the percentile bootstrap of their mean, seeded, so a report is reproducible.

    Example:
        >>> paired_bootstrap([0.25, 0.25, 0.25])  # identical differences: an interval of zero width
        (0.25, 0.25, 0.25)
        >>> mean, lo, hi = paired_bootstrap([0.0, 0.1, 0.2, 0.3])
        >>> round(mean, 2), lo < mean < hi
        (0.15, True)
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or resamples < 1:
        raise ValueError(f"expected a non-empty list of differences and resamples >= 1, got {d.shape} and {resamples}")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    return float(d.mean()), float(lo), float(hi)


def seed_spread(means: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    """(standard deviation with ddof=1, min, max) of one value per seed; all None with fewer than two seeds.

    Example:
        >>> seed_spread([0.5, 0.75, 1.0])
        (0.25, 0.5, 1.0)
        >>> seed_spread([0.5])
        (None, None, None)
    """
    v = [float(m) for m in means]
    if len(v) < 2:
        return None, None, None
    return float(np.std(v, ddof=1)), min(v), max(v)
