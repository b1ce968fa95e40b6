"""Adaptation methods behind one interface and a name registry.

Each method takes a copy of the model (never the caller's, unless ``inplace=True``), the target images and the
options, and returns the adapted model in eval mode:

- ``source``: no change (the baseline).
- ``replace``: every selected BN layer's statistics become the mean and unbiased variance of its input over the n
  target images, as one train-mode forward measures them (Benz et al. 2021).
- ``prior``: ``N/(N+n)`` source + ``n/(N+n)`` target statistics (Schneider et al. 2020), N = ``prior``.
- ``test-batch``: every inference batch is normalised with its own statistics (Nado et al. 2020; tent's "norm").
- ``ema``: online: each inference batch first moves the running statistics by ``momentum`` towards its own, then is
  normalised with them, for deployments that see an endless stream.
- ``tent`` (in :mod:`bnadapt.tent`): online: ``test-batch`` plus one entropy-minimising optimiser step on the BN
  affine parameters per batch (Wang et al. 2021).
- ``bank`` (in :mod:`bnadapt.bank_model`): online: each inference batch, down to one image, gets the statistics of the
  best-matching condition of a bank built beforehand (``bnadapt bank build``), or the source statistics.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .bn import BNStats, bn_layers, check_batch_for_layers, estimate_stats, iter_batches, mix_stats, select_layers
from .data import to_float_nchw

log = logging.getLogger(__name__)

__all__ = [
    "adapt",
    "is_online",
    "method_names",
    "method_options",
    "method_uses_images",
    "parse_options",
    "AdaptConfig",
    "register_method",
    "sample_indices",
    "unregister_method",
]


@dataclass(frozen=True)
class AdaptConfig:
    """Options shared by every method (see :func:`adapt` for their meaning)."""

    n: int | None = None
    seed: int | None = 0
    prior: float = 16.0
    part: str = "both"
    layers: tuple[str, ...] | None = None
    first: int | None = None
    last: int | None = None
    momentum: float = 0.1
    batch_size: int = 256
    device: torch.device | str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)  # the method's own options, defaults filled in


# A method: (model copy, target images or None, config, selected BN layer names) -> adapted model.
Method = Callable[[nn.Module, "torch.Tensor | Iterable | None", AdaptConfig, list[str]], nn.Module]


@dataclass(frozen=True)
class _MethodEntry:
    fn: Method
    images: str  # "required", "optional" (used when given) or "unused"
    online: bool  # adapts while it runs inference: no fixed statistics to save
    options: Mapping[str, Any]  # name -> default; the default's type is the option's type
    check: Callable[[dict[str, Any]], None] | None = None  # refuses bad option values (ValueError)


_METHODS: dict[str, _MethodEntry] = {}


def register_method(
    name: str,
    images: str = "required",
    online: bool = False,
    options: Mapping[str, Any] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
) -> Callable[[Method], Method]:
    """Add an adaptation method to the registry under ``name`` (used by :func:`adapt`, the CLI and benchmarks).

    ``images`` says whether the method needs target images ("required"), uses them when given ("optional"), or
    never looks at them ("unused"); ``online`` methods keep adapting during inference, so they have no fixed
    statistics to save. ``options`` maps the method's own option names to defaults (their types are the options'
    types); the method reads them from ``cfg.options``. ``check``, if given, gets the method's options (defaults
    filled in) whenever they are parsed and raises ValueError for bad values, so a benchmark refuses them before it
    writes anything.

    Example:
        >>> @register_method("my-noop", images="unused", options={"strength": 1.0})
        ... def my_noop(model, images, cfg, layers):
        ...     return model
        >>> method_options("my-noop")
        {'strength': 1.0}
        >>> unregister_method("my-noop")
    """
    if images not in ("required", "optional", "unused"):
        raise ValueError(f"expected images to be required, optional or unused, got {images!r}")

    def deco(fn: Method) -> Method:
        _METHODS[name] = _MethodEntry(fn, images, online, dict(options or {}), check)
        return fn

    return deco


def unregister_method(name: str) -> None:
    """Remove a method added by :func:`register_method` (for tests and plugins)."""
    _METHODS.pop(name, None)


def _entry(name: str) -> _MethodEntry:
    if name not in _METHODS:
        raise ValueError(f"expected a method name, one of {', '.join(_METHODS)}; got {name!r}")
    return _METHODS[name]


def method_options(name: str) -> dict[str, Any]:
    """The options method ``name`` accepts, with their defaults.

    Example:
        >>> method_options("replace")
        {}
    """
    return dict(_entry(name).options)


def parse_options(methods: Iterable[str], items: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Check ``key=value`` options (or a mapping) against what ``methods`` accept; values get the defaults' types.

    An option applies to every given method that declares it; one no given method declares is refused.

    Example:
        >>> parse_options(["replace"], [])
        {}
    """
    accepted: dict[str, Any] = {}
    for m in methods:
        accepted.update(_entry(m).options)
    pairs = items.items() if isinstance(items, Mapping) else [_split_option(t) for t in items]
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise ValueError(f"expected an option of method(s) {', '.join(methods)} (accepted: {known}), got {key!r}")
        out[key] = _coerce(key, value, accepted[key])
    for m in methods:
        entry = _entry(m)
        if entry.check is not None:
            entry.check({**entry.options, **{k: v for k, v in out.items() if k in entry.options}})
    return out


