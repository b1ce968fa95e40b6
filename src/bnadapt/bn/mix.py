"""Combining statistics: blends of source and target, shrinkage weights, and the running (EMA) update."""

from __future__ import annotations

import math

import torch
from torch import nn

from .moments import batch_var_mean
from .store import BNStats

__all__ = ["EMAUpdate", "equivalent_prior", "mix_stats", "shrinkage_weight", "toward"]


def mix_stats(source: BNStats, target: BNStats, weight: float | dict[str, float], part: str = "both") -> BNStats:
    """Blend statistics: ``(1 - w) * source + w * target`` per layer, for the layers in ``target``.

    ``weight`` is the target's share, one float or one per layer; ``part`` = "both", "mean" (keep source variance)
    or "var" (keep source mean). With ``w = n / (N + n)`` this is the prior estimator of Schneider et al. (2020).

    Example:
        >>> src = BNStats(mean={"bn": torch.zeros(2)}, var={"bn": torch.ones(2)})
        >>> tgt = BNStats(mean={"bn": torch.ones(2)}, var={"bn": 3 * torch.ones(2)})
        >>> mix_stats(src, tgt, 0.5).var["bn"].tolist()
        [2.0, 2.0]
    """
    if part not in ("both", "mean", "var"):
        raise ValueError(f"expected part to be one of both, mean, var; got {part!r}")
    out = BNStats(mean={}, var={}, count=dict(target.count), metadata=dict(target.metadata))
    for n in target.names:
        w = weight[n] if isinstance(weight, dict) else weight
        if not 0.0 <= float(w) <= 1.0:
            raise ValueError(f"expected a mixing weight in [0, 1] for layer {n!r}, got {w}")
        mean = (1 - w) * source.mean[n] + w * target.mean[n]
        var = (1 - w) * source.var[n] + w * target.var[n]
        out.mean[n] = mean if part in ("both", "mean") else source.mean[n].clone()
        out.var[n] = var if part in ("both", "var") else source.var[n].clone()
    return out


def toward(
    layer: nn.Module, mean: torch.Tensor, var: torch.Tensor, w_mean, w_var, part: str = "both"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's source statistics moved by ``w_mean``/``w_var`` (floats or per channel) towards ``mean``/``var``,
    in float64: ``source + w * (target - source)``; the part not adapted (``part``) keeps the source's.

    Example:
        >>> bn = nn.BatchNorm2d(2)
        >>> m, v = toward(bn, torch.ones(2).double(), torch.full((2,), 3.0).double(), 0.5, 0.5)
        >>> m.tolist(), v.tolist()
        ([0.5, 0.5], [2.0, 2.0])
    """
    src_m, src_v = layer.running_mean.double(), layer.running_var.double()
    new_m = src_m + w_mean * (mean - src_m) if part != "var" else src_m
    return new_m, (src_v + w_var * (var - src_v) if part != "mean" else src_v)


def shrinkage_weight(shift: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-channel weight of the target estimate: ``tau^2 / (tau^2 + noise)``, tau^2 the layer's excess shift.

    ``shift`` holds the measured target-minus-source differences and ``noise`` their sampling variances, in the same
    units. No shift beyond the noise gives 0 everywhere; a shift far beyond it gives weights near 1.

    Example:
        >>> shrinkage_weight(torch.zeros(4), torch.ones(4)).tolist()
        [0.0, 0.0, 0.0, 0.0]
        >>> round(float(shrinkage_weight(torch.full((4,), 10.0), torch.ones(4))[0]), 2)
        0.99
    """
    tau2 = torch.clamp((shift**2 - noise).mean(), min=0.0)
    if tau2 == 0:
        return torch.zeros_like(shift)
    return tau2 / (tau2 + noise)


def equivalent_prior(weight: float, n: int) -> float:
    """The prior strength N that gives ``weight`` with n images (``weight = n / (N + n)``); inf for weight 0.

    Example:
        >>> equivalent_prior(0.5, 32)
        32.0
    """
    return math.inf if weight <= 0 else n * (1 - weight) / weight


class EMAUpdate:
    """Forward pre-hook: move a BN layer's running statistics ``momentum`` of the way towards the incoming batch's
    before the layer normalises it (``part``: which statistics move). The batch variance is unbiased
    (``correction=1``, as PyTorch's running update) or biased (``correction=0``); a batch of one value per channel
    moves only the mean. :meth:`snapshot` records the layer's statistics (done when the hook is made) and
    :meth:`restore` puts them back.

    Example:
        >>> bn = nn.BatchNorm2d(1).eval()
        >>> _ = bn.register_forward_pre_hook(EMAUpdate(bn, momentum=0.5))
        >>> _ = bn(torch.full((2, 1, 2, 2), 4.0))
        >>> bn.running_mean.tolist()
        [2.0]
    """

    def __init__(self, layer: nn.Module, momentum: float, part: str = "both", correction: int = 1) -> None:
        self.momentum = momentum
        self.part = part
        self.correction = correction
        self.snapshot(layer)

    def snapshot(self, layer: nn.Module) -> None:
        """Record ``layer``'s current statistics as the ones :meth:`restore` returns to."""
        self.initial = (layer.running_mean.detach().clone(), layer.running_var.detach().clone())

    @torch.no_grad()
    def restore(self, layer: nn.Module) -> None:
        """Put back the statistics of the last :meth:`snapshot`."""
        layer.running_mean.copy_(self.initial[0])
        layer.running_var.copy_(self.initial[1])

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        count = x.numel() // x.shape[1]
        _, var, mean = batch_var_mean(x, correction=self.correction if count > 1 else 0)
        m = self.momentum
        if self.part in ("both", "mean"):
            module.running_mean.mul_(1 - m).add_(mean.to(module.running_mean.dtype), alpha=m)
        if self.part in ("both", "var") and count > 1:
            module.running_var.mul_(1 - m).add_(var.to(module.running_var.dtype), alpha=m)
