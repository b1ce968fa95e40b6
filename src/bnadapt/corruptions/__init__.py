"""The corruption engine: the 19 ImageNet-C / CIFAR-10-C corruptions x 5 severities, seeded and batched.

``corrupt(images, name, severity, profile, seed)`` takes uint8 NHWC images (numpy or torch) and returns the same
type, shape and dtype. Each image gets its own random stream derived from ``(seed, corruption, severity, index)``,
where ``index`` is the image's position in the batch plus ``start`` (or an explicit ``indices``), so an image's output
never depends on how a dataset is split into batches nor on the global RNG state. CUDA tensors are corrupted on
their device by torch ops for the 15 corruptions of ``torch_corruption_names()``, with the same random numbers;
``backend`` chooses the path explicitly.

This module is the public front. ``registry.py`` holds the registry (one entry per corruption with its numpy and,
where it has one, torch variant) and the helpers the families share; the family modules (``noise``, ``blur``,
``weather``, ``digital``, ``snow``) hold both variants of each of their corruptions and fill the registry when
imported here; ``torch_path.py`` holds what the torch variants share (dispatch, host draws, device transfers).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import numpy as np

# Importing the family modules fills the registry.
from . import blur, digital, noise, snow, weather  # noqa: F401
from .params import PROFILES, severity_param
from .registry import (  # noqa: F401  (re-exported: what families and extensions register with)
    REGISTRY,
    Corruption,
    CorruptionFn,
    TorchFn,
    chunks,
    randint,
    register,
    register_torch,
    to_uint8,
)

__all__ = ["corrupt", "corruption_names", "torch_corruption_names", "COMMON", "EXTRA", "GROUPS", "BACKENDS"]

# auto: the torch variants (torch_path.corrupt_tensor) for CUDA tensors, numpy otherwise; torch: the torch path on any
# device (numpy arrays too); numpy: always the numpy engine. Corruptions without a torch path always run on numpy.
BACKENDS = ("auto", "numpy", "torch")

NOISE = ("gaussian_noise", "shot_noise", "impulse_noise")
BLUR = ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur")
WEATHER = ("snow", "frost", "fog", "brightness")
DIGITAL = ("contrast", "elastic_transform", "pixelate", "jpeg_compression")
COMMON = NOISE + BLUR + WEATHER + DIGITAL
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
GROUPS = {
    "common": COMMON,
    "extra": EXTRA,
    "all": COMMON + EXTRA,
    "noise": NOISE,
    "blur": BLUR,
    "weather": WEATHER,
    "digital": DIGITAL,
}


def corruption_names(subset: str = "common") -> list[str]:
    """The corruption names of a subset, in the canonical benchmark order.

    Args:
        subset: common (the 15 benchmark corruptions), extra (the 4 held-out ones), all, noise, blur, weather or
            digital.

    Example:
        >>> corruption_names("noise")
        ['gaussian_noise', 'shot_noise', 'impulse_noise']
    """
    if subset not in GROUPS:
        raise ValueError(f"expected a corruption subset in {sorted(GROUPS)}, got {subset!r}")
    return list(GROUPS[subset])


def _validate(name: str, severity: int, profile: str) -> None:
    if name not in GROUPS["all"]:
        raise ValueError(f"expected a corruption name, one of {', '.join(GROUPS['all'])}; got {name!r}")
    if name not in REGISTRY:
        raise NotImplementedError(f"corruption {name!r} is not implemented yet in this version of bnadapt")
    if profile not in PROFILES:
        raise ValueError(f"expected profile to be one of {', '.join(PROFILES)}, got {profile!r}")
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ValueError(f"expected severity to be an integer in 1..5, got {severity!r}")


def _is_tensor(images) -> bool:
    return hasattr(images, "detach") and hasattr(images, "cpu")  # a torch tensor, without importing torch here


def _as_uint8_nhwc(images) -> tuple[np.ndarray, Callable[[np.ndarray], object], bool]:
    """Return (uint8 NHWC array, converter back to the caller's type, whether a batch axis was added)."""
    back: Callable[[np.ndarray], object] = lambda a: a  # noqa: E731
    if _is_tensor(images):
        import torch

        device = images.device
        back = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        images = images.detach().cpu().numpy()
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(
            f"expected uint8 images (values 0..255), got dtype {x.dtype}; convert with (x * 255).astype(uint8)"
        )
    single = x.ndim == 3
    if single:
        x = x[None]
    _check_shape(x.shape)
    return np.ascontiguousarray(x), back, single


def _as_uint8_nhwc_tensor(images) -> tuple[object, Callable[[object], object], bool]:
    """The torch path's _as_uint8_nhwc: a contiguous uint8 NHWC tensor on the images' device (numpy arrays are
    wrapped on the CPU and returned as numpy)."""
    import torch

    back: Callable[[object], object] = lambda t: t  # noqa: E731
    if not _is_tensor(images):
        images = np.asarray(images)
        if images.dtype == np.uint8:
            arr = np.ascontiguousarray(images)
            images = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # torch wants a writable buffer
            back = lambda t: t.numpy()  # noqa: E731
    if not _is_tensor(images) or images.dtype != torch.uint8:
        raise TypeError(
            f"expected uint8 images (values 0..255), got dtype {images.dtype}; convert with (x * 255).astype(uint8)"
        )
    x = images.detach()
    single = x.ndim == 3
    if single:
        x = x[None]
    _check_shape(tuple(x.shape))
    return x.contiguous(), back, single


def _check_shape(shape: tuple) -> None:
    if len(shape) != 4 or shape[-1] not in (1, 3):
        raise ValueError(
            f"expected images of shape (N, H, W, C) or (H, W, C) with C = 1 or 3 (channels last), got shape {shape}"
        )
    if shape[1] < 32 or shape[2] < 32:
        raise ValueError(f"expected images of at least 32x32 pixels, got {shape[1]}x{shape[2]}; upsample them first")


class ImageRngs(Sequence):
    """One random generator per image, made only when a corruption asks for it (deterministic ones never do).

    Indexing gives a ``numpy.random.Generator`` keyed by (seed, corruption, severity, image index), or a legacy
    ``RandomState(index)`` in "legacy" mode; slicing gives a list of them.
    """

    def __init__(self, base: int | None, key: int, severity: int, indices: Sequence[int]) -> None:
        self._base, self._key, self._severity, self._indices = base, key, severity, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self._indices)

    def _make(self, index: int):
        if self._base is None:
            # The original scripts call np.random.seed(i) before image i: a legacy RandomState per image replays that.
            return np.random.RandomState(index)
        return np.random.default_rng([self._base, self._key, self._severity, index])

    def __getitem__(self, item):
        if isinstance(item, slice):
            return [self._make(i) for i in self._indices[item]]
        return self._make(self._indices[item])


