"""Digital corruptions: brightness, contrast, saturation, elastic transform, pixelation, JPEG (numpy variants, and
torch variants for all but elastic transform and JPEG)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from functools import lru_cache

import cv2
import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from .registry import chunks, register, register_torch, to_uint8
from .torch_path import F64, dev, div, unit

# Float work is done on slices of the batch of about this many pixels, so temporaries stay in cache and memory stays
# bounded for large batches of large images.
_CHUNK_PIXELS = 1 << 15


@register("contrast")
def contrast(x: np.ndarray, c: float, rngs: list, profile: str) -> np.ndarray:
    out = np.empty(x.shape, np.uint8)
    for i in range(len(x)):  # one image at a time keeps the float64 temporaries in cache
        im = x[i] / 255.0
        means = im.mean(axis=(0, 1))
        out[i] = to_uint8((im - means) * c + means)
    return out


@register_torch("contrast")
def contrast_torch(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    im = unit(x)
    means = im.mean(dim=(1, 2), keepdim=True)
    return (im - means) * c + means


# ---------------------------------------------------------------------------------------------------------------
# HSV: brightness and saturate
# ---------------------------------------------------------------------------------------------------------------

# For each output channel (rows R, G, B) and hue sextant (columns 0..5), which of the stacked (v, p, q, t) planes it
# takes, as scikit-image's hsv2rgb; sextant 6 (h * 6 rounding up to 6) wraps to 0 as its ``% 6`` does.
_SEXTANT_PICK = np.array([(0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2), (0, 3, 1)]).T


def _hsv_roundtrip(x: np.ndarray, adjust: Callable[[np.ndarray, np.ndarray], None]) -> np.ndarray:
    """uint8 RGB -> HSV -> ``adjust(s, v)`` in place -> RGB -> uint8, truncated.

    The arithmetic is scikit-image's ``rgb2hsv`` / ``hsv2rgb`` (the original code's round trip) operation for
    operation in float64, so the bytes are identical to it; it is only reorganised to run on planar chunks (one
    division for the hue instead of three masked ones, a flat gather instead of ``np.choose`` over stacked copies).
    """
    flat = x.reshape(-1, 3)
    out = np.empty(flat.shape, np.uint8)
    for a in range(0, len(flat), _CHUNK_PIXELS):
        part = flat[a : a + _CHUNK_PIXELS]
        n = len(part)
        rgb = np.empty((3, n))
        np.divide(part.T, 255.0, out=rgb)
        r, g, b = rgb
        v = rgb.max(axis=0)
        delta = v - rgb.min(axis=0)
        grey = delta == 0
        # skimage writes the red-max hue, then overwrites with green-max, then blue-max: blue wins ties, then green.
        bmax, gmax = b == v, g == v
        num = np.where(bmax, r - g, np.where(gmax, b - r, g - b))
        s = delta / np.where(grey, 1.0, v)  # skimage: 0 where delta == 0
        h = num / np.where(grey, 1.0, delta)
        h += np.where(bmax, 4.0, np.where(gmax, 2.0, 0.0))
        h /= 6.0
        h += h < 0  # skimage's h % 1.0, for h in [-1/6, 5/6]
        h[grey] = 0.0

        adjust(s, v)

        h *= 6
        hi = np.floor(h)
        f = h - hi
        vpqt = np.empty((4, n))
        vpqt[0] = v
        np.multiply(v, 1 - s, out=vpqt[1])
        np.multiply(v, 1 - f * s, out=vpqt[2])
        np.multiply(v, 1 - (1 - f) * s, out=vpqt[3])
        pick = _SEXTANT_PICK[:, hi.astype(np.intp)] * n + np.arange(n)
        out[a : a + n] = to_uint8(np.take(vpqt.ravel(), pick)).T
    return out.reshape(x.shape)


def _hsv_roundtrip_torch(x: torch.Tensor, adjust: Callable[[torch.Tensor, torch.Tensor], tuple]) -> torch.Tensor:
    """scikit-image's rgb2hsv -> adjust(s, v) -> hsv2rgb in float64, op for op as _hsv_roundtrip."""
    rgb = unit(x).permute(3, 0, 1, 2)  # planar (3, N, H, W)
    r, g, b = rgb
    v = rgb.amax(dim=0)
    delta = v - rgb.amin(dim=0)
    grey = delta == 0
    bmax, gmax = b == v, g == v  # blue wins ties, then green (skimage's overwrite order)
    num = torch.where(bmax, r - g, torch.where(gmax, b - r, g - b))
    s = delta / torch.where(grey, 1.0, v)
    h = num / torch.where(grey, 1.0, delta)
    h = h + torch.where(bmax, 4.0, torch.where(gmax, 2.0, 0.0))
    h = div(h, 6.0)
    h = h + (h < 0).to(F64)  # skimage's h % 1.0 for h in [-1/6, 5/6]
    h = torch.where(grey, 0.0, h)

    s, v = adjust(s, v)

    h = h * 6
    hi = torch.floor(h)
    f = h - hi
    vpqt = torch.stack([v, v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)])
    pick = dev(_SEXTANT_PICK, x)[:, hi.to(torch.long)]  # (3, N, H, W) plane index per output channel
    return torch.gather(vpqt, 0, pick).permute(1, 2, 3, 0)


