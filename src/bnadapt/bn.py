"""The functional core: find BatchNorm layers, snapshot and restore their statistics, estimate new ones, mix them.

Everything here works on any ``nn.Module`` whose normalisation layers derive from PyTorch's ``_BatchNorm``
(BatchNorm1d/2d/3d, SyncBatchNorm, timm's BatchNormAct2d, ...). Only the running statistics are ever touched; affine
weights and every other parameter stay as they are.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._io import atomic_path

__all__ = [
    "BNStats",
    "bn_layers",
    "select_layers",
    "combined_batches",
    "estimate_stats",
    "mix_stats",
]

_FORMAT = "bnadapt.bnstats/1"


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
    if first is not None:
        chosen = chosen[:first]
    if last is not None:
        chosen = chosen[-last:]
    return chosen


@dataclass
class BNStats:
    """Per-layer BatchNorm running statistics: ``{layer name: (mean, var)}``, float32 tensors on the CPU.

    ``count`` records how many values per channel each estimate was computed from (0 when unknown, e.g. the source
    statistics of a pretrained model); ``metadata`` is free-form string data saved with the file.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> stats = BNStats.from_model(net)
        >>> stats.names, tuple(stats.mean["1"].shape)
        (['1'], (4,))
    """

    mean: dict[str, torch.Tensor]
    var: dict[str, torch.Tensor]
    count: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.mean)

    @classmethod
    def from_model(cls, model: nn.Module, layers: Iterable[str] | None = None) -> BNStats:
        """Snapshot (a copy of) the running statistics of ``model``'s BN layers (all of them, or ``layers``)."""
        found = dict(bn_layers(model))
        names = list(found) if layers is None else list(layers)
        missing = [n for n in names if n not in found]
        if missing:
            raise ValueError(
                f"expected BN layer names of this model, got unknown {missing[:3]}; known: {list(found)[:5]}"
            )
        return cls(
            mean={n: found[n].running_mean.detach().to("cpu", copy=True) for n in names},
            var={n: found[n].running_var.detach().to("cpu", copy=True) for n in names},
        )

    def apply_to(self, model: nn.Module) -> nn.Module:
        """Write these statistics into ``model``'s BN layers in place and return the model.

        Every stored layer must exist in the model with the same number of channels; layers not stored are left
        alone. Values are copied in the layer's own dtype and device, so a snapshot restores bit-exactly.
        """
        found = self.check_fits(model)
        with torch.no_grad():
            for n in self.names:
                found[n].running_mean.copy_(self.mean[n])
                found[n].running_var.copy_(self.var[n])
        return model

    def check_fits(self, model: nn.Module) -> dict[str, _BatchNorm]:
        """Raise a ValueError unless every stored layer exists in ``model`` with the same number of channels.

        Returns ``model``'s BN layers by name.

        Example:
            >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
            >>> list(BNStats.from_model(net).check_fits(net))
            ['1']
        """
        found = dict(bn_layers(model))
        missing = [n for n in self.names if n not in found]
        if missing:
            raise ValueError(
                f"expected the model to have BN layers {missing[:3]} stored in these statistics, it has not; "
                "were the statistics made for another architecture?"
            )
        for n in self.names:
            layer = found[n]
            if layer.running_mean.shape != self.mean[n].shape or layer.running_var.shape != self.var[n].shape:
                raise ValueError(
                    f"expected {tuple(layer.running_mean.shape)} channels for BN layer {n!r}, "
                    f"got statistics of shape {tuple(self.mean[n].shape)}; were they made for another architecture?"
                )
        return found

    def save(self, path: str | os.PathLike[str]) -> None:
        """Save as safetensors (``<layer>.mean`` / ``<layer>.var`` tensors + JSON metadata), written atomically."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for n in self.names:
            tensors[f"{n}.mean"] = self.mean[n].contiguous()
            tensors[f"{n}.var"] = self.var[n].contiguous()
        meta = {
            "format": _FORMAT,
            "layers": json.dumps(self.names),
            "count": json.dumps(self.count),
            "user": json.dumps(self.metadata),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BNStats:
        """Load statistics written by :meth:`save`, checking the layer list and shapes in the file."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"expected a BN statistics .safetensors file, got no file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                keys = set(f.keys())
                if meta.get("format") != _FORMAT:
                    raise ValueError(
                        f"expected a bnadapt statistics file ({_FORMAT}), got format {meta.get('format')!r}"
                    )
                names = json.loads(meta["layers"])
                if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                    raise ValueError(
                        f"expected the file's 'layers' metadata to be a JSON list of layer names, got "
                        f"{meta['layers']!r:.80}"
                    )
                mean, var = {}, {}
                for n in names:
                    if f"{n}.mean" not in keys or f"{n}.var" not in keys:
                        raise ValueError(f"expected tensors for layer {n!r} listed in the file's metadata, found none")
                    mean[n] = f.get_tensor(f"{n}.mean").float()
                    var[n] = f.get_tensor(f"{n}.var").float()
                    check_layer_values(n, mean[n], var[n])
                count = json.loads(meta.get("count", "{}"))
                user = json.loads(meta.get("user", "{}"))
                if (
                    not isinstance(count, dict)
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in count.values())
                    or not isinstance(user, dict)
                ):
                    raise ValueError(
                        "expected the file's 'count' metadata to map layers to non-negative integers and 'user' to "
                        f"be a JSON object, got {meta.get('count')!r:.60} and {meta.get('user')!r:.60}"
                    )
        except (SafetensorError, json.JSONDecodeError, KeyError, OSError) as e:
            raise ValueError(
                f"expected a readable bnadapt statistics file at {path}, got an unreadable one ({e})"
            ) from e
        return cls(mean=mean, var=var, count=count, metadata={str(k): str(v) for k, v in user.items()})


