"""The corruption registry and the helpers every corruption family shares.

A family module (noise, blur, weather, digital, snow) registers each corruption's numpy variant with
:func:`register` and, where it has one, its torch variant with :func:`register_torch`; both land in one
:class:`Corruption` entry of :data:`REGISTRY`. This module imports no family, so the families can import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

# A corruption: fn(images uint8 NHWC, severity parameter, one Generator per image, profile) -> uint8, or float in
# [0, 1] that the engine clips and truncates to uint8 as the original code does.
CorruptionFn = Callable[[np.ndarray, object, list, str], np.ndarray]
# Its torch variant: fn(uint8 NHWC tensor, severity parameter, list of generators, profile) -> float tensor in [0, 1]
# (clipped and truncated by the caller) or uint8.
TorchFn = Callable[[object, object, list, str], object]


@dataclass(frozen=True)
class Corruption:
    """One corruption's implementations: ``numpy`` always, ``torch`` (on the tensor's device) or None."""

    numpy: CorruptionFn
    rgb_only: bool  # works on colour (HSV, colour textures): grey images are expanded to RGB and back
    torch: TorchFn | None = None

    @property
    def fn(self) -> CorruptionFn:
        """The numpy variant (the entry's name for it before the torch variants joined the registry)."""
        return self.numpy


REGISTRY: dict[str, Corruption] = {}


def register(name: str, rgb_only: bool = False) -> Callable[[CorruptionFn], CorruptionFn]:
    """Decorator registering ``fn`` as the numpy variant of corruption ``name``.

    Example:
        >>> @register("my_identity")
        ... def my_identity(x, param, rngs, profile):
        ...     return x
        >>> REGISTRY.pop("my_identity").torch is None
        True
    """

    def deco(fn: CorruptionFn) -> CorruptionFn:
        REGISTRY[name] = Corruption(fn, rgb_only)
        return fn

    return deco


def register_torch(name: str) -> Callable[[TorchFn], TorchFn]:
    """Decorator adding ``fn`` as the torch variant of ``name``, whose numpy variant must be registered already.

    Example:
        >>> @register("my_identity")
        ... def my_identity(x, param, rngs, profile):
        ...     return x
        >>> @register_torch("my_identity")
        ... def my_identity_torch(x, param, rngs, profile):
        ...     return x
        >>> REGISTRY.pop("my_identity").torch is my_identity_torch
        True
    """

    def deco(fn: TorchFn) -> TorchFn:
        if name not in REGISTRY:
            raise KeyError(f"register the numpy variant of {name!r} before its torch variant")
        REGISTRY[name] = dataclasses.replace(REGISTRY[name], torch=fn)
        return fn

    return deco


def to_uint8(y: np.ndarray) -> np.ndarray:
    """Clip float images to [0, 1] and truncate to uint8 as ``np.uint8(np.clip(y, 0, 1) * 255)``; uint8 passes."""
    if y.dtype == np.uint8:
        return y
    return (np.clip(y, 0, 1) * 255).astype(np.uint8)


def randint(rng, low: int, high: int, size=None):
    """Integers in [low, high) from a ``numpy.random.Generator`` or a legacy ``RandomState`` (used to replay the
    original code's call sequence in tests)."""
    if isinstance(rng, np.random.RandomState):
        return rng.randint(low, high, size=size)
    return rng.integers(low, high, size=size)


def chunks(n: int, pixels_per_image: int, budget: int) -> Iterator[slice]:
    """Slices of the batch axis of whole images holding about ``budget`` pixels each (at least one image), so float
    temporaries stay cache-sized and memory stays bounded for large batches."""
    step = max(1, budget // max(1, pixels_per_image))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))
