"""Statistics estimated in execution order, as inference normalises: ``sequential`` and the shift-aware ``auto``.

``replace`` measures every BN layer in one train-mode forward, where each layer sees inputs normalised with the
sample's own batch statistics. Here the model stays in eval mode and each layer is measured with every earlier layer
already set (:func:`bnadapt.bn.estimate_in_order`). ``sequential`` takes the sample's statistics as measured.

``auto`` is shift-aware shrinkage: each layer moved from the source statistics towards the target's only as far as
the measured shift exceeds the sampling noise of an n-image estimate (empirical Bayes; derivation in
docs/methods.md):

    shift d_c = (target_c - source_c) / scale_c,   noise s_c^2 = Var_images(per-image statistic_c) / n / scale_c^2
    tau^2 = max(0, mean_c(d_c^2 - s_c^2))          (per layer)
    weight_c = tau^2 / (tau^2 + s_c^2)             (per channel; 0 = source, 1 = replace)

for the mean (scale = source std) and for the log-variance (scale = 1), measured in execution order as
``sequential`` does. Prior strength N of ``prior`` corresponds to ``weight = n / (N + n)``; ``auto`` computes it per
layer and channel instead. How far along that path to go (0 = source, 1 = the weights as derived) is chosen per
sample by a label-free score (option ``select``), because a real but harmless shift (e.g. train-time augmentation vs
clean test images) looks exactly like a harmful one to the statistics alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..adapt import AdaptConfig, adapt, register_method
from ..bn import BNStats, estimate_in_order, iter_batches, model_device, pooled_moments, shrinkage_weight, toward
from .basic import check_sample

__all__ = ["SCALES", "SELECT", "auto_weights"]

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
SELECT = ("im", "entropy", "none")


@register_method("sequential")
def sequential(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """Each layer's statistics measured with every earlier layer already adapted."""
    check_sample(images)
    part = cfg.part

    def decide(name: str, layer: nn.Module, a: torch.Tensor, w: torch.Tensor, positions: int):
        m, v, _ = pooled_moments(a, w, positions)
        return (m if part != "var" else layer.running_mean), (v if part != "mean" else layer.running_var)

    estimate_in_order(model, images, layers, decide, cfg.batch_size, cfg.device)
    return model


class Shrink:
    """``auto``'s decision for one layer (an :data:`bnadapt.bn.Decide`); records the weights it chose.

    Example:
        >>> layer = nn.BatchNorm2d(2)
        >>> decide = Shrink("both")
        >>> _ = decide("bn", layer, torch.zeros(4, 2).double(), torch.ones(4, 2).double(), 9)
        >>> decide.weights["bn"]
        (0.0, 0.0)
    """

    def __init__(self, part: str, scale: float = 1.0) -> None:
        self.part = part
        self.scale = scale
        self.weights: dict[str, tuple[float, float]] = {}

    def __call__(self, name: str, layer: nn.Module, a: torch.Tensor, w: torch.Tensor, positions: int):
        n = a.shape[0]
        m, v, c = pooled_moments(a, w, positions)
        src_m = layer.running_mean.double()
        src_v = layer.running_var.double().clamp_min(0) + layer.eps
        if n < 2:  # one image: its statistics carry no measure of their own noise, so nothing says "shift"
            wm = wv = torch.zeros_like(m)
        else:
            wm = shrinkage_weight((m - src_m) / src_v.sqrt(), a.var(0, correction=1) / n / src_v)
            tgt_v = v + layer.eps
            # log-variance: its noise is the relative noise of the variance (delta method)
            wv = shrinkage_weight(torch.log(tgt_v / src_v), c.var(0, correction=1) / n / tgt_v**2)
        wm, wv = wm * self.scale, wv * self.scale
        if self.part == "mean":
            wv = torch.zeros_like(wv)
        elif self.part == "var":
            wm = torch.zeros_like(wm)
        self.weights[name] = (float(wm.mean()), float(wv.mean()))
        # The variance is mixed as a variance (like prior), so weight 0 and 1 give source and replace exactly.
        return toward(layer, m, v, wm, wv)


def _check_auto(options: dict) -> None:
    if options["select"] not in SELECT:
        raise ValueError(f"expected auto's option select to be one of {', '.join(SELECT)}, got {options['select']!r}")


@register_method("auto", options={"select": "im"}, check=_check_auto)
def auto(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """Per-layer, per-channel shrinkage towards the source, its strength from the data."""
    check_sample(images)
    select = cfg.options["select"]
    if select == "none":
        decide = Shrink(cfg.part)
        estimate_in_order(model, images, layers, decide, cfg.batch_size, cfg.device)
        model.bnadapt_auto_weights = decide.weights  # read by auto_weights(); a plain attribute, not state
        return model
    if not isinstance(images, torch.Tensor):
        images = torch.cat(list(images))
    # Candidates are tried in place on the model, its selected layers' statistics put back before each: a snapshot
    # costs far less than a copy of the model.
    source = BNStats.from_model(model, layers)
    best = None
    for scale in SCALES:
        source.apply_to(model)
        decide = Shrink(cfg.part, scale)
        logits = estimate_in_order(model, images, layers, decide, cfg.batch_size, cfg.device)
        score = _score(model, images, cfg.batch_size, cfg.device, select, logits)
        if best is None or score < best[0]:
            best = (score, BNStats.from_model(model, layers), decide.weights, scale)
    _, chosen, weights, scale = best
    chosen.apply_to(model)
    model.bnadapt_auto_weights = weights
    model.bnadapt_auto_scale = scale
    return model


def _score(model: nn.Module, images: torch.Tensor, batch_size: int, device, select: str, logits=None) -> float:
    """Lower is better. ``entropy``: mean prediction entropy on the adaptation images. ``im`` (information
    maximisation): that minus the entropy of the mean prediction, so a model that is confident because it puts
    every image in one class (what severe noise does to the source model) does not win. ``logits``: the model's
    output on the images when already at hand (the estimating forward of one batch is the adapted model's)."""
    if logits is not None:
        p = torch.softmax(logits.float(), dim=1)
    else:
        device = model_device(model, device)
        probs = []
        model.eval()
        with torch.no_grad():
            for x in iter_batches(images, batch_size):
                probs.append(torch.softmax(model(x.to(device)).float(), dim=1))
        p = torch.cat(probs)
    each = float(-(p * torch.log(p.clamp_min(1e-12))).sum(1).mean())
    if select == "entropy":
        return each
    marginal = p.mean(0)
    return each - float(-(marginal * torch.log(marginal.clamp_min(1e-12))).sum())


def auto_weights(model: nn.Module, images: torch.Tensor | Iterable, **kwargs) -> dict[str, tuple[float, float]]:
    """The weights ``auto`` gives the target statistics, per BN layer: (mean's, variance's), channel-averaged.

    0 means the layer keeps its source statistics, 1 means it takes the target's (``replace``). ``kwargs`` go to
    :func:`bnadapt.adapt` (n, seed, part, layers, ...); the model is not changed.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> w = auto_weights(net, torch.rand(16, 3, 8, 8))
        >>> list(w), all(0 <= v <= 1 for v in w["1"])
        (['1'], True)
    """
    adapted = adapt(model, images, method="auto", **kwargs)
    return dict(adapted.bnadapt_auto_weights)
