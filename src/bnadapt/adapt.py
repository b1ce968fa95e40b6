"""The front of adaptation: :func:`adapt`, its :class:`AdaptConfig`, and the registry of methods (:class:`MethodSpec`).

This module knows no statistics: each method lives in :mod:`bnadapt.methods` (one module per family) and registers
itself here with :func:`register_method`. A method takes a copy of the model (never the caller's, unless
``inplace=True``), the target images and an :class:`AdaptConfig`, and returns the adapted model. Its own knobs are
*options* (``method_options``), declared with defaults whose types they take; ``prior=`` and ``momentum=`` of
:func:`adapt` (and the CLI's ``--prior``/``--momentum``) are aliases of the options of that name.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from .bn import BatchReducer, bn_layers, check_batch_for_layers, copy_model, select_layers
from .data import to_float_inputs

log = logging.getLogger(__name__)

__all__ = [
    "OPTION_ALIASES",
    "AdaptConfig",
    "MethodSpec",
    "adapt",
    "bn_free_methods",
    "is_online",
    "method_names",
    "method_options",
    "method_spec",
    "method_uses_images",
    "option_default",
    "parse_options",
    "register_method",
    "resolve_aliases",
    "sample_indices",
    "unregister_method",
]

# Keywords of adapt() (and CLI flags) that set the method option of the same name, for the methods declaring it.
OPTION_ALIASES = ("prior", "momentum")


@dataclass(frozen=True, kw_only=True)
class AdaptConfig:
    """What a method is asked to do (see :func:`adapt` for the meaning of each field).

    ``options`` holds the method's own options with the defaults filled in; ``reducer`` is set when several
    processes each hold a part of the sample (``bench --shard-cells``, :class:`MethodSpec` ``shardable``).

    Example:
        >>> AdaptConfig(n=32, options={"order": "independent"}).part
        'both'
    """

    n: int | None = None
    seed: int | None = 0
    part: str = "both"
    layers: tuple[str, ...] | None = None
    first: int | None = None
    last: int | None = None
    batch_size: int = 256
    device: torch.device | str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    reducer: BatchReducer | None = None


# A method: (model copy, target images or None, config, selected BN layer names) -> adapted model.
Method = Callable[[nn.Module, "torch.Tensor | Iterable | None", AdaptConfig, list[str]], nn.Module]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function and what the protocol needs to know about it.

    ``images``: whether it needs target images ("required"), uses them when given ("optional") or never looks at
    them ("unused"). ``online``: it keeps adapting during inference (no fixed statistics to save; its model has
    ``reset()``). ``shardable``: its statistics are one :func:`bnadapt.bn.estimate_stats` over the sample, so the
    sample can be split over processes (a callable decides from the options). ``options``: name -> default.
    ``check``: refuses bad option values (ValueError). ``needs_bn``: it works on BatchNorm statistics, so a model
    without BN layers is refused (``source`` and ``tent`` run on LayerNorm/GroupNorm models too). ``random``: it
    draws random numbers of its own (``dua``'s augmentations), seeded by ``seed``, so a benchmark runs it once per
    seed even without images.

    Example:
        >>> method_spec("replace").shardable, method_spec("tent").online
        (True, True)
    """

    name: str
    fn: Method
    images: str = "required"
    online: bool = False
    shardable: bool | Callable[[Mapping[str, Any]], bool] = False
    options: Mapping[str, Any] = field(default_factory=dict)
    check: Callable[[dict[str, Any]], None] | None = None
    needs_bn: bool = True
    random: bool = False

    def can_shard(self, options: Mapping[str, Any]) -> bool:
        """Whether the sample may be split over processes with these options (defaults filled in)."""
        return self.shardable(options) if callable(self.shardable) else bool(self.shardable)


_METHODS: dict[str, MethodSpec] = {}


def _registry() -> dict[str, MethodSpec]:
    # The built-in methods register themselves when bnadapt.methods is imported, and that package imports this
    # module; so it is loaded by name on the first use of the registry (not by `import bnadapt`, which stays free of
    # torch), and `from bnadapt.adapt import adapt` alone still finds every built-in method, first and in order.
    if f"{__package__}.methods" not in sys.modules:
        importlib.import_module(f"{__package__}.methods")
    return _METHODS


def register_method(
    name: str,
    images: str = "required",
    online: bool = False,
    options: Mapping[str, Any] | None = None,
    check: Callable[[dict[str, Any]], None] | None = None,
    shardable: bool | Callable[[Mapping[str, Any]], bool] = False,
    needs_bn: bool = True,
    random: bool = False,
) -> Callable[[Method], Method]:
    """Add an adaptation method to the registry under ``name`` (used by :func:`adapt`, the CLI and benchmarks).

    The arguments become the method's :class:`MethodSpec`. The method reads its options from ``cfg.options``;
    ``check``, if given, gets the options (defaults filled in) whenever they are parsed, so a benchmark refuses bad
    values before it writes anything.

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
        spec = MethodSpec(name, fn, images, online, shardable, dict(options or {}), check, needs_bn, random)
        _registry()[name] = spec
        return fn

    return deco


def unregister_method(name: str) -> None:
    """Remove a method added by :func:`register_method` (for tests and plugins)."""
    _registry().pop(name, None)


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` of method ``name``, or a ValueError naming the known methods.

    Example:
        >>> method_spec("source").images
        'unused'
    """
    methods = _registry()
    if name not in methods:
        raise ValueError(f"expected a method name, one of {', '.join(methods)}; got {name!r}")
    return methods[name]


