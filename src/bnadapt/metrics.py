"""Accuracy and the corruption-benchmark metrics: corruption error (CE), mCE and relative mCE.

The functional forms and the stateful :class:`Accuracy` share one private ``_update``/``_compute`` pair (the
torchmetrics layout), so a streamed evaluation and a one-shot call count the same way.

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

import torch

__all__ = [
    "ALEXNET_CLEAN_ERROR",
    "ALEXNET_ERRORS",
    "Accuracy",
    "Baseline",
    "accuracy",
    "corruption_error",
    "load_baseline",
    "mce",
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


def _update(logits: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """(correct, total) of top-1 predictions; logits (N, C), integer targets (N,)."""
    if logits.ndim != 2 or target.ndim != 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(
            f"expected logits (N, C) and targets (N,) with the same N, got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    return int((logits.argmax(dim=1) == target.to(logits.device)).sum()), int(target.shape[0])


def _compute(correct: int, total: int) -> float:
    return correct / total if total else float("nan")


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy as a fraction.

    Example:
        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        0.5
    """
    return _compute(*_update(logits, target))


class Accuracy:
    """Streaming top-1 accuracy: ``update`` per batch, ``compute`` at the end, ``reset`` to reuse.

    Example:
        >>> m = Accuracy()
        >>> m.update(torch.tensor([[0.0, 1.0]]), torch.tensor([1]))
        >>> m.update(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))
        >>> m.correct, m.total, m.compute()
        (1, 2, 0.5)
    """

    def __init__(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        c, t = _update(logits, target)
        self.correct += c
        self.total += t

    def compute(self) -> float:
        return _compute(self.correct, self.total)

    def reset(self) -> None:
        self.correct = self.total = 0


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