def image_rngs(seed: int | str | np.random.Generator | None, name: str, severity: int, indices: Sequence[int]):
    """One independent generator per image, keyed by (seed, corruption, severity, image index); see ImageRngs."""
    if isinstance(seed, str) and seed == "legacy":
        base = None
    elif isinstance(seed, np.random.Generator):
        base = int(seed.integers(0, 2**63 - 1))
    elif seed is None:
        base = 0
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
        base = int(seed)
    else:
        raise ValueError(f"expected seed to be a non-negative integer, a numpy Generator or 'legacy', got {seed!r}")
    return ImageRngs(base, zlib.crc32(name.encode()), severity, indices)


def _luma(y: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) -> uint8 grey (..., 1): ITU-R 601 luma, as PIL's convert("L"), truncated.

    Elementwise in float32, each product and sum rounded on its own, as the torch path does: a matrix product would go
    to BLAS, whose kernel (fused multiply-adds, another order; picked for the CPU) can move a grey pixel's luma, which
    sits exactly on a level, by one unit in the last place, and the truncation then by one level.
    """
    y = y.astype(np.float32)
    luma = y[..., :1] * np.float32(0.299) + y[..., 1:2] * np.float32(0.587) + y[..., 2:] * np.float32(0.114)
    return to_uint8(luma / np.float32(255.0))


def corrupt(
    images,
    name: str,
    severity: int,
    profile: str = "imagenet",
    seed: int | str | np.random.Generator | None = 0,
    start: int = 0,
    indices: Sequence[int] | None = None,
    backend: str = "auto",
):
    """Apply one corruption at one severity to a batch of uint8 images.

    The ``imagenet`` profile's constants are defined for 224x224 images and the ``cifar`` profile's for 32x32; other
    sizes (at least 32x32) work, with the corruption's strength in pixels unchanged (so relatively milder on larger
    images and stronger on smaller ones).

    Args:
        images: uint8 array or tensor, (N, H, W, C) or (H, W, C), C = 1 or 3.
        name: a corruption name (see :func:`corruption_names`).
        severity: 1..5.
        profile: ``imagenet`` or ``cifar`` constants.
        seed: integer seed, a numpy Generator (which draws one integer seed), or ``"legacy"``: image ``i`` gets
            ``np.random.RandomState(i)``, which replays the original scripts' ``np.random.seed(i)`` call sequence
            (bytes then match the original code run with the same library versions).
        start: index of the first image in its dataset, so that any split of a dataset gives the same bytes.
        indices: explicit dataset indices of the images (overrides ``start``).
        backend: ``auto`` (torch ops on the tensor's device for CUDA tensors, numpy otherwise), ``torch`` (torch ops
            on any device, numpy arrays included) or ``numpy``. Corruptions without a torch path (see
            :func:`torch_corruption_names`) run on numpy whatever the backend; both paths draw the same random numbers
            and agree up to float rounding before the truncation to uint8.

    Returns:
        Corrupted images, same type, shape and dtype as ``images``.

    Example:
        >>> x = np.full((2, 32, 32, 3), 128, np.uint8)
        >>> y = corrupt(x, "gaussian_noise", 3, profile="cifar", seed=0)
        >>> y.shape, y.dtype, bool((y != x).any())
        ((2, 32, 32, 3), dtype('uint8'), True)
        >>> bool((corrupt(x[1:], "gaussian_noise", 3, profile="cifar", seed=0, start=1) == y[1:]).all())
        True
    """
    _validate(name, severity, profile)
    if backend not in BACKENDS:
        raise ValueError(f"expected backend to be one of {', '.join(BACKENDS)}, got {backend!r}")
    on_torch = backend == "torch" or (backend == "auto" and _is_tensor(images) and images.device.type == "cuda")
    if on_torch and name in torch_corruption_names():
        x, back, single = _as_uint8_nhwc_tensor(images)
    else:
        on_torch = False
        x, back, single = _as_uint8_nhwc(images)
    n = x.shape[0]
    if indices is None:
        if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
            raise ValueError(f"expected start to be a non-negative integer image index, got {start!r}")
        indices = range(start, start + n)
    elif len(indices) != n:
        raise ValueError(f"expected one index per image ({n}), got {len(indices)} indices")
    elif n and min(indices) < 0:
        raise ValueError(f"expected non-negative image indices, got {min(indices)}")
    rngs = image_rngs(seed, name, severity, indices)
    if on_torch:
        from .torch_path import corrupt_tensor

        y = corrupt_tensor(x, name, severity, profile, rngs)
        return back(y[0] if single else y)
    entry = REGISTRY[name]
    grey = x.shape[-1] == 1
    if grey and entry.rgb_only:
        x = np.repeat(x, 3, axis=-1)
    y = entry.numpy(x, severity_param(profile, name, severity), rngs, profile)
    y = to_uint8(y)
    if grey and entry.rgb_only:
        y = _luma(y)
    if single:
        y = y[0]
    return back(np.ascontiguousarray(y))


def torch_corruption_names() -> list[str]:
    """The corruptions that have a torch variant (run on the tensor's device), in the canonical order; the others
    run on numpy whatever the backend.

    Example:
        >>> "glass_blur" in torch_corruption_names()
        False
    """
    return [n for n in GROUPS["all"] if n in REGISTRY and REGISTRY[n].torch is not None]
