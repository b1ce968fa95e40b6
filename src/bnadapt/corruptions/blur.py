"""Blur corruptions: defocus, glass, motion, zoom and Gaussian blur (numpy variants, torch variants for all but
glass blur)."""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from scipy import sparse
from scipy.ndimage import gaussian_filter, zoom

from ._motion import motion_blur_batch, motion_blur_tensor
from .registry import chunks, randint, register, register_torch, to_uint8
from .torch_path import dev, unit

# Batches are processed in chunks of about this many pixels to bound the float intermediates.
_CHUNK_PIXELS = 2**20


@register("gaussian_blur")
def gaussian_blur(x: np.ndarray, sigma: float, rngs: list, profile: str) -> np.ndarray:
    # skimage.filters.gaussian(channel_axis=-1): per channel, mode "nearest", truncate 4.
    out = np.empty(x.shape, np.uint8)
    for i in range(len(x)):  # image by image: float64 temporaries stay in cache
        out[i] = to_uint8(gaussian_filter(x[i] / 255.0, sigma=(sigma, sigma, 0), mode="nearest", truncate=4.0))
    return out


def _correlate_nearest(x: torch.Tensor, weights: np.ndarray, dim: int) -> torch.Tensor:
    """scipy correlate1d(mode="nearest") of a symmetric kernel along ``dim``, in scipy's order of operations (centre
    tap, then ``(left + right) * w`` pairs from the outermost in), so float64 results match it bit for bit."""
    r, n = len(weights) // 2, x.shape[dim]
    p = x.index_select(dim, torch.arange(-r, n + r, device=x.device).clamp(0, n - 1))
    out = p.narrow(dim, r, n) * float(weights[r])
    for j in range(r, 0, -1):
        out = out + (p.narrow(dim, r - j, n) + p.narrow(dim, r + j, n)) * float(weights[r - j])
    return out


@register_torch("gaussian_blur")
def gaussian_blur_torch(x: torch.Tensor, sigma: float, rngs: list, profile: str) -> torch.Tensor:
    # skimage gaussian = scipy gaussian_filter(mode="nearest", truncate=4): rows (axis 0), then columns.
    radius = int(4.0 * float(sigma) + 0.5)
    k = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * k**2)
    weights = weights / weights.sum()
    return _correlate_nearest(_correlate_nearest(unit(x), weights, 1), weights, 2)


# ---------------------------------------------------------------------------------------------------- defocus blur


@lru_cache(maxsize=32)
def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The original's anti-aliased disk, trimmed to its non-zero support (the zero border changes no output)."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), (3, 3)
    else:
        grid, ksize = np.arange(-radius, radius + 1), (5, 5)
    xx, yy = np.meshgrid(grid, grid)
    aliased = np.array(xx**2 + yy**2 <= radius**2, dtype=np.float32)
    aliased /= np.sum(aliased)
    k = cv2.GaussianBlur(aliased, ksize=ksize, sigmaX=alias_blur)
    c = len(k) // 2
    rows, cols = np.nonzero(k)
    r = int(max(np.abs(rows - c).max(), np.abs(cols - c).max()))
    k = np.ascontiguousarray(k[c - r : c + r + 1, c - r : c + r + 1])
    k.flags.writeable = False
    return k


@register("defocus_blur")
def defocus_blur(x: np.ndarray, param: tuple, rngs: list, profile: str) -> np.ndarray:
    kernel = disk_kernel(*param)
    out = np.empty(x.shape, np.uint8)
    # filter2D filters every channel with the same kernel and reflect-101 borders, as the original's channel loop.
    for i in range(len(x)):
        out[i] = to_uint8(cv2.filter2D(x[i] / 255.0, -1, kernel)).reshape(x.shape[1:])
    return out


@register_torch("defocus_blur")
def defocus_blur_torch(x: torch.Tensor, param: tuple, rngs: list, profile: str) -> torch.Tensor:
    kernel = dev(disk_kernel(*param).astype(np.float64), x)
    r = kernel.shape[0] // 2
    n, h, w, c = x.shape
    im = unit(x).permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    # cv2.filter2D: correlation with reflect-101 borders, which is torch's "reflect" padding.
    y = F.conv2d(F.pad(im, (r, r, r, r), mode="reflect"), kernel[None, None])
    return y.reshape(n, c, h, w).permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------------ glass blur


def _skimage_gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    """skimage.filters.gaussian(x / 255, sigma, channel_axis=-1) of a uint8 batch."""
    return gaussian_filter(x / 255.0, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)