def check_layer_values(name: str, mean: torch.Tensor, var: torch.Tensor) -> None:
    """Raise a ValueError unless ``mean`` and ``var`` are matching 1-D tensors of finite values, ``var >= 0``.

    For statistics read from a file.

    Example:
        >>> check_layer_values("bn", torch.zeros(2), torch.ones(2))
    """
    if mean.ndim != 1 or mean.shape != var.shape:
        raise ValueError(
            f"expected matching 1-D mean and var for layer {name!r}, got shapes {tuple(mean.shape)} and "
            f"{tuple(var.shape)}"
        )
    # Applied as-is, a NaN or a negative variance would silently turn every prediction into NaN.
    if not (torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()):
        raise ValueError(
            f"expected finite means and non-negative finite variances for layer {name!r}, got NaN, inf or negative "
            "values; the file is damaged or was not written by bnadapt"
        )


class _Moments:
    """Exact per-channel count, mean and sum of squared deviations, merged across batches in float64 (Chan et al.)."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        dims = [0] + list(range(2, x.ndim))
        n_b = x.numel() // x.shape[1]
        # Per-batch moments in float32 (two-pass inside var_mean) are accurate; the cross-batch merge is where
        # rounding accumulates over millions of values, so it runs in float64.
        var_b, mean_b = torch.var_mean(x.float(), dim=dims, correction=0)
        self.merge(n_b, mean_b.double(), var_b.double() * n_b)

    def merge(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Add a batch of ``n_b`` values per channel with float64 mean ``mean_b`` and squared deviations ``m2_b``."""
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        total = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / total)
        self.m2 = self.m2 + m2_b + delta.pow(2) * (self.count * n_b / total)
        self.count = total


