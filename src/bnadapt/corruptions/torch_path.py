"""The corruption engine's torch path: corruptions computed with torch ops on the images' own device (e.g. CUDA).

Each torch variant sits in its family module (noise, blur, weather, digital, snow) next to its numpy variant, in the
same registry entry (``registry.Corruption.torch``); this module holds what they share: the dispatch
(:func:`corrupt_tensor`), the host-side random draws (:func:`per_image`, :func:`drawn`) and the device transfers and
exact divisions (:func:`dev`, :func:`div`, :func:`unit`).

``corrupt(images, ..., backend="auto")`` sends CUDA tensors here (``backend="torch"`` forces it for CPU tensors and
numpy arrays too). Random numbers are still drawn with the numpy engine's per-image generators (``image_rngs``), in
the numpy code's order, then moved to the device, so the same seed gives the same images on both paths up to float
rounding before the final ``uint8(clip(y, 0, 1) * 255)`` truncation (measured agreement: tests/test_corruptions_torch.py
and docs/fragments/gpucorrupt-methods.md).

Torch path (15): gaussian_noise, shot_noise, impulse_noise, speckle_noise, brightness, saturate, contrast,
gaussian_blur, defocus_blur, motion_blur, zoom_blur, pixelate, fog, frost, snow.

- shot_noise: the Poisson draw needs the image (its rate), so the uint8 images are copied to the host for the draw and
  only the counts come back; most of its cost stays on the CPU.
- fog: the plasma fractal (sequential diamond-square over the random stream) is computed on the host as the numpy
  engine does; only the compositing runs on the device. frost: texture crops are cut on the host (uint8), blended on
  the device. snow: the noise layer is drawn on the host; zoom, threshold, motion blur and compositing on the device.
- Host-side draws of large images run one image per thread (up to 8; numpy's generators release the GIL), which
  changes no number: each image owns its generator.

Numpy fallback (4; copied to the host and back): glass_blur (a sequential chain of pixel copies), elastic_transform
(OpenCV's fixed-point warpAffine tables and scipy's map_coordinates folding), spatter (Canny, distance transform and
histogram equalisation from OpenCV) and jpeg_compression (a libjpeg encode/decode).

Arithmetic is float64 where the numpy engine's is (so elementwise corruptions agree to the last bit in most pixels);
pixelate replays Pillow's fixed-point BOX resampling with integer-valued float64 products, which is exact.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .params import severity_param
from .registry import REGISTRY, chunks

# Images are processed in chunks of about this many pixels: float64 temporaries of ~50 MB each.
_CHUNK_PIXELS = 1 << 21
F64 = torch.float64


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """``uint8(clip(y, 0, 1) * 255)`` (truncation, as the numpy engine's to_uint8); uint8 passes.

    Example:
        >>> to_uint8(torch.tensor([0.5, 2.0])).tolist()
        [127, 255]
    """
    if y.dtype == torch.uint8:
        return y
    return (y.clamp(0, 1) * 255).to(torch.uint8)


def dev(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """The array as a tensor on ``like``'s device (read-only arrays, e.g. cached constants, are copied first).

    Example:
        >>> dev(np.arange(3), torch.zeros(1)).tolist()
        [0, 1, 2]
    """
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # cached read-only constants: torch.from_numpy wants a writable buffer
        a = a.copy()
    return torch.from_numpy(a).to(like.device)


def div(t: torch.Tensor, d: float) -> torch.Tensor:
    """``t / d`` correctly rounded on every device: CUDA divides by a Python number as a multiplication by its
    reciprocal (off by one unit in the last place, which the final truncation to uint8 turns into one level), but by
    a tensor on the device with a true division.

    Example:
        >>> div(torch.tensor([3.0], dtype=torch.float64), 255.0).item() == 3.0 / 255.0
        True
    """
    return t / torch.tensor(d, dtype=t.dtype, device=t.device)


def unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float64 / 255, the numpy engine's ``x / 255.0``.

    Example:
        >>> unit(torch.tensor([0, 255], dtype=torch.uint8)).tolist()
        [0.0, 1.0]
    """
    return div(x.to(F64), 255.0)


def corrupt_tensor(x: torch.Tensor, name: str, severity: int, profile: str, rngs) -> torch.Tensor:
    """Run corruption ``name`` on a contiguous uint8 (N, H, W, C) tensor on its device; ``rngs`` from image_rngs.

    Inputs are validated by ``bnadapt.corruptions.corrupt`` (the public entry point), which calls this.

    Example:
        >>> from bnadapt.corruptions import image_rngs
        >>> x = torch.full((1, 32, 32, 3), 128, dtype=torch.uint8)
        >>> corrupt_tensor(x, "brightness", 3, "cifar", image_rngs(0, "brightness", 3, [0])).dtype
        torch.uint8
    """
    entry = REGISTRY[name]
    fn = entry.torch
    grey = x.shape[-1] == 1 and entry.rgb_only
    if grey:
        x = x.expand(*x.shape[:3], 3).contiguous()
    n, h, w, _ = x.shape
    param = severity_param(profile, name, severity)
    out = torch.empty_like(x)
    for sl in chunks(n, h * w, _CHUNK_PIXELS):
        out[sl] = to_uint8(fn(x[sl], param, rngs[sl], profile))
    if grey:
        # ITU-R 601 luma in float32, as the numpy engine; elementwise rather than a matrix product, which CUDA may
        # run in TF32 (torch.set_float32_matmul_precision).
        y = out.to(torch.float32)
        out = to_uint8(div(y[..., :1] * 0.299 + y[..., 1:2] * 0.587 + y[..., 2:] * 0.114, 255.0))
    return out


# Host threads for the per-image random draws: numpy's generators release the GIL while they fill an array, and each
# image owns its generator, so the draws run in parallel with the same numbers in any schedule.
_DRAW_THREADS = min(8, os.cpu_count() or 1)
_POOL: ThreadPoolExecutor | None = None


def per_image(draw: Callable, rngs: Sequence, *arrays: Sequence, pixels: int = 0) -> list:
    """``[draw(rng_i, arrays[0][i], ...) for each image i]``, in a thread pool when the images are large enough
    (``pixels`` per image) for the draws to outweigh the threads' overhead.

    Example:
        >>> per_image(lambda rng, k: int(rng.integers(k)), [np.random.default_rng(0)] * 2, [1, 1])
        [0, 0]
    """
    global _POOL
    if len(rngs) < 2 or pixels < 1 << 14 or _DRAW_THREADS < 2:
        return [draw(rng, *a) for rng, *a in zip(rngs, *arrays, strict=True)]
    if _POOL is None:
        _POOL = ThreadPoolExecutor(_DRAW_THREADS, thread_name_prefix="bnadapt-draw")
    return list(_POOL.map(draw, rngs, *arrays))


def drawn(draw: Callable, x: torch.Tensor, rngs: Sequence, *arrays: Sequence) -> torch.Tensor:
    """The per-image draws (see :func:`per_image`) stacked on the host and moved to x's device.

    Example:
        >>> drawn(lambda rng: rng.integers(5, size=2), torch.zeros(1, 2), [np.random.default_rng(0)]).shape
        torch.Size([1, 2])
    """
    return dev(np.stack(per_image(draw, rngs, *arrays, pixels=x[0].numel())), x)
