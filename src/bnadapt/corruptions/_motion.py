"""ImageMagick 6's MotionBlurImage, batched (numpy and torch), for motion_blur and snow.

The original code blurs through Wand (ImageMagick 6, Q16, non-HDRI). For ``radius > 0`` MagickCore uses
``width = 2 * ceil(radius) + 1`` taps (GetOptimalKernelWidth1D), a one-sided Gaussian ``exp(-i^2 / (2 sigma^2))``,
``i = 0 .. width - 1``, normalised to sum 1, and tap ``i`` reads the pixel at ``(x + ceil(i cos(a) - 0.5),
y + ceil(i sin(a) - 0.5))``, clamped to the image (the default "edge" virtual pixels). The weighted sum of the
Q16 pixels is rounded to Q16 and then truncated to 8 bits as the image is written back to an 8-bit PNG.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .torch_path import F64, dev

# MagickEpsilon in MagickCore (the floor on sigma).
_EPSILON = 1.0e-12


def kernel_width(radius: float) -> int:
    """GetOptimalKernelWidth1D for a positive radius (all the original's radii are positive)."""
    if radius <= _EPSILON:
        raise ValueError(f"expected a positive motion blur radius, got {radius}")
    return int(2.0 * math.ceil(radius) + 1.0)


def motion_weights(radius: float, sigma: float) -> np.ndarray:
    """The normalised one-sided Gaussian taps."""
    width = kernel_width(radius)
    s = max(abs(sigma), _EPSILON)
    i = np.arange(width, dtype=np.float64)
    k = np.exp(-(i * i) / (2.0 * s * s)) / (math.sqrt(2.0 * math.pi) * s)
    return k / k.sum()


def motion_offsets(width: int, angles: np.ndarray) -> np.ndarray:
    """(N, width, 2) integer (dx, dy) tap offsets for N angles, with MagickCore's floating point expression."""
    rad = np.pi * np.asarray(angles, np.float64)[:, None] / 180.0
    px = width * np.sin(rad)
    py = width * np.cos(rad)
    norm = np.hypot(px, py)
    i = np.arange(width, dtype=np.float64)
    dx = np.ceil((i * py) / norm - 0.5)
    dy = np.ceil((i * px) / norm - 0.5)
    return np.stack([dx, dy], axis=-1).astype(np.int64)


def _to_uint8(acc: np.ndarray) -> np.ndarray:
    """Weighted sum of 8-bit values -> rounded to Q16 (ClampToQuantum) -> truncated to 8 bits by the PNG writer.

    The truncation (not rounding) on the way out was found by matching the reference fixtures bit for bit.
    """
    q = np.floor(np.clip(acc.astype(np.float64) * 257.0, 0.0, 65535.0) + 0.5).astype(np.int32)
    return (q // 257).astype(np.uint8)


def motion_blur_batch(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """Motion-blur uint8 images (N, H, W, C), image n along ``angles[n]`` degrees; returns uint8.

    With the images sorted by angle, a tap's rounded offset is the same over runs of consecutive images, so each tap
    costs one shifted slice addition per run rather than per image.
    """
    n, h, w, c = x.shape
    k = motion_weights(radius, sigma).astype(np.float32)
    width = len(k)
    out = np.empty(x.shape, np.uint8)
    if n == 0:
        return out
    order = np.argsort(angles, kind="stable")
    offsets = motion_offsets(width, np.asarray(angles)[order])
    # Bound the edge-padded uint8 copy and the float32 accumulator of a chunk to a few tens of MB.
    r_max = int(np.abs(offsets).max())
    chunk = max(1, 2**22 // ((h + 2 * r_max) * (w + 2 * r_max) * c))
    for s in range(0, n, chunk):
        idx = order[s : s + chunk]
        off = offsets[s : s + chunk]
        r = int(np.abs(off).max())
        # Edge padding reproduces ImageMagick's clamped ("edge") virtual pixels for any offset up to r.
        p = np.pad(x[idx], ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
        acc = np.zeros((len(idx), h, w, c), np.float32)
        for t in range(width):
            dxy = off[:, t]
            cuts = np.flatnonzero((dxy[1:] != dxy[:-1]).any(axis=1)) + 1
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(idx)], strict=True):
                dx, dy = int(dxy[a, 0]), int(dxy[a, 1])
                acc[a:b] += k[t] * p[a:b, r + dy : r + dy + h, r + dx : r + dx + w]
        out[idx] = _to_uint8(acc)
    return out


def motion_blur_tensor(x: torch.Tensor, radius: float, sigma: float, angles: np.ndarray) -> torch.Tensor:
    """motion_blur_batch on a device: the same taps, clamped offsets, float32 sum and Q16 rounding."""
    n, h, w, _ = x.shape
    k = motion_weights(radius, sigma).astype(np.float32)
    off = dev(motion_offsets(len(k), np.asarray(angles)), x)  # (N, width, 2) as (dx, dy)
    xf = x.to(torch.float32)
    rows0 = torch.arange(h, device=x.device)
    cols0 = torch.arange(w, device=x.device)
    img = torch.arange(n, device=x.device)[:, None, None]
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(len(k)):
        rows = (rows0[None, :] + off[:, t, 1:2]).clamp(0, h - 1)
        cols = (cols0[None, :] + off[:, t, 0:1]).clamp(0, w - 1)
        acc += float(k[t]) * xf[img, rows[:, :, None], cols[:, None, :]]
    q = torch.floor((acc.to(F64) * 257.0).clamp(0.0, 65535.0) + 0.5).to(torch.int32)
    return torch.div(q, 257, rounding_mode="floor").to(torch.uint8)