class BatchReducer(Protocol):
    """Combines what several processes measure on their parts of one batch (see :func:`combined_batches`)."""

    def moments(self, x: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Per-channel (count, float64 mean, float64 sum of squared deviations) of the union of every part."""
        ...

    def images(self, count: int) -> int:
        """The total over every process of ``count`` images."""
        ...


_REDUCER: ContextVar[BatchReducer | None] = ContextVar("bnadapt_batch_reducer", default=None)


@contextlib.contextmanager
def combined_batches(reducer: BatchReducer) -> Iterator[None]:
    """Within this block, :func:`estimate_stats` treats each process's batch as its part of one batch: every BN layer
    normalises, and is measured, with the statistics ``reducer`` combines over all parts (SyncBatchNorm-style), so
    deeper layers see what one process forwarding the whole batch would see. Every process must forward the same
    number of batches. Used by :mod:`bnadapt.distributed` for ``bench --shard-cells``.

    Example:
        >>> class Alone:  # one process: the union is the batch itself
        ...     def moments(self, x):
        ...         var, mean = torch.var_mean(x.double(), dim=[0, 2, 3], correction=0)
        ...         n = x.numel() // x.shape[1]
        ...         return n, mean, var * n
        ...     def images(self, count):
        ...         return count
        >>> net, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.rand(8, 3, 16, 16)
        >>> with combined_batches(Alone()):
        ...     s = estimate_stats(net, x)
        >>> torch.allclose(s.var["1"], estimate_stats(net, x).var["1"])
        True
    """
    token = _REDUCER.set(reducer)
    try:
        yield
    finally:
        _REDUCER.reset(token)


def iter_batches(images: torch.Tensor | Iterable, batch_size: int) -> Iterator[torch.Tensor]:
    """Split a tensor into balanced batches of at most ``batch_size``, or pass an iterable's batches through."""
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
    """Raise a clear error when a train-mode batch of ``n`` images would give some layer one value per channel."""
    if n >= 2:
        return
    wanted = set(layers)
    flat = [name for name, m in bn_layers(model) if name in wanted and isinstance(m, nn.BatchNorm1d)]
    if flat:
        raise ValueError(
            f"expected n >= 2 images: BN layer {flat[0]!r} would see a single value per channel from n={n}; "
            "pass more images (or a larger --n)"
        )


@torch.no_grad()
def estimate_stats(
    model: nn.Module,
    images: torch.Tensor | Iterable,
    layers: Iterable[str] | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
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

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        >>> stats = estimate_stats(net, torch.rand(8, 3, 16, 16))
        >>> stats.count["1"]  # 8 images x 14 x 14 positions
        1568
    """
    all_layers = dict(bn_layers(model))
    names = list(all_layers) if layers is None else list(layers)
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    moments = {n: _Moments() for n in names}
    reducer = _REDUCER.get()
    # The train-mode forward moves running stats and num_batches_tracked; every BN buffer is put back afterwards.
    saved = {(m, k): b.clone() for m in all_layers.values() for k, b in m.named_buffers(recurse=False) if b is not None}
    modes = {m: m.training for m in model.modules()}
    handles = []
    # Combined batches: every BN layer (selected or not) must normalise with the combined statistics.
    for n in names if reducer is None else all_layers:
        handles.append(all_layers[n].register_forward_pre_hook(_make_hook(moments.get(n), reducer)))
    try:
        model.eval()
        for m in all_layers.values():
            m.train(reducer is None)
        seen = 0
        for batch in iter_batches(images, batch_size):
            model(batch.to(device, non_blocking=True))
            seen += batch.shape[0]
        if reducer is not None:
            seen = reducer.images(seen)
        if seen == 0:
            raise ValueError("expected at least one image to estimate BN statistics from, got none")
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
        with torch.no_grad():
            for (m, k), b in saved.items():
                getattr(m, k).copy_(b)
    out = BNStats(mean={}, var={}, metadata={"images": str(seen)})
    for n in names:
        mo = moments[n]
        assert mo.mean is not None and mo.m2 is not None  # every hooked layer ran once per batch
        # On the CPU, like every BNStats (from_model, load): statistics of different origins mix without a device clash.
        out.mean[n] = mo.mean.float().cpu()
        # Unbiased, as BatchNorm stores running_var.
        out.var[n] = (mo.m2 / max(mo.count - 1, 1)).float().cpu()
        out.count[n] = mo.count
    return out


def _make_hook(moments: _Moments | None, reducer: BatchReducer | None = None):
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
