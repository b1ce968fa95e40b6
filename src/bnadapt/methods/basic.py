"""The basic estimators: ``source``, ``replace`` and ``prior``.

- ``source``: no change (the baseline).
- ``replace``: every selected BN layer's statistics become the mean and unbiased variance of its input over the n
  target images, as one train-mode forward measures them (Benz et al. 2021).
- ``prior``: ``N/(N+n)`` source + ``n/(N+n)`` target statistics (Schneider et al. 2020), N = option ``prior``.
  ``order=independent`` measures every layer's target statistics with the earlier layers fully adapted (one
  train-mode forward) and mixes afterwards; ``order=sequential`` measures each layer with the earlier layers already
  mixed, as Schneider et al.'s reference code normalises (its BN layers mix inside the forward pass).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..adapt import AdaptConfig, register_method
from ..bn import BNStats, estimate_in_order, estimate_stats, mix_stats, pooled_moments, toward

__all__ = ["PRIOR_ORDERS", "check_sample"]

PRIOR_ORDERS = ("independent", "sequential")


@register_method("source", images="unused", needs_bn=False)
def source(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """The model as it is."""
    return model


def _estimate(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> tuple[BNStats, BNStats]:
    source = BNStats.from_model(model, layers)
    target = estimate_stats(model, images, layers, cfg.batch_size, cfg.device, reducer=cfg.reducer)
    return source, target


@register_method("replace", shardable=True)
def replace(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """Target statistics in place of the source's."""
    source, target = _estimate(model, images, cfg, layers)
    mix_stats(source, target, 1.0, cfg.part).apply_to(model)
    return model


def _check_prior(options: dict) -> None:
    if not options["prior"] >= 0:  # also refuses NaN
        raise ValueError(f"expected a prior strength N >= 0, got {options['prior']}")
    if options["order"] not in PRIOR_ORDERS:
        raise ValueError(
            f"expected prior's option order to be one of {', '.join(PRIOR_ORDERS)}, got {options['order']!r}"
        )


def _prior_shardable(options: Mapping[str, Any]) -> bool:
    # Only the independent order is one estimate_stats() over the sample; the sequential one measures in eval mode.
    return options["order"] == "independent"


@register_method(
    "prior", options={"prior": 16.0, "order": "sequential"}, check=_check_prior, shardable=_prior_shardable
)
def prior(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """Source and target statistics mixed with the target's weight n / (N + n)."""
    strength = cfg.options["prior"]
    if cfg.options["order"] == "sequential":
        check_sample(images)

        def decide(name: str, layer: nn.Module, a: torch.Tensor, w: torch.Tensor, positions: int):
            m, v, _ = pooled_moments(a, w, positions)
            weight = a.shape[0] / (strength + a.shape[0])
            return toward(layer, m, v, weight, weight, cfg.part)

        estimate_in_order(model, images, layers, decide, cfg.batch_size, cfg.device)
        return model
    source, target = _estimate(model, images, cfg, layers)
    # Schneider et al. count n in images, not in the values per channel a layer sees.
    n = int(target.metadata["images"])
    mix_stats(source, target, n / (strength + n), cfg.part).apply_to(model)
    return model


def check_sample(images) -> None:
    """Refuse an empty sample (a tensor of 0 images) before estimating anything."""
    if isinstance(images, torch.Tensor) and images.shape[0] < 1:
        raise ValueError("expected at least one adaptation image, got none")
