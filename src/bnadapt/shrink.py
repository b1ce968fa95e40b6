"""Statistics estimated the way inference uses them: ``sequential`` and the shift-aware ``auto``.

``replace`` measures every BN layer in one train-mode forward, where each layer sees inputs normalised with the
sample's own batch statistics. Here the model stays in eval mode and the layers are estimated in execution order:
when a layer's input is measured, every earlier layer already normalises with its adapted statistics, exactly as at
inference. With all n images in one batch this is ONE forward pass (a pre-hook sets each layer's statistics just
before the layer runs); with more images than ``batch_size`` it takes one pass per layer, each stopped at that layer.

``auto`` moves each layer from the source statistics towards the target's only as far as the measured shift exceeds
the sampling noise of an n-image estimate (empirical-Bayes shrinkage; derivation in docs/methods.md):

    shift d_c = (target_c - source_c) / scale_c,   noise s_c^2 = Var_images(per-image statistic_c) / n / scale_c^2
    tau^2 = max(0, mean_c(d_c^2 - s_c^2))          (per layer)
    weight_c = tau^2 / (tau^2 + s_c^2)             (per channel; 0 = source, 1 = replace)

for the mean (scale = source std) and for the log-variance (scale = 1). Equal statistics give weight 0 (source); a
shift large against the noise gives weight -> 1 (replace). Prior strength N of ``prior`` corresponds to
``weight = n / (N + n)``; ``auto`` computes it per layer and channel instead of taking one N for all.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .adapt import AdaptConfig, register_method
from .bn import bn_layers, iter_batches

__all__ = ["auto_weights", "shrinkage_weight"]

# (layer name, layer, per-image means (n, C), per-image variances (n, C), positions per image) -> new (mean, var)
Decide = Callable[[str, nn.Module, torch.Tensor, torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


def _image_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-image, per-channel mean and (biased) variance over the positions of one image, in float64."""
    x = x.detach().float()
    flat = x.flatten(2) if x.ndim > 2 else x.unsqueeze(-1)
    var, mean = torch.var_mean(flat, dim=2, correction=0)
    return mean.double(), var.double(), flat.shape[2]


