"""Finding BatchNorm layers, choosing some, and the modes a layer can be put in (batch statistics, set statistics).

Everything here works on any ``nn.Module`` whose normalisation layers derive from PyTorch's ``_BatchNorm``
(BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d, ...).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "bn_layers",
    "check_batch_for_layers",
    "copy_model",
    "execution_order",
    "iter_batches",
    "model_device",
    "select_layers",
    "set_layer_stats",
    "use_batch_stats",
]


def bn_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Return ``(qualified_name, layer)`` for every BatchNorm layer that keeps running statistics, in forward order.

    Layers built with ``track_running_stats=False`` always normalise with batch statistics and have nothing to
    adapt, so they are left out.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> [name for name, _ in bn_layers(net)]
        ['1']
    """
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.running_mean is not None and m.running_var is not None
    ]


# A module class that changes how it is pickled or copied is copied by copy.deepcopy itself.
_COPY_HOOKS = ("__deepcopy__", "__copy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__")
_IMMUTABLE = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, as ``copy.deepcopy`` makes it (tied tensors stay tied), in a fraction of its time.

    ``copy.deepcopy`` spends most of its time copying each module's many empty hook dictionaries one by one; here those
    are made anew and everything else goes through ``copy.deepcopy`` with one shared memo.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> twin = copy_model(net)
        >>> twin[1].running_var is net[1].running_var, bool(twin[1].running_var.equal(net[1].running_var))
        (False, True)
    """
    return _copy_module(model, {})


def _copy_module(m: nn.Module, memo: dict) -> nn.Module:
    if id(m) in memo:
        return memo[id(m)]
    cls = type(m)
    if any(getattr(cls, hook, None) is not getattr(nn.Module, hook, None) for hook in _COPY_HOOKS):
        return copy.deepcopy(m, memo)
    new = cls.__new__(cls)
    memo[id(m)] = new
    state = {}
    for k, v in m.__dict__.items():
        if k == "_modules":
            state[k] = type(v)((name, None if c is None else _copy_module(c, memo)) for name, c in v.items())
        elif isinstance(v, _IMMUTABLE):
            state[k] = v
        elif isinstance(v, (dict, set)) and not v and type(v) in (dict, set, type(m._forward_hooks)):
            state[k] = type(v)()
        else:
            state[k] = copy.deepcopy(v, memo)
    new.__dict__.update(state)
    return new


def select_layers(
    names: Sequence[str],
    include: Sequence[str] | str | None = None,
    first: int | None = None,
    last: int | None = None,
) -> list[str]:
    """Pick BN layer names by glob pattern and/or depth.

    Args:
        names: all BN layer names in forward order (from :func:`bn_layers`).
        include: glob patterns (``fnmatch``) a name must match at least one of; None keeps all.
        first: keep only the first k layers (after pattern filtering).
        last: keep only the last k layers (after pattern filtering).

    Example:
        >>> select_layers(["bn1", "layer1.0.bn1", "layer2.0.bn1"], include="layer*", last=1)
        ['layer2.0.bn1']
    """
    if first is not None and last is not None:
        raise ValueError("expected at most one of first= and last=, got both; pick one depth selection")
    for value, flag in ((first, "first"), (last, "last")):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"expected {flag}= to be a positive integer number of BN layers, got {value!r}")
    chosen = list(names)
    if include is not None:
        patterns = [include] if isinstance(include, str) else list(include)
        chosen = [n for n in chosen if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not chosen:
            raise ValueError(
                f"expected the layer patterns {patterns} to match at least one BN layer, matched none; "
                f"BN layers are e.g. {list(names)[:5]}"
            )
    depth = first if first is not None else last
    if depth is not None and depth > len(chosen):
        raise ValueError(
            f"expected {'first' if first is not None else 'last'}= at most the {len(chosen)} BN layers selected, got "
            f"{depth}; lower it (or leave it out to adapt them all)"
        )
    if first is not None:
        chosen = chosen[:first]
    if last is not None:
        chosen = chosen[-last:]
    return chosen


def model_device(model: nn.Module, device: torch.device | str | None = None) -> torch.device | str:
    """``device`` if given, else the device of the model's first parameter (the CPU for a model without any).

    Example:
        >>> model_device(nn.BatchNorm2d(2))
        device(type='cpu')
    """
    if device is not None:
        return device
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def iter_batches(images: torch.Tensor | Iterable, batch_size: int) -> Iterator[torch.Tensor]:
    """Split a tensor into balanced batches of at most ``batch_size``, or pass an iterable's batches through.

    Example:
        >>> [len(b) for b in iter_batches(torch.zeros(10, 3), 4)]
        [3, 4, 3]
    """
    if isinstance(images, torch.Tensor):
        n = images.shape[0]
        k = max(1, -(-n // batch_size))
        # Balanced chunks: never a tail of 1 image, which a layer without spatial extent could not normalise.
        bounds = [round(i * n / k) for i in range(k + 1)]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            yield images[a:b]
    else:
        for batch in images:
            yield batch[0] if isinstance(batch, (tuple, list)) else batch


def check_batch_for_layers(model: nn.Module, n: int, layers: Iterable[str]) -> None:
    """Raise a clear error when a train-mode batch of ``n`` images would give some layer one value per channel.

    Example:
        >>> check_batch_for_layers(nn.Sequential(nn.BatchNorm2d(2)), 1, ["0"])  # 2-D layers see H x W values
    """
    if n >= 2:
        return
    wanted = set(layers)
    flat = [name for name, m in bn_layers(model) if name in wanted and isinstance(m, nn.BatchNorm1d)]
    if flat:
        raise ValueError(
            f"expected n >= 2 images: BN layer {flat[0]!r} would see a single value per channel from n={n}; "
            "pass more images (or a larger --n)"
        )


def set_layer_stats(layer: nn.Module, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Write ``mean``/``var`` into one BN layer's running statistics, in the layer's own dtype.

    Example:
        >>> bn = nn.BatchNorm2d(2)
        >>> set_layer_stats(bn, torch.ones(2), torch.full((2,), 4.0))
        >>> bn.running_var.tolist()
        [4.0, 4.0]
    """
    with torch.no_grad():
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))