@register("brightness", rgb_only=True)
def brightness(x: np.ndarray, c: float, rngs: list, profile: str) -> np.ndarray:
    def adjust(s: np.ndarray, v: np.ndarray) -> None:
        v += c
        np.clip(v, 0, 1, out=v)

    return _hsv_roundtrip(x, adjust)


@register_torch("brightness")
def brightness_torch(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    return _hsv_roundtrip_torch(x, lambda s, v: (s, (v + c).clamp(0, 1)))


@register("saturate", rgb_only=True)
def saturate(x: np.ndarray, param: tuple[float, float], rngs: list, profile: str) -> np.ndarray:
    mul, add = param

    def adjust(s: np.ndarray, v: np.ndarray) -> None:
        s *= mul
        s += add
        np.clip(s, 0, 1, out=s)

    return _hsv_roundtrip(x, adjust)


@register_torch("saturate")
def saturate_torch(x: torch.Tensor, param: tuple[float, float], rngs: list, profile: str) -> torch.Tensor:
    mul, add = param
    return _hsv_roundtrip_torch(x, lambda s, v: ((s * mul + add).clamp(0, 1), v))


# ---------------------------------------------------------------------------------------------------------------
# Elastic transform
# ---------------------------------------------------------------------------------------------------------------


def _reflect(i: np.ndarray, n: int) -> np.ndarray:
    """Integer indices into a half-sample symmetric extension (... b a | a b ... y z | z y ...), scipy "reflect"."""
    i = np.mod(i, 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


@lru_cache(maxsize=64)
def _gaussian_matrix(n: int, sigma: float, truncate: float = 3.0) -> np.ndarray:
    """The (n, n) matrix of scipy's gaussian_filter1d(mode="reflect") along one axis.

    The original's sigma reaches 171 px (kernel radius 512) on 224 px images, so a direct filter costs ~1000 taps
    per pixel; folding the kernel into a matrix makes both axes two small matrix products for the whole batch.
    """
    radius = int(truncate * float(sigma) + 0.5)
    k = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 / (sigma * sigma) * k**2)
    w /= w.sum()
    src = _reflect(np.arange(n)[:, None] + k[None, :], n)
    mat = np.zeros((n, n))
    np.add.at(mat, (np.repeat(np.arange(n), len(k)), src.ravel()), np.tile(w, n))
    return mat


@lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # an optional speed-up only
        return None
    return ThreadpoolController()


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS limited to one thread: the products here are small, and OpenBLAS's spinning worker threads made the whole
    transform 2-3x slower on a busy 2-core machine."""
    ctl = _blas_controller()
    return contextlib.nullcontext() if ctl is None else ctl.limit(limits=1, user_api="blas")


def _smooth(fields: np.ndarray, sigma: float) -> np.ndarray:
    """skimage gaussian(sigma, mode="reflect", truncate=3) of each (H, W) float64 field of a stack."""
    m, h, w = fields.shape
    taps = 2 * int(3.0 * sigma + 0.5) + 1
    if 8 * taps <= h + w:  # short kernels: scipy's own filter, the original's code path
        return gaussian_filter(fields, (0, sigma, sigma), mode="reflect", truncate=3.0)
    # Long kernels (up to 1025 taps on 224 px in the ImageNet profile): two matrix products, which cost H + W
    # multiply-adds per value instead of 2 * taps, but at BLAS speed.
    cols = _gaussian_matrix(h, sigma) @ fields.transpose(1, 0, 2).reshape(h, m * w)
    return (cols.reshape(h, m, w).transpose(1, 0, 2).reshape(m * h, w) @ _gaussian_matrix(w, sigma).T).reshape(m, h, w)


def _affine_fixed_maps(mats: np.ndarray, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """cv2.warpAffine's own fixed-point source maps (int16 x, y and a 1/32-pixel table index) for a batch of 2x3
    forward matrices, as OpenCV up to 4.10 computes them inside warpAffine.

    OpenCV >= 4.11 interpolates warpAffine at full precision, which moves ~20% of the original's output bytes by 1-3
    levels; cv2.remap with these maps still runs the old bilinear table code, and reproduces the original exactly.
    """
    n = len(mats)
    m = mats.reshape(n, 6).astype(np.float64)
    # The inverse map, with cv2's own double arithmetic.
    det = m[:, 0] * m[:, 4] - m[:, 1] * m[:, 3]
    det = np.where(det != 0, 1.0 / np.where(det != 0, det, 1.0), 0.0)
    a11, a22 = m[:, 4] * det, m[:, 0] * det
    a12, a21 = m[:, 1] * -det, m[:, 3] * -det
    b1 = -a11 * m[:, 2] - a12 * m[:, 5]
    b2 = -a21 * m[:, 2] - a22 * m[:, 5]
    # 10 fractional bits per step, rounded half to even (cvRound), then cut to 5 bits (INTER_BITS) with rounding.
    xs, ys = np.arange(w), np.arange(h)
    adelta = np.rint(a11[:, None] * xs * 1024).astype(np.int64)[:, None, :]
    bdelta = np.rint(a21[:, None] * xs * 1024).astype(np.int64)[:, None, :]
    x0 = (np.rint((a12[:, None] * ys + b1[:, None]) * 1024).astype(np.int64) + 16)[:, :, None]
    y0 = (np.rint((a22[:, None] * ys + b2[:, None]) * 1024).astype(np.int64) + 16)[:, :, None]
    fx = (x0 + adelta) >> 5
    fy = (y0 + bdelta) >> 5
    xy = np.clip(np.stack([fx >> 5, fy >> 5], axis=-1), -32768, 32767).astype(np.int16)  # saturate_cast<short>
    frac = ((fy & 31) * 32 + (fx & 31)).astype(np.uint16)
    return xy, frac


def _fold_reflect(cc: np.ndarray, n: int) -> np.ndarray:
    """scipy.ndimage's map_coordinate(mode="reflect"): fold out-of-range coordinates back, float for float."""
    outside = (cc < 0) | (cc > n - 1)
    if not outside.any():
        return cc
    v = cc[outside]
    sz2 = 2 * n
    low = np.where(v < -sz2, sz2 * np.trunc(-v / sz2) + v, v)
    low = np.where(low < -n, low + sz2, -low - 1)
    high = v - sz2 * np.trunc(v / sz2)
    high = np.where(high >= n, sz2 - high - 1, high)
    cc = cc.copy()
    cc[outside] = np.where(v < 0, low, high)
    return cc


def _blocks(n: int, h: int, w: int) -> Iterator[tuple[slice, slice]]:
    """(images, rows) blocks of about _CHUNK_PIXELS pixels: whole images when small, row bands when large."""
    if h * w >= _CHUNK_PIXELS:
        step = max(1, _CHUNK_PIXELS // w)
        for i in range(n):
            for r in range(0, h, step):
                yield slice(i, i + 1), slice(r, min(r + step, h))
    else:
        step = _CHUNK_PIXELS // (h * w)
        for i in range(0, n, step):
            yield slice(i, min(i + step, n)), slice(0, h)


def _map_coordinates_reflect(img: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """scipy map_coordinates(order=1, mode="reflect") of float32 (N, H, W, C) images at the pixel grid displaced by
    float32 (N, H, W) fields: row + dy, column + dx, as the original's (row, col, channel) coordinates.

    The channel coordinates are integers, so this is a 2-D bilinear lookup per channel; the folding, the weights
    (w0 = 1 - t, w1 = 1 - w0) and the float64 product and sum order are scipy's. Output pixels are done in blocks so
    the temporaries stay small (fresh large arrays cost more in page faults than in arithmetic here).
    """
    n, h, w, c = img.shape
    planar = np.ascontiguousarray(img.transpose(0, 3, 1, 2)).ravel()
    out = np.empty((n, h, w, c), img.dtype)
    for ims, band in _blocks(n, h, w):
        rows = _fold_reflect(np.arange(band.start, band.stop)[:, None] + dy[ims, band].astype(np.float64), h)
        cols = _fold_reflect(np.arange(w) + dx[ims, band].astype(np.float64), w)
        r0, c0 = np.floor(rows), np.floor(cols)
        wr0, wc0 = 1.0 - (rows - r0), 1.0 - (cols - c0)
        wr1, wc1 = 1.0 - wr0, 1.0 - wc0
        # Folded coordinates lie in (-1, n): the two taps only need clamping (tap -1 reflects to 0, tap n to n - 1).
        ri, ci = r0.astype(np.intp), c0.astype(np.intp)
        base = (np.arange(ims.start, ims.stop) * (c * h * w))[:, None, None]
        ra, rb = base + np.maximum(ri, 0) * w, base + np.minimum(ri + 1, h - 1) * w
        ca, cb = np.maximum(ci, 0), np.minimum(ci + 1, w - 1)
        taps = ((ra + ca, wr0, wc0), (ra + cb, wr0, wc1), (rb + ca, wr1, wc0), (rb + cb, wr1, wc1))
        for ch in range(c):
            plane = planar[ch * h * w :]
            acc = np.zeros(rows.shape)
            for idx, wr, wc in taps:
                term = np.take(plane, idx) * wr
                term *= wc
                acc += term
            out[ims, band, :, ch] = acc
    return out


@register("elastic_transform")
def elastic_transform(x: np.ndarray, param: tuple[float, float, float], rngs: list, profile: str) -> np.ndarray:
    # The CIFAR and ImageNet originals are the same code (no crop or pad), only the constants differ (ImageNet's are
    # multiples of 244, not 224, in the original too).
    n, h, w, c = x.shape
    # The original builds the triangle from (H, W) but cv2 reads points as (x, y); kept, it only matters when H != W.
    centre = np.float32((h, w)) // 2
    size = min(h, w) // 3
    pts1 = np.float32([centre + size, [centre[0] + size, centre[1] - size], centre - size])
    out = np.empty(x.shape, np.uint8)
    with _one_blas_thread():
        for sl in chunks(n, h * w * c, 8 * _CHUNK_PIXELS):
            _elastic_chunk(x[sl], [rngs[i] for i in range(sl.start, sl.stop)], pts1, param, out[sl])
    return out


def _elastic_chunk(x: np.ndarray, rngs: list, pts1: np.ndarray, param: tuple, out: np.ndarray) -> None:
    alpha, sigma, jitter = param
    k, h, w, c = x.shape
    mats = np.empty((k, 2, 3))
    fields = np.empty((k, 2, h, w))
    for j, rng in enumerate(rngs):
        # Draw order of the original: the affine jitter, then the dx field, then the dy field.
        pts2 = pts1 + rng.uniform(-jitter, jitter, size=pts1.shape).astype(np.float32)
        mats[j] = cv2.getAffineTransform(pts1, pts2)
        if alpha != 0:
            fields[j] = rng.uniform(-1, 1, size=(2, h, w))
    xy, frac = _affine_fixed_maps(mats, h, w)
    im = x.astype(np.float32) / 255.0
    warped = np.empty_like(im)
    for j in range(k):
        warped[j] = cv2.remap(im[j], xy[j], frac[j], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101).reshape(
            h, w, c
        )
    if alpha == 0:  # the original's fields are all zero (sigma 0 leaves them unsmoothed, times alpha 0)
        out[...] = to_uint8(warped)
        return
    # Smoothed in float64 and scaled, then float32 (dx, dy), as the original.
    fields = (_smooth(fields.reshape(2 * k, h, w), sigma) * alpha).astype(np.float32).reshape(k, 2, h, w)
    out[...] = to_uint8(_map_coordinates_reflect(warped, fields[:, 1], fields[:, 0]))


# ---------------------------------------------------------------------------------------------------------------
# Pixelate and JPEG
# ---------------------------------------------------------------------------------------------------------------


_BOX = getattr(Image, "Resampling", Image).BOX


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _array(img: Image.Image, c: int) -> np.ndarray:
    a = np.asarray(img)
    return a[..., None] if c == 1 else a


@register("pixelate")
def pixelate(x: np.ndarray, c: float, rngs: list, profile: str) -> np.ndarray:
    # The original, per image: img.resize(small, BOX).resize((w, h), BOX). Same bytes here: the way down is Pillow's
    # own; going up, BOX copies the one pixel each output pixel lands on (box_upsample_index), which cv2's exact
    # nearest-neighbour resize does at a fraction of the cost where it picks the same pixels, and numpy's take
    # otherwise. Image by image rather than stacked: each image's work stays in the cache.
    n, h, w, ch = x.shape
    sw, sh = int(w * c), int(h * c)  # the original: int(224 * c) (ImageNet) or int(32 * c) (CIFAR)
    by_cv2 = nearest_exact_is_box((sh, sw), (h, w), ch)
    rows, cols = box_upsample_index(sh, h), box_upsample_index(sw, w)
    pixel = np.dtype((np.void, ch))  # a whole pixel per element: numpy's copies move pixels, not bytes
    frame = Image.new("L" if ch == 1 else "RGB", (w, h))  # refilled by each image: one allocation per batch
    out = np.empty_like(x)
    out_pixels = out.view(pixel)[..., 0]
    for i in range(n):
        frame.frombytes(np.ascontiguousarray(x[i]))
        small = _array(frame.resize((sw, sh), _BOX), ch)
        if by_cv2:
            out[i] = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST_EXACT).reshape(h, w, ch)
        else:
            np.take(small.view(pixel)[..., 0].take(cols, axis=1), rows, axis=0, out=out_pixels[i])
    return out


@lru_cache(maxsize=64)
def nearest_exact_is_box(small: tuple[int, int], size: tuple[int, int], channels: int) -> bool:
    """Whether cv2's INTER_NEAREST_EXACT resize of uint8 images from ``small`` (h, w) up to ``size`` copies the pixels
    Pillow's BOX resize does (:func:`box_upsample_index`). It does for most sizes, not all (2 -> 15 differs), so each
    case is probed once, on images of that shape whose bytes name their source row or column.

    Example:
        >>> nearest_exact_is_box((134, 134), (224, 224), 3), nearest_exact_is_box((2, 2), (15, 15), 3)
        (True, False)
    """
    (sh, sw), (h, w) = small, size
    if max(sh, sw) >= 1 << 16:
        return False
    src = np.meshgrid(np.arange(sh), np.arange(sw), indexing="ij")
    want = np.meshgrid(box_upsample_index(sh, h), box_upsample_index(sw, w), indexing="ij")
    for index, expected in zip(src, want, strict=True):
        for shift in (0, 8):  # low byte, high byte
            probe = np.repeat((index[..., None] >> shift & 255).astype(np.uint8), channels, axis=2)
            got = cv2.resize(probe, (w, h), interpolation=cv2.INTER_NEAREST_EXACT).reshape(h, w, channels)
            if not (got == (expected[..., None] >> shift & 255)).all():
                return False
    return True


_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 - 2


@lru_cache(maxsize=64)
def box_upsample_index(in_size: int, out_size: int) -> np.ndarray:
    """Source pixel of each output pixel of Pillow's BOX resize from ``in_size`` up to ``out_size`` along one axis.

    Going up, the box (one input pixel wide) covers exactly one input pixel centre per output pixel, so every row of
    :func:`pil_box_matrix` is a single coefficient of 1.0 and the resize copies that pixel, rounding included.

    Example:
        >>> box_upsample_index(2, 5).tolist()
        [0, 0, 1, 1, 1]
    """
    mat = pil_box_matrix(in_size, out_size)
    one = mat == 1 << _PRECISION_BITS
    if in_size > out_size or not (one.sum(axis=1) == 1).all() or np.count_nonzero(mat) != out_size:
        raise ValueError(
            f"expected a BOX resize to a larger size, got {in_size} -> {out_size}; resize down with Pillow"
        )
    return one.argmax(axis=1)


@lru_cache(maxsize=64)
def pil_box_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) fixed-point coefficients of Pillow's BOX resize along one axis, as Resample.c's precompute_coeffs
    and normalize_coeffs_8bpc compute them (float64, then rounded to 22 fractional bits).

    Example:
        >>> (pil_box_matrix(4, 2) / 2**22).tolist()
        [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]]
    """
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale  # BOX's support is 0.5
    ss = 1.0 / filterscale
    mat = np.zeros((out_size, in_size), np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        taps = [1.0 if -0.5 < (x + xmin - center + 0.5) * ss <= 0.5 else 0.0 for x in range(xmax)]
        total = 0.0
        for t in taps:
            total += t
        for x, t in enumerate(taps):
            k = t / total if total != 0.0 else t
            mat[xx, xmin + x] = int(0.5 + k * (1 << _PRECISION_BITS))
    return mat


def _pil_pass(x: torch.Tensor, mat: torch.Tensor, equation: str) -> torch.Tensor:
    # Integer-valued float64 products and sums stay below 2^31, so the matrix product is exact in any order; then
    # Pillow's rounding (+ 2^21) and clip8 (>> 22, clamped to 0..255).
    acc = torch.einsum(equation, mat, x) + float(1 << (_PRECISION_BITS - 1))
    return torch.floor(acc / float(1 << _PRECISION_BITS)).clamp(0, 255)


@register_torch("pixelate")
def pixelate_torch(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    h, w = x.shape[1:3]
    sw, sh = int(w * c), int(h * c)
    y = x.to(F64)
    # Each resize: horizontal pass, then vertical, each rounded to 8 bits (Pillow's two-pass order).
    for (fh, th), (fw, tw) in (((h, sh), (w, sw)), ((sh, h), (sw, w))):
        y = _pil_pass(y, dev(pil_box_matrix(fw, tw), x), "ij,nhjc->nhic")
        y = _pil_pass(y, dev(pil_box_matrix(fh, th), x), "ij,njwc->niwc")
    return y.to(torch.uint8)


@register("jpeg_compression")
def jpeg_compression(x: np.ndarray, quality: int, rngs: list, profile: str) -> np.ndarray:
    # The original saves with Pillow, giving only the quality (so 4:2:0 chroma subsampling, baseline, islow DCT).
    # cv2's encoder and decoder are the same libjpeg-turbo code with the same defaults, give the same bytes (checked
    # against a Pillow round trip in the tests) and cost a fraction of Pillow's per-call overhead on small images.
    out = np.empty_like(x)
    grey = x.shape[-1] == 1
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    for i in range(len(x)):
        img = x[i, ..., 0] if grey else cv2.cvtColor(x[i], cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", img, params)
        if not ok:
            raise RuntimeError("cv2.imencode failed to write a JPEG")
        dec = cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE if grey else cv2.IMREAD_COLOR)
        out[i] = dec[..., None] if grey else cv2.cvtColor(dec, cv2.COLOR_BGR2RGB)
    return out
