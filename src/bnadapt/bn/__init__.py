"""THE statistics room: every BatchNorm statistic bnadapt estimates, mixes, stores or applies is handled here.

- :mod:`.layers`: find and select BN layers, put them in batch-statistics mode, write a layer's statistics.
- :mod:`.store`: :class:`BNStats`, per-layer statistics as a value (snapshot, bit-exact restore, safetensors files).
- :mod:`.moments`: exact moments (per batch, per image, running across batches or processes).
- :mod:`.estimate`: statistics from images, as a train-mode forward measures them or in execution order.
- :mod:`.mix`: blends of source and target, shrinkage weights, the running (EMA) update.

It knows no adaptation method: methods (:mod:`bnadapt.methods`) are built from these pieces.

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    >>> source = BNStats.from_model(net)
    >>> target = estimate_stats(net, torch.rand(8, 3, 8, 8))
    >>> _ = mix_stats(source, target, 0.5).apply_to(net)
"""

from __future__ import annotations

from .estimate import Decide, estimate_in_order, estimate_stats
from .layers import (
    bn_layers,
    check_batch_for_layers,
    copy_model,
    execution_order,
    iter_batches,
    model_device,
    select_layers,
    set_layer_stats,
    use_batch_stats,
)
from .mix import EMAUpdate, equivalent_prior, mix_stats, shrinkage_weight, toward
from .moments import BatchReducer, Moments, batch_var_mean, image_moments, pooled_moments
from .store import BNStats, check_layer_values

__all__ = [
    "BNStats",
    "BatchReducer",
    "Decide",
    "EMAUpdate",
    "Moments",
    "batch_var_mean",
    "bn_layers",
    "check_batch_for_layers",
    "check_layer_values",
    "copy_model",
    "equivalent_prior",
    "estimate_in_order",
    "estimate_stats",
    "execution_order",
    "image_moments",
    "iter_batches",
    "mix_stats",
    "model_device",
    "pooled_moments",
    "select_layers",
    "set_layer_stats",
    "shrinkage_weight",
    "toward",
    "use_batch_stats",
]
