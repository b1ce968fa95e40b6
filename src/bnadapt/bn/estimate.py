"""Estimating BN statistics from images: as one train-mode forward measures them (:func:`estimate_stats`), or in
execution order with every earlier layer already set, as inference will normalise (:func:`estimate_in_order`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from .layers import bn_layers, execution_order, iter_batches, model_device, set_layer_stats
from .moments import BatchReducer, Moments, image_moments
from .store import BNStats

__all__ = ["Decide", "estimate_in_order", "estimate_stats"]

# (layer name, layer, per-image means (n, C), per-image variances (n, C), positions per image) -> new (mean, var)
Decide = Callable[[str, nn.Module, torch.Tensor, torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


@torch.no_grad()
def estimate_stats(
    model: nn.Module,
    images: torch.Tensor | Iterable,
    layers: Iterable[str] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    reducer: BatchReducer | None = None,
) -> BNStats:
    """Estimate each BN layer's input mean and unbiased variance over ``images``, as a train-mode forward sees them.

    One batch reproduces exactly what ``momentum=None`` + one ``train()`` forward stores (the paper's protocol).
    More images than ``batch_size`` are split into micro-batches whose exact per-channel moments are merged, weighted
    by element count (PreciseBN), instead of averaging batch variances. Only BN layers are put in train mode (dropout
    stays off); the model's buffers and mode are restored afterwards.

    Args:
        model: any module with BN layers; it is left unchanged.
        images: float NCHW tensor in the model's input range, or an iterable of such batches (or (x, y) pairs).
        layers: BN layer names to estimate (default: all).
        batch_size: micro-batch size for a tensor input.
        device: where to run (default: the model's device).
        reducer: when several processes each hold a part of one batch (``bench --shard-cells``): every BN layer
            normalises, and is measured, with the statistics ``reducer`` combines over all parts (SyncBatchNorm-style),
            so deeper layers see what one process forwarding the whole batch would. Every process must forward the
            same number of batches.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> stats = estimate_stats(net, torch.rand(8, 3, 16, 16))
        >>> stats.count["1"]  # 8 images x 14 x 14 positions
        1568
    """
    all_layers = dict(bn_layers(model))
    names = list(all_layers) if layers is None else list(layers)
    device = model_device(model, device)
    moments = {n: Moments() for n in names}
    counts: dict[str, int] = {}
    if reducer is None:
        # BN's own train-mode kernel measures each batch; the hook only notes how many values per channel it sees.
        hooks = {n: _count_hook(counts, n) for n in names}
    else:  # combined batches: every BN layer (selected or not) must normalise with the combined statistics
        hooks = {n: _make_hook(moments.get(n), reducer) for n in all_layers}
    seen = 0
    with _measuring(model, all_layers, hooks, train=reducer is None):
        for batch in iter_batches(images, batch_size):
            if reducer is None:
                for n in names:
                    all_layers[n].reset_running_stats()
            model(batch.to(device, non_blocking=True))
            if reducer is None:
                _merge_batch(moments, all_layers, counts)
            seen += batch.shape[0]
        if reducer is not None:
            seen = reducer.images(seen)
    if seen == 0:
        raise ValueError("expected at least one image to estimate BN statistics from, got none")
    out = BNStats(mean={}, var={}, metadata={"images": str(seen)})
    for n in names:
        mo = moments[n]
        assert mo.mean is not None  # every hooked layer ran once per batch
        # On the CPU, like every BNStats (from_model, load): statistics of different origins mix without a device clash.
        out.mean[n] = mo.mean.float().cpu()
        out.var[n] = mo.var().float().cpu()
        out.count[n] = mo.count
    return out


@contextlib.contextmanager
def _measuring(model: nn.Module, layers: dict[str, nn.Module], hooks: dict, train: bool) -> Iterator[None]:
    """The model in eval mode with its BN ``layers`` in train mode (``train``) and cumulative averaging, ``hooks``
    attached by layer name; every BN buffer, mode and momentum is put back afterwards."""
    saved = {(m, k): b.clone() for m in layers.values() for k, b in m.named_buffers(recurse=False) if b is not None}
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers.values()}
    handles = [layers[n].register_forward_pre_hook(hook) for n, hook in hooks.items()]
    try:
        model.eval()
        for m in layers.values():
            m.train(train)
            m.momentum = None  # cumulative average: after a reset and one batch, exactly that batch's statistics
        yield
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode  # every module's own flag was saved: no recursive train() per module
        for m, momentum in momenta.items():
            m.momentum = momentum
        with torch.no_grad():
            for (m, k), b in saved.items():
                getattr(m, k).copy_(b)


def _count_hook(counts: dict[str, int], name: str):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        counts[name] = x.numel() // x.shape[1]

    return hook


def _merge_batch(moments: dict[str, Moments], layers: dict[str, nn.Module], counts: dict[str, int]) -> None:
    """Add what each layer's train-mode forward just stored (the batch's mean and unbiased variance) to its moments."""
    for n, mo in moments.items():
        layer, count = layers[n], counts[n]
        mean = layer.running_mean.detach().double()
        mo.merge(count, mean, layer.running_var.detach().double() * max(count - 1, 0))


def _make_hook(moments: Moments | None, reducer: BatchReducer | None = None):
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        if reducer is None:
            assert moments is not None
            moments.update(x)
            return
        count, mean, m2 = reducer.moments(x)
        # The layer is in eval mode: with the combined batch's mean and biased variance as its running statistics it
        # normalises exactly as a train-mode forward of the whole batch would.
        module.running_mean.copy_(mean)
        module.running_var.copy_(m2 / max(count, 1))
        if moments is not None:
            moments.merge(count, mean, m2)

    return hook


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has been measured."""


def estimate_in_order(
    model: nn.Module,
    images: torch.Tensor | Iterable,
    layers: list[str],
    decide: Decide,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Set each of ``layers`` (in execution order) to ``decide``'s statistics, measured in eval mode with every
    earlier layer already set: what inference will normalise with. One forward when the images form one batch (a
    pre-hook sets each layer just before it runs), else one pass per layer, each stopped at that layer.

    Returns the output of that one forward (the adapted model's output on the images, for free), or None when the
    images took several batches.

    ``decide(name, layer, per-image means, per-image variances, positions)`` returns the layer's new (mean, var);
    see :func:`bnadapt.bn.pooled_moments` for the statistics of the whole sample.

    Example:
        >>> from bnadapt.bn import pooled_moments
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> pooled = lambda name, layer, a, w, positions: pooled_moments(a, w, positions)[:2]
        >>> out = estimate_in_order(net, torch.rand(8, 3, 8, 8), ["1"], pooled)
        >>> tuple(out.shape), bool((net[1].running_var != 1).all())
        ((8, 4, 6, 6), True)
    """
    device = model_device(model, device)
    # An iterable of batches may be single-use: keep the (few) adaptation images.
    batches = list(iter_batches(images, batch_size)) if isinstance(images, torch.Tensor) else list(images)
    if not batches:
        raise ValueError("expected at least one image to estimate BN statistics from, got none")
    found = dict(bn_layers(model))
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            if len(batches) == 1:
                return _one_pass(model, batches[0].to(device), found, set(layers), decide)
            for name in execution_order(model, batches[0].to(device), layers):
                _layer_pass(model, batches, device, name, found[name], decide)
    finally:
        for m, mode in modes.items():
            m.training = mode
    return None


def _one_pass(model: nn.Module, x: torch.Tensor, found: dict, wanted: set[str], decide: Decide) -> torch.Tensor:
    def hook_for(name):
        def hook(layer, args):
            set_layer_stats(layer, *decide(name, layer, *image_moments(args[0])))

        return hook

    handles = [found[n].register_forward_pre_hook(hook_for(n)) for n in found if n in wanted]
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def _layer_pass(model: nn.Module, batches: list, device, name: str, layer: nn.Module, decide: Decide) -> None:
    parts_a, parts_w = [], []
    positions = 0

    def hook(_layer, args):
        nonlocal positions
        a, w, positions = image_moments(args[0])
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
    set_layer_stats(layer, *decide(name, layer, torch.cat(parts_a), torch.cat(parts_w), positions))
