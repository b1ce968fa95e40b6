"""BNStats: per-layer BatchNorm statistics as a value: snapshot a model's, restore them bit-exactly, save and load.

Only the running statistics are ever touched; affine weights and every other parameter stay as they are.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .._io import atomic_path
from .layers import bn_layers

__all__ = ["BNStats", "check_layer_values"]

_FORMAT = "bnadapt.bnstats/1"


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