def glass_shuffle_map(shape: tuple[int, int, int], d: int, iters: int, rngs: list) -> np.ndarray:
    """Flat source pixel index of every pixel of an (N, H, W) batch after the original's local pixel "swaps".

    The original visits h = H-d .. d+1 and w = W-d .. d+1 (both descending), draws ``dx, dy`` in [-d, d) and copies
    x[h+dy, w+dx] into x[h, w] (its tuple "swap" of numpy views is a one-way copy). A source visited earlier in the
    same pass (a lower row, or the same row to the right) already holds its new value, so a pixel's value follows a
    chain of earlier copies; all chains are resolved at once by pointer jumping. The draws are made in the original's
    order, in one call per image, which gives the same numbers as its one call per pixel.
    """
    n, h, w = shape
    nh, nw = h - 2 * d, w - 2 * d
    src_map = np.arange(n * h * w, dtype=np.int64)
    if nh <= 0 or nw <= 0 or iters <= 0:
        return src_map
    # Visited positions in visiting order.
    hh = (h - d - np.arange(nh))[:, None]
    ww = (w - d - np.arange(nw))[None, :]
    base = (np.arange(n) * (h * w))[:, None, None]
    region = (base + hh * w + ww).reshape(-1)
    draws = np.stack([randint(rng, -d, d, (iters, nh, nw, 2)) for rng in rngs], axis=1)  # (iters, n, nh, nw, 2)
    for t in range(iters):
        sh, sw = hh + draws[t, ..., 1], ww + draws[t, ..., 0]
        terminal = (base + sh * w + sw).reshape(-1)  # the pixel whose pre-pass value each position receives
        if d > 1:  # with d = 1 the offsets are in {-1, 0}: a source is never visited before its target
            inside = (sh >= d + 1) & (sh <= h - d) & (sw >= d + 1) & (sw <= w - d)
            dep = (inside & ((sh > hh) | ((sh == hh) & (sw > ww)))).reshape(-1)
            nxt = ((np.arange(n)[:, None, None] * nh + (h - d - sh)) * nw + (w - d - sw)).reshape(-1)
            pending = np.flatnonzero(dep)
            while pending.size:
                q = nxt[pending]
                done = ~dep[q]
                terminal[pending[done]] = terminal[q[done]]
                nxt[pending[~done]] = nxt[q[~done]]
                dep[pending[done]] = False
                pending = pending[~done]
        new_map = src_map.copy()
        new_map[region] = src_map[terminal]
        src_map = new_map
    return src_map


@register("glass_blur")
def glass_blur(x: np.ndarray, param: tuple, rngs: list, profile: str) -> np.ndarray:
    sigma, d, iters = param
    n, h, w, c = x.shape
    out = np.empty(x.shape, np.uint8)
    for sl in chunks(n, h * w, _CHUNK_PIXELS):
        m = sl.stop - sl.start
        blurred = (_skimage_gaussian(x[sl], sigma) * 255).astype(np.uint8)
        src = glass_shuffle_map((m, h, w), int(d), int(iters), rngs[sl])
        shuffled = blurred.reshape(m * h * w, c)[src].reshape(m, h, w, c)
        out[sl] = to_uint8(_skimage_gaussian(shuffled, sigma))
    return out


# ----------------------------------------------------------------------------------------------------- motion blur


@register("motion_blur")
def motion_blur(x: np.ndarray, param: tuple, rngs: list, profile: str) -> np.ndarray:
    radius, sigma = param
    angles = np.array([rng.uniform(-45, 45) for rng in rngs], dtype=np.float64)
    return motion_blur_batch(x, radius, sigma, angles)


@register_torch("motion_blur")
def motion_blur_torch(x: torch.Tensor, param: tuple, rngs: list, profile: str) -> torch.Tensor:
    radius, sigma = param
    angles = np.array([rng.uniform(-45, 45) for rng in rngs], dtype=np.float64)
    return motion_blur_tensor(x, radius, sigma, angles)


# ------------------------------------------------------------------------------------------------------- zoom blur


@lru_cache(maxsize=32)
def zoom_matrix(size: int, z: float) -> np.ndarray:
    """(size, size) float64 matrix of the original's clipped_zoom along one axis.

    clipped_zoom crops the centre ``ceil(size / z)`` pixels, zooms them with scipy.ndimage.zoom(order=1) and keeps
    the centre ``size`` pixels. Zooming an identity matrix along one axis gives exactly scipy's interpolation weights.
    """
    ch = int(np.ceil(size / z))
    top = (size - ch) // 2
    weights = zoom(np.eye(ch), (z, 1), order=1)
    trim = (weights.shape[0] - size) // 2
    m = np.zeros((size, size))
    m[:, top : top + ch] = weights[trim : trim + size]
    m.flags.writeable = False
    return m