def bn_free_methods() -> list[str]:
    """The methods that also run on a model without BatchNorm layers (``needs_bn=False``).

    Example:
        >>> bn_free_methods()
        ['source', 'tent']
    """
    return [name for name, spec in _registry().items() if not spec.needs_bn]


def method_options(name: str) -> dict[str, Any]:
    """The options method ``name`` accepts, with their defaults.

    Example:
        >>> method_options("replace")
        {}
    """
    return dict(method_spec(name).options)


def parse_options(methods: Iterable[str], items: Iterable[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Check ``key=value`` options (or a mapping) against what ``methods`` accept; values get the defaults' types.

    An option applies to every given method that declares it; one no given method declares is refused.

    Example:
        >>> parse_options(["replace"], [])
        {}
    """
    methods = list(methods)
    accepted: dict[str, Any] = {}
    for m in methods:
        accepted.update(method_spec(m).options)
    pairs = items.items() if isinstance(items, Mapping) else [_split_option(t) for t in items]
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key not in accepted:
            known = ", ".join(sorted(accepted)) or "none"
            raise ValueError(f"expected an option of method(s) {', '.join(methods)} (accepted: {known}), got {key!r}")
        out[key] = _coerce(key, value, accepted[key])
    for m in methods:
        spec = method_spec(m)
        if spec.check is not None:
            spec.check({**spec.options, **{k: v for k, v in out.items() if k in spec.options}})
    return out


def resolve_aliases(method: str, options: Mapping[str, Any], **aliases: Any) -> dict[str, Any]:
    """``options`` with the alias keywords (:data:`OPTION_ALIASES`, None = not given) that ``method`` declares
    filled in. A given alias value is checked by every method declaring it, whichever method runs, and must agree
    with the same option given explicitly.

    Example:
        >>> resolve_aliases("prior", {}, prior=8)
        {'prior': 8.0}
        >>> resolve_aliases("replace", {}, prior=8)
        {}
    """
    out = dict(options)
    for key, value in aliases.items():
        if key not in OPTION_ALIASES:
            raise TypeError(f"expected an option alias from {', '.join(OPTION_ALIASES)}, got {key!r}")
        if value is None:
            continue
        owners = [s for s in _registry().values() if key in s.options]
        for spec in owners:
            value = _coerce(key, value, spec.options[key])
            if spec.check is not None:
                spec.check({**spec.options, key: value})
        if key not in method_spec(method).options:
            continue
        if key in out and _coerce(key, out[key], method_spec(method).options[key]) != value:
            raise ValueError(f"expected one value for {key}, got {value!r} and option {key}={out[key]!r}; pass one")
        out[key] = value
    return out


def option_default(key: str) -> Any:
    """The default of option ``key``, as the first registered method declaring it has it.

    Example:
        >>> option_default("prior")
        16.0
    """
    for spec in _registry().values():
        if key in spec.options:
            return spec.options[key]
    raise ValueError(f"expected an option some method declares, got {key!r}")


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
    return list(_registry())


def is_online(name: str) -> bool:
    """Whether method ``name`` adapts during inference (``test-batch``, ``ema``, ``tent``, ``bank``), not once.

    Example:
        >>> is_online("ema"), is_online("replace")
        (True, False)
    """
    return method_spec(name).online


def method_uses_images(name: str) -> bool:
    """Whether method ``name`` looks at target images (``source`` and ``test-batch`` do not).

    Example:
        >>> method_uses_images("replace"), method_uses_images("source")
        (True, False)
    """
    return method_spec(name).images != "unused"


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


def _target(images, cfg: AdaptConfig, dtype: torch.dtype):
    """The n adaptation images in the model's floating dtype: a seeded random subset of a tensor/array, or the first
    n of an iterable of batches."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = to_float_inputs(images).to(dtype)
        n = x.shape[0] if cfg.n is None else cfg.n
        if n < 1:
            raise ValueError(f"expected n >= 1 adaptation images, got n={n}")
        if n == x.shape[0]:
            return x
        return x[torch.from_numpy(sample_indices(x.shape[0], n, cfg.seed))]
    return _take(images, cfg.n, dtype)


def _take(batches: Iterable, n: int | None, dtype: torch.dtype):
    seen = 0
    for batch in batches:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        x = to_float_inputs(x).to(dtype)
        if n is not None and seen + x.shape[0] > n:
            x = x[: n - seen]
        if x.shape[0]:
            yield x
        seen += x.shape[0]
        if n is not None and seen >= n:
            return
    if n is not None and seen < n:
        raise ValueError(f"expected n <= the number of images given ({seen}), got n={n}; pass more images or lower n")


def _holds_no_images(images) -> bool:
    return isinstance(images, (torch.Tensor, np.ndarray)) and images.shape[0] == 0


def _floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in (float16/bfloat16 models take images in their own dtype); float32 by default."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _bn_layer_names(model: nn.Module, spec: MethodSpec) -> list[str]:
    """The model's BN layer names; a method that needs BN refuses a model without any."""
    found = [name for name, _ in bn_layers(model)]
    if not found and spec.needs_bn:
        raise ValueError(
            f"expected a model with BatchNorm layers (with running statistics) for method {spec.name!r}, got none "
            f"to adapt; on a model without BN use {' or '.join(bn_free_methods())}"
        )
    return found


def adapt(
    model: nn.Module,
    images=None,
    method: str = "replace",
    n: int | None = None,
    seed: int | None = 0,
    prior: float | None = None,
    part: str = "both",
    layers: Iterable[str] | str | None = None,
    first: int | None = None,
    last: int | None = None,
    momentum: float | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    inplace: bool = False,
    options: Mapping[str, Any] | None = None,
    reducer: BatchReducer | None = None,
) -> nn.Module:
    """Return a copy of ``model`` whose BatchNorm statistics are adapted to ``images`` by ``method``.

    Args:
        model: any module with BatchNorm layers (``source`` and ``tent`` also without: a LayerNorm ViT), taking the
            images as given.
        images: target images: uint8 (N, H, W, C) array/tensor, float (N, C, H, W) tensor in [0, 1], or an iterable
            of batches (or (x, y) pairs). For BatchNorm1d/3d models: float (N, C), (N, C, L) or (N, C, D, H, W)
            inputs, taken as given. Not needed by ``source``, ``test-batch`` and the online methods (``n=0`` or no
            images: no warm-up).
        method: one of :func:`method_names`.
        n: number of adaptation images, drawn at random (seeded) from an array; the first n of an iterable; all if
            None.
        seed: seed of that draw.
        prior: ``prior``'s option ``prior``: N, the source statistics' weight in pseudo-samples (default 16).
        part: adapt ``both`` statistics, only the ``mean`` or only the ``var``.
        layers: glob pattern(s) of BN layer names to adapt (others keep source statistics).
        first: adapt only the first k (selected) BN layers. last: only the last k.
        momentum: the option ``momentum`` of ``ema`` (its step towards each new batch's statistics, default 0.1),
            ``rbn`` (0.05) and ``dua`` (its first step before decay, 0.1).
        batch_size: micro-batch for estimating statistics (results are exact for any value).
        device: where to estimate (default: the model's device).
        inplace: adapt ``model`` itself instead of a copy.
        options: the method's own options (:func:`method_options`), e.g. ``{"lr": 1e-3}`` for ``tent``.
        reducer: combines the statistics of processes that each hold a part of the sample (shardable methods only).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> adapted = adapt(net, torch.rand(40, 3, 8, 8), method="replace", n=32, seed=0)
        >>> bool(adapted[1].running_var.equal(net[1].running_var))  # the caller's model is untouched
        False
    """
    spec = method_spec(method)
    if part not in ("both", "mean", "var"):
        raise ValueError(f"expected part to be one of both, mean, var; got {part!r}")
    if batch_size < 1:
        raise ValueError(f"expected batch_size >= 1, got {batch_size}")
    given = resolve_aliases(method, parse_options([method], options or {}), prior=prior, momentum=momentum)
    found = _bn_layer_names(model, spec)
    opts = {**spec.options, **given}  # each value already coerced; checked here as one set
    if spec.check is not None:
        spec.check(dict(opts))
    if reducer is not None and not spec.can_shard(opts):
        raise ValueError(f"expected a method whose sample can be split over processes, got {method!r} with {opts}")
    patterns = (layers,) if isinstance(layers, str) else (tuple(layers) if layers is not None else None)
    cfg = AdaptConfig(n=n, seed=seed, part=part, layers=patterns, first=first, last=last, batch_size=batch_size)
    cfg = replace(cfg, device=device, options=opts, reducer=reducer)
    selected = select_layers(found, patterns, first, last)
    target = None
    if spec.images == "optional" and (n == 0 or _holds_no_images(images)):
        images = None  # no warm-up: the online methods start from the model's own statistics
    if spec.images == "required" and images is None:
        raise ValueError(f"expected target images for method {method!r}, got none")
    if spec.images != "unused" and images is not None:
        target = _target(images, cfg, _floating_dtype(model))
        if isinstance(target, torch.Tensor):
            check_batch_for_layers(model, target.shape[0], selected)
    out = model if inplace else copy_model(model)
    out = spec.fn(out, target, cfg, selected)
    return out.eval()