def _pooled(a: torch.Tensor, w: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over all images x positions (what ``replace`` stores), and each image's spread
    around the pooled mean (its contribution to that variance)."""
    m = a.mean(0)
    c = w + (a - m) ** 2
    count = a.shape[0] * positions
    return m, c.sum(0) * positions / max(count - 1, 1), c


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


class _Shrink:
    """``auto``'s decision for one layer; records the weights it chose (for reports and tests)."""

    def __init__(self, part: str, scale: float = 1.0) -> None:
        self.part = part
        self.scale = scale
        self.weights: dict[str, tuple[float, float]] = {}

    def __call__(self, name: str, layer: nn.Module, a: torch.Tensor, w: torch.Tensor, positions: int):
        n = a.shape[0]
        m, v, c = _pooled(a, w, positions)
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
        return src_m + wm * (m - src_m), layer.running_var.double() + wv * (v - layer.running_var.double())


def _replace_decision(part: str) -> Decide:
    def decide(name: str, layer: nn.Module, a: torch.Tensor, w: torch.Tensor, positions: int):
        m, v, _ = _pooled(a, w, positions)
        return (m if part != "var" else layer.running_mean), (v if part != "mean" else layer.running_var)

    return decide


def _set(layer: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
    with torch.no_grad():
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been measured."""


def estimate_in_order(model: nn.Module, images, layers: list[str], decide: Decide, batch_size: int, device) -> None:
    """Set each of ``layers`` (in execution order) to ``decide``'s statistics, measured in eval mode with every
    earlier layer already set. One forward when the images form one batch, else one (truncated) pass per layer."""
    found = dict(bn_layers(model))
    device = device or next(model.parameters()).device
    # An iterable of batches may be single-use: keep the (few) adaptation images.
    batches = list(iter_batches(images, batch_size)) if isinstance(images, torch.Tensor) else list(images)
    if not batches:
        raise ValueError("expected at least one image to estimate BN statistics from, got none")
    wanted = set(layers)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if len(batches) == 1:
                _one_pass(model, batches[0].to(device), found, wanted, decide)
            else:
                for name in _execution_order(model, batches[0].to(device), found, wanted):
                    _layer_pass(model, batches, device, name, found[name], decide)
    finally:
        for m, mode in modes.items():
            m.train(mode)


def _one_pass(model, x, found, wanted, decide) -> None:
    def hook_for(name):
        def hook(layer, args):
            _set(layer, *decide(name, layer, *_image_moments(args[0])))

        return hook

    handles = [found[n].register_forward_pre_hook(hook_for(n)) for n in found if n in wanted]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()


def _execution_order(model, x, found, wanted) -> list[str]:
    """BN layer names in the order a forward runs them (registration order can differ, e.g. a shortcut's BN)."""
    order: list[str] = []
    handles = [layer.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, layer in found.items()]
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(order))
    return [n for n in order if n in wanted] + [n for n in found if n in wanted and n not in order]


def _layer_pass(model, batches, device, name: str, layer: nn.Module, decide: Decide) -> None:
    parts_a, parts_w = [], []
    positions = 0

    def hook(_layer, args):
        nonlocal positions
        a, w, positions = _image_moments(args[0])
        parts_a.append(a)
        parts_w.append(w)
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        for batch in batches:
            with contextlib.suppress(_Stop):
                model(batch.to(device, non_blocking=True))
    finally:
        handle.remove()
    _set(layer, *decide(name, layer, torch.cat(parts_a), torch.cat(parts_w), positions))


def _sample_size_check(images) -> None:
    if isinstance(images, torch.Tensor) and images.shape[0] < 1:
        raise ValueError("expected at least one adaptation image, got none")


@register_method("sequential")
def _sequential(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    _sample_size_check(images)
    estimate_in_order(model, images, layers, _replace_decision(cfg.part), cfg.batch_size, cfg.device)
    return model


def prior_in_order(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """``prior`` with ``order=sequential``: each layer mixes its source statistics with those of the n images,
    weight ``n / (N + n)``, measured with every earlier layer already mixed, as Schneider et al.'s reference code
    normalises (its BN layers mix inside the forward pass). ``order=independent`` measures every layer's target
    statistics with the earlier layers fully adapted (one train-mode forward) and mixes afterwards."""
    _sample_size_check(images)

    def decide(name: str, layer: nn.Module, a: torch.Tensor, w: torch.Tensor, positions: int):
        m, v, _ = _pooled(a, w, positions)
        weight = a.shape[0] / (cfg.prior + a.shape[0])
        src_m, src_v = layer.running_mean.double(), layer.running_var.double()
        mean = src_m + weight * (m - src_m) if cfg.part != "var" else src_m
        return mean, (src_v + weight * (v - src_v) if cfg.part != "mean" else src_v)

    estimate_in_order(model, images, layers, decide, cfg.batch_size, cfg.device)
    return model


# How far along the shrinkage path to go: 0 = source, 1 = the shrinkage weights as derived. Chosen per adaptation
# sample by a label-free score (see _score), because a real but harmless shift (e.g. train-time augmentation vs clean
# test images) looks exactly like a harmful one to the statistics alone.
SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
SELECT = ("im", "entropy", "none")


def _check_auto(options: dict) -> None:
    if options["select"] not in SELECT:
        raise ValueError(f"expected auto's option select to be one of {', '.join(SELECT)}, got {options['select']!r}")


@register_method("auto", options={"select": "im"}, check=_check_auto)
def _auto(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    _sample_size_check(images)
    select = cfg.options["select"]
    if select == "none":
        decide = _Shrink(cfg.part)
        estimate_in_order(model, images, layers, decide, cfg.batch_size, cfg.device)
        model.bnadapt_auto_weights = decide.weights  # read by auto_weights(); a plain attribute, not state
        return model
    if not isinstance(images, torch.Tensor):
        images = torch.cat(list(images))
    best = None
    for scale in SCALES:
        candidate = copy.deepcopy(model)
        decide = _Shrink(cfg.part, scale)
        estimate_in_order(candidate, images, layers, decide, cfg.batch_size, cfg.device)
        score = _score(candidate, images, cfg.batch_size, cfg.device, select)
        if best is None or score < best[0]:
            best = (score, candidate, decide.weights, scale)
    _, chosen, weights, scale = best
    model.load_state_dict(chosen.state_dict())
    model.bnadapt_auto_weights = weights
    model.bnadapt_auto_scale = scale
    return model


def _score(model: nn.Module, images: torch.Tensor, batch_size: int, device, select: str) -> float:
    """Lower is better. ``entropy``: mean prediction entropy on the adaptation images. ``im`` (information
    maximisation): that minus the entropy of the mean prediction, so a model that is confident because it puts
    every image in one class (what severe noise does to the source model) does not win."""
    device = device or next(model.parameters()).device
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
        >>> w = auto_weights(net, torch.rand(16, 3, 8, 8) * 5)
        >>> list(w), all(0 <= v <= 1 for v in w["1"])
        (['1'], True)
    """
    from .adapt import adapt

    adapted = adapt(model, images, method="auto", **kwargs)
    return dict(adapted.bnadapt_auto_weights)


def equivalent_prior(weight: float, n: int) -> float:
    """The prior strength N that gives ``weight`` with n images (``weight = n / (N + n)``); inf for weight 0.

    Example:
        >>> equivalent_prior(0.5, 32)
        32.0
    """
    return math.inf if weight <= 0 else n * (1 - weight) / weight