@lru_cache(maxsize=256)
def _zoom_taps(size: int, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two taps (index, weight) of each row of zoom_matrix: linear interpolation reads two neighbours."""
    m = zoom_matrix(size, z)
    i0 = np.argmax(m != 0, axis=1)
    i1 = np.minimum(i0 + 1, size - 1)
    w0 = m[np.arange(size), i0]
    w1 = np.where(i1 > i0, m[np.arange(size), i1], 0.0)
    if not np.allclose(m.sum(1), w0 + w1, rtol=0, atol=1e-12):
        raise AssertionError("a clipped zoom row has more than two adjacent taps")
    return i0, i1, w0, w1


def clipped_zoom_batch(x: np.ndarray, z: float) -> np.ndarray:
    """clipped_zoom of each image of a float batch (N, H, W) or (N, H, W, C); non-square images zoom per axis.

    Elementwise two-tap interpolation, so an image's result does not depend on the rest of the batch.
    """
    r0, r1, a0, a1 = _zoom_taps(x.shape[1], float(z))
    c0, c1, b0, b1 = _zoom_taps(x.shape[2], float(z))
    chan = (1,) * (x.ndim - 3)  # the weights broadcast over a channel axis if there is one
    b0, b1 = b0.reshape(-1, *chan).astype(x.dtype), b1.reshape(-1, *chan).astype(x.dtype)
    a0, a1 = a0.reshape(-1, 1, *chan).astype(x.dtype), a1.reshape(-1, 1, *chan).astype(x.dtype)
    y = x[:, :, c0] * b0 + x[:, :, c1] * b1
    return y[:, r0] * a0 + y[:, r1] * a1


def clipped_zoom_tensor(x: torch.Tensor, z: float) -> torch.Tensor:
    """clipped_zoom_batch on a device (same two taps per row and column, same operation order)."""
    r0, r1, a0, a1 = (dev(a, x) for a in _zoom_taps(x.shape[1], float(z)))
    c0, c1, b0, b1 = (dev(a, x) for a in _zoom_taps(x.shape[2], float(z)))
    chan = (1,) * (x.ndim - 3)
    b0, b1 = b0.reshape(-1, *chan).to(x.dtype), b1.reshape(-1, *chan).to(x.dtype)
    a0, a1 = a0.reshape(-1, 1, *chan).to(x.dtype), a1.reshape(-1, 1, *chan).to(x.dtype)
    y = x[:, :, c0] * b0 + x[:, :, c1] * b1
    return y[:, r0] * a0 + y[:, r1] * a1


@lru_cache(maxsize=5)  # ~10 MB each at 224x224; rebuilt in ~0.1 s
def zoom_blur_operator(h: int, w: int, zooms: tuple[float, ...]) -> sparse.csr_matrix:
    """The whole zoom blur of one (h, w) channel as a sparse (h w, h w) matrix: (I + sum_z R_z (x) C_z) / (k + 1).

    Each clipped zoom is separable with two taps per output row and column, so the sum has at most 4 k + 1 non-zeros
    per output pixel, fewer where the zooms overlap.
    """
    op = sparse.identity(h * w, format="csr")
    for z in zooms:
        op = op + sparse.kron(sparse.csr_matrix(zoom_matrix(h, z)), sparse.csr_matrix(zoom_matrix(w, z)), "csr")
    op = (op / (len(zooms) + 1)).astype(np.float32).tocsr()
    op.sum_duplicates()
    return op


@register("zoom_blur")
def zoom_blur(x: np.ndarray, zooms: np.ndarray, rngs: list, profile: str) -> np.ndarray:
    n, h, w, c = x.shape
    op = zoom_blur_operator(h, w, tuple(float(z) for z in zooms))
    out = np.empty(x.shape, np.uint8)
    for sl in chunks(n, h * w, _CHUNK_PIXELS):
        m = sl.stop - sl.start
        # Pixels as rows, (image, channel) as columns: one sparse product for the chunk.
        cols = (x[sl].transpose(1, 2, 0, 3).reshape(h * w, m * c) / 255.0).astype(np.float32)
        out[sl] = to_uint8((op @ cols).reshape(h, w, m, c).transpose(2, 0, 1, 3))
    return out


@lru_cache(maxsize=5)
def _zoom_blur_taps(h: int, w: int, zooms: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The rows of zoom_blur_operator as padded (h w, max taps) source indices and float32 weights (0 in the
    padding), in the sparse matrix's stored order."""
    op = zoom_blur_operator(h, w, zooms)
    counts = np.diff(op.indptr)
    row = np.repeat(np.arange(h * w), counts)
    pos = np.arange(op.nnz) - op.indptr[row]
    idx = np.zeros((h * w, counts.max()), np.int64)
    wts = np.zeros((h * w, counts.max()), np.float32)
    idx[row, pos], wts[row, pos] = op.indices, op.data
    return idx, wts


@register_torch("zoom_blur")
def zoom_blur_torch(x: torch.Tensor, zooms: np.ndarray, rngs: list, profile: str) -> torch.Tensor:
    # The numpy engine's float32 sparse product (pixels as rows, (image, channel) as columns), tap by tap in the
    # matrix's stored order: scipy's csr product accumulates the same float32 terms in the same order.
    n, h, w, c = x.shape
    idx, wts = (dev(a, x) for a in _zoom_blur_taps(h, w, tuple(float(z) for z in zooms)))
    cols = unit(x).to(torch.float32).permute(1, 2, 0, 3).reshape(h * w, n * c)
    acc = torch.zeros_like(cols)
    for t in range(idx.shape[1]):
        acc += wts[:, t : t + 1] * cols[idx[:, t]]
    return acc.reshape(h, w, n, c).permute(2, 0, 1, 3)