def _split_option(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"expected a method option as key=value (e.g. lr=0.001), got {text!r}")
    return key.strip(), value.strip()


def _coerce(key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if default is None or isinstance(value, kind) and not (kind is float and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if kind in (int, float) and isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected option {key} to be a {kind.__name__} (like {default!r}), got {value!r}") from None


def method_names() -> list[str]:
    """Registered method names.

    Example:
        >>> method_names()[:3]
        ['source', 'replace', 'prior']
    """
    return list(_METHODS)


def is_online(name: str) -> bool:
    """Whether method ``name`` adapts during inference (``test-batch``, ``ema``, ``tent``), not once up front."""
    return _entry(name).online


def method_uses_images(name: str) -> bool:
    """Whether method ``name`` looks at target images (``source`` and ``test-batch`` do not).

    Example:
        >>> method_uses_images("replace"), method_uses_images("source")
        (True, False)
    """
    return _entry(name).images != "unused"


def sample_indices(total: int, n: int, seed: int | None) -> np.ndarray:
    """``n`` distinct indices out of ``total`` drawn by a seeded generator (sorted; independent of global RNG).

    Example:
        >>> sample_indices(10, 3, seed=0).tolist() == sample_indices(10, 3, seed=0).tolist()
        True
    """
    if n > total:
        raise ValueError(f"expected n <= the number of images given ({total}), got n={n}; pass more images or lower n")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"expected a non-negative integer seed for the draw of adaptation images, got {seed!r}")
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


def _target(images, cfg: AdaptConfig):
    """The n adaptation images: a seeded random subset of a tensor/array, or the first n of an iterable of batches."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = to_float_nchw(images)
        n = x.shape[0] if cfg.n is None else cfg.n
        if n < 1:
            raise ValueError(f"expected n >= 1 adaptation images, got n={n}")
        if n == x.shape[0]:
            return x
        return x[torch.from_numpy(sample_indices(x.shape[0], n, cfg.seed))]
    return _take(images, cfg.n)


def _take(batches: Iterable, n: int | None):
    seen = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = to_float_nchw(x)
        if n is not None and seen + x.shape[0] > n:
            x = x[: n - seen]
        if x.shape[0]:
            yield x
        seen += x.shape[0]
        if n is not None and seen >= n:
            return
    if n is not None and seen < n:
        raise ValueError(f"expected n <= the number of images given ({seen}), got n={n}; pass more images or lower n")


def adapt(
    model: nn.Module,
    images=None,
    method: str = "replace",
    n: int | None = None,
    seed: int | None = 0,
    prior: float = 16.0,
    part: str = "both",
    layers: Iterable[str] | str | None = None,
    first: int | None = None,
    last: int | None = None,
    momentum: float = 0.1,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    inplace: bool = False,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Return a copy of ``model`` whose BatchNorm statistics are adapted to ``images`` by ``method``.

    Args:
        model: any module with BatchNorm layers, taking the images as given.
        images: target images: uint8 (N, H, W, C) array/tensor, float (N, C, H, W) tensor, or an iterable of batches
            (or (x, y) pairs). Not needed by ``source``, ``test-batch``, ``ema`` and ``tent``.
        method: one of :func:`method_names`.
        n: number of adaptation images, drawn at random (seeded) from an array; the first n of an iterable; all if
            None.
        seed: seed of that draw.
        prior: N, the source statistics' weight in pseudo-samples, for ``prior``.
        part: adapt ``both`` statistics, only the ``mean`` or only the ``var``.
        layers: glob pattern(s) of BN layer names to adapt (others keep source statistics).
        first: adapt only the first k (selected) BN layers. last: only the last k.
        momentum: ``ema``'s step towards each new batch's statistics.
        batch_size: micro-batch for estimating statistics (results are exact for any value).
        device: where to estimate (default: the model's device).
        inplace: adapt ``model`` itself instead of a copy.
        options: the method's own options (:func:`method_options`), e.g. ``{"lr": 1e-3}`` for ``tent``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> adapted = adapt(net, torch.rand(40, 3, 8, 8), method="replace", n=32, seed=0)
        >>> bool(adapted[1].running_var.equal(net[1].running_var))  # the caller's model is untouched
        False
    """
    entry = _entry(method)
    if part not in ("both", "mean", "var"):
        raise ValueError(f"expected part to be one of both, mean, var; got {part!r}")
    if not prior >= 0:  # also refuses NaN
        raise ValueError(f"expected a prior strength N >= 0, got {prior}")
    if not 0.0 < momentum <= 1.0:
        raise ValueError(f"expected momentum in (0, 1], got {momentum}")
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    found = [name for name, _ in bn_layers(model)]
    if not found:
        raise ValueError("expected a model with BatchNorm layers (with running statistics), got none to adapt")
    patterns = (layers,) if isinstance(layers, str) else (tuple(layers) if layers is not None else None)
    opts = {**entry.options, **parse_options([method], options or {})}
    cfg = AdaptConfig(n, seed, float(prior), part, patterns, first, last, float(momentum), batch_size, device, opts)
    selected = select_layers(found, patterns, first, last)
    target = None
    if entry.images == "required" and images is None:
        raise ValueError(f"expected target images for method {method!r}, got none")
    if entry.images != "unused" and images is not None:
        target = _target(images, cfg)
        if isinstance(target, torch.Tensor):
            check_batch_for_layers(model, target.shape[0], selected)
    out = model if inplace else copy.deepcopy(model)
    out = entry.fn(out, target, cfg, selected)
    return out.eval()


@register_method("source", images="unused")
def _source(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    return model


def _estimate(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> tuple[BNStats, BNStats]:
    source = BNStats.from_model(model, layers)
    target = estimate_stats(model, images, layers, cfg.batch_size, cfg.device)
    return source, target


@register_method("replace")
def _replace(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    source, target = _estimate(model, images, cfg, layers)
    mix_stats(source, target, 1.0, cfg.part).apply_to(model)
    return model


PRIOR_ORDERS = ("independent", "sequential")


def _check_prior(options: dict) -> None:
    if options["order"] not in PRIOR_ORDERS:
        raise ValueError(
            f"expected prior's option order to be one of {', '.join(PRIOR_ORDERS)}, got {options['order']!r}"
        )


@register_method("prior", options={"order": "independent"}, check=_check_prior)
def _prior(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    if cfg.options["order"] == "sequential":
        from .shrink import prior_in_order

        return prior_in_order(model, images, cfg, layers)
    source, target = _estimate(model, images, cfg, layers)
    # Schneider et al. count n in images, not in the values per channel a layer sees.
    n = int(target.metadata["images"])
    mix_stats(source, target, n / (cfg.prior + n), cfg.part).apply_to(model)
    return model


def use_batch_stats(model: nn.Module, layers: Iterable[str], part: str = "both", method: str = "test-batch") -> None:
    """Make the BN layers ``layers`` of ``model`` normalise every batch with its own statistics, in place.

    Shared by ``test-batch`` and ``tent``; ``part`` and ``method`` are checked and named in the error.
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


@register_method("test-batch", images="unused", online=True)
def _test_batch(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    use_batch_stats(model, layers, cfg.part, "test-batch")
    return model


@register_method("ema", images="optional", online=True)
def _ema(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    found = dict(bn_layers(model))
    for name in layers:
        found[name].register_forward_pre_hook(_EMAUpdate(cfg.momentum, cfg.part))
    if images is not None:
        device = cfg.device or next(model.parameters()).device
        with torch.no_grad():
            model.eval()
            for x in iter_batches(images, cfg.batch_size):
                model(x.to(device))
    return model


class _EMAUpdate:
    """Forward pre-hook: move a BN layer's running statistics towards the incoming batch's before it normalises it."""

    def __init__(self, momentum: float, part: str) -> None:
        self.momentum = momentum
        self.part = part

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()
        dims = [0] + list(range(2, x.ndim))
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x, dim=dims, correction=1 if count > 1 else 0)
        m = self.momentum
        if self.part in ("both", "mean"):
            module.running_mean.mul_(1 - m).add_(mean.to(module.running_mean.dtype), alpha=m)
        if self.part in ("both", "var") and count > 1:
            module.running_var.mul_(1 - m).add_(var.to(module.running_var.dtype), alpha=m)