def use_batch_stats(model: nn.Module, layers: Iterable[str], part: str = "both", method: str = "test-batch") -> None:
    """Make the BN layers ``layers`` of ``model`` normalise every batch with its own statistics, in place.

    ``part`` and ``method`` are checked and named in the error (a batch's own statistics replace both).

    Example:
        >>> net = nn.Sequential(nn.BatchNorm2d(2)).eval()
        >>> use_batch_stats(net, ["0"])
        >>> net[0].running_mean is None
        True
    """
    if part != "both":
        raise ValueError(f"expected part='both' for {method}: a batch's own statistics replace both mean and variance")
    found = dict(bn_layers(model))
    for name in layers:
        layer = found[name]
        # Without running buffers BatchNorm always normalises with the batch's statistics, even after .eval().
        layer.track_running_stats = False
        layer.running_mean = None
        layer.running_var = None
        layer.num_batches_tracked = None


def execution_order(model: nn.Module, x: torch.Tensor, layers: Iterable[str]) -> list[str]:
    """``layers`` in the order a forward of ``x[:1]`` runs them (registration order can differ, e.g. a shortcut's BN);
    layers the forward never reached come last, in registration order.

    Example:
        >>> net = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3)).eval()
        >>> execution_order(net, torch.rand(2, 3, 4, 4), ["1", "0"])
        ['0', '1']
    """
    found = dict(bn_layers(model))
    wanted = set(layers)
    order: list[str] = []
    handles = [layer.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n)) for n, layer in found.items()]
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(order))
    return [n for n in order if n in wanted] + [n for n in found if n in wanted and n not in order]
