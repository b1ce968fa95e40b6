"""The corruption engine's torch path: corruptions computed with torch ops on the images' own device (e.g. CUDA).

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
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from . import _REGISTRY, GROUPS, chunks, randint
from ._motion import motion_offsets, motion_weights
from .blur import _zoom_taps, disk_kernel, zoom_blur_operator
from .digital import _SEXTANT_PICK
from .params import severity_param
from .weather import FROST_FILES, _frost_folder, _texture_for, fog_map_size, plasma_fractal

# A torch corruption: fn(uint8 NHWC tensor, severity parameter, list of generators, profile) -> float tensor in
# [0, 1] (clipped and truncated by the caller) or uint8.
TorchFn = Callable[[torch.Tensor, object, list, str], torch.Tensor]
_TORCH: dict[str, TorchFn] = {}

# Images are processed in chunks of about this many pixels: float64 temporaries of ~50 MB each.
_CHUNK_PIXELS = 1 << 21
_F64 = torch.float64


def _register(name: str) -> Callable[[TorchFn], TorchFn]:
    def deco(fn: TorchFn) -> TorchFn:
        _TORCH[name] = fn
        return fn

    return deco


def torch_corruption_names() -> list[str]:
    """The corruptions with a torch path, in the canonical order; the others run on numpy (see the module docstring).

    Example:
        >>> "gaussian_noise" in torch_corruption_names(), "jpeg_compression" in torch_corruption_names()
        (True, False)
    """
    return [n for n in GROUPS["all"] if n in _TORCH]


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """``uint8(clip(y, 0, 1) * 255)`` (truncation, as the numpy engine's to_uint8); uint8 passes."""
    if y.dtype == torch.uint8:
        return y
    return (y.clamp(0, 1) * 255).to(torch.uint8)


def _dev(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # cached read-only constants: torch.from_numpy wants a writable buffer
        a = a.copy()
    return torch.from_numpy(a).to(like.device)


def _div(t: torch.Tensor, d: float) -> torch.Tensor:
    """``t / d`` correctly rounded on every device: CUDA divides by a Python number as a multiplication by its
    reciprocal (off by one unit in the last place, which the final truncation to uint8 turns into one level), but by
    a tensor on the device with a true division."""
    return t / torch.tensor(d, dtype=t.dtype, device=t.device)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float64 / 255, the numpy engine's ``x / 255.0``."""
    return _div(x.to(_F64), 255.0)


def corrupt_tensor(x: torch.Tensor, name: str, severity: int, profile: str, rngs) -> torch.Tensor:
    """Run corruption ``name`` on a contiguous uint8 (N, H, W, C) tensor on its device; ``rngs`` from image_rngs.

    Inputs are validated by ``bnadapt.corruptions.corrupt`` (the public entry point), which calls this.

    Example:
        >>> from bnadapt.corruptions import image_rngs
        >>> x = torch.full((1, 32, 32, 3), 128, dtype=torch.uint8)
        >>> corrupt_tensor(x, "brightness", 3, "cifar", image_rngs(0, "brightness", 3, [0])).dtype
        torch.uint8
    """
    fn, rgb_only = _TORCH[name], _REGISTRY[name].rgb_only
    grey = x.shape[-1] == 1 and rgb_only
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
        out = to_uint8(_div(y[..., :1] * 0.299 + y[..., 1:2] * 0.587 + y[..., 2:] * 0.114, 255.0))
    return out


# -------------------------------------------------------------------------------------------------------- noise

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


def _drawn(draw: Callable, x: torch.Tensor, rngs: Sequence, *arrays: Sequence) -> torch.Tensor:
    """The per-image draws stacked on the host and moved to x's device."""
    return _dev(np.stack(per_image(draw, rngs, *arrays, pixels=x[0].numel())), x)


@_register("gaussian_noise")
def gaussian_noise(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    shape = x.shape[1:]
    return _unit(x) + _drawn(lambda rng: rng.normal(size=shape, scale=c), x, rngs)


@_register("speckle_noise")
def speckle_noise(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    shape = x.shape[1:]
    im = _unit(x)
    return im + im * _drawn(lambda rng: rng.normal(size=shape, scale=c), x, rngs)


@_register("shot_noise")
def shot_noise(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    # numpy's Poisson draw takes the rate per pixel: the images go to the host (uint8) and the counts come back.
    counts = _drawn(lambda rng, im: rng.poisson(im / 255.0 * c).astype(np.int32), x, rngs, x.cpu().numpy())
    return _div(counts.to(_F64), c)


@_register("impulse_noise")
def impulse_noise(x: torch.Tensor, amount: float, rngs: list, profile: str) -> torch.Tensor:
    # The two uniform draws per element are compared on the host (exactly the numpy comparisons) and travel as masks.
    shape = x.shape[1:]
    masks = _drawn(lambda rng: np.stack([rng.random(shape) < amount, rng.random(shape) < 0.5], axis=-1), x, rngs)
    flip, salt = masks[..., 0], masks[..., 1]
    im = _unit(x)
    im = torch.where(flip & salt, 1.0, im)
    return torch.where(flip & ~salt, 0.0, im)


# --------------------------------------------------------------------------------------- contrast, brightness, saturate


@_register("contrast")
def contrast(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    im = _unit(x)
    means = im.mean(dim=(1, 2), keepdim=True)
    return (im - means) * c + means


def _hsv_roundtrip(x: torch.Tensor, adjust: Callable[[torch.Tensor, torch.Tensor], tuple]) -> torch.Tensor:
    """scikit-image's rgb2hsv -> adjust(s, v) -> hsv2rgb in float64, op for op as digital._hsv_roundtrip."""
    rgb = _unit(x).permute(3, 0, 1, 2)  # planar (3, N, H, W)
    r, g, b = rgb
    v = rgb.amax(dim=0)
    delta = v - rgb.amin(dim=0)
    grey = delta == 0
    bmax, gmax = b == v, g == v  # blue wins ties, then green (skimage's overwrite order)
    num = torch.where(bmax, r - g, torch.where(gmax, b - r, g - b))
    s = delta / torch.where(grey, 1.0, v)
    h = num / torch.where(grey, 1.0, delta)
    h = h + torch.where(bmax, 4.0, torch.where(gmax, 2.0, 0.0))
    h = _div(h, 6.0)
    h = h + (h < 0).to(_F64)  # skimage's h % 1.0 for h in [-1/6, 5/6]
    h = torch.where(grey, 0.0, h)

    s, v = adjust(s, v)

    h = h * 6
    hi = torch.floor(h)
    f = h - hi
    vpqt = torch.stack([v, v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)])
    pick = _dev(_SEXTANT_PICK, x)[:, hi.to(torch.long)]  # (3, N, H, W) plane index per output channel
    return torch.gather(vpqt, 0, pick).permute(1, 2, 3, 0)


@_register("brightness")
def brightness(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    return _hsv_roundtrip(x, lambda s, v: (s, (v + c).clamp(0, 1)))


@_register("saturate")
def saturate(x: torch.Tensor, param: tuple[float, float], rngs: list, profile: str) -> torch.Tensor:
    mul, add = param
    return _hsv_roundtrip(x, lambda s, v: ((s * mul + add).clamp(0, 1), v))


# -------------------------------------------------------------------------------------------------------- blurs


def _correlate_nearest(x: torch.Tensor, weights: np.ndarray, dim: int) -> torch.Tensor:
    """scipy correlate1d(mode="nearest") of a symmetric kernel along ``dim``, in scipy's order of operations (centre
    tap, then ``(left + right) * w`` pairs from the outermost in), so float64 results match it bit for bit."""
    r, n = len(weights) // 2, x.shape[dim]
    p = x.index_select(dim, torch.arange(-r, n + r, device=x.device).clamp(0, n - 1))
    out = p.narrow(dim, r, n) * float(weights[r])
    for j in range(r, 0, -1):
        out = out + (p.narrow(dim, r - j, n) + p.narrow(dim, r + j, n)) * float(weights[r - j])
    return out


@_register("gaussian_blur")
def gaussian_blur(x: torch.Tensor, sigma: float, rngs: list, profile: str) -> torch.Tensor:
    # skimage gaussian = scipy gaussian_filter(mode="nearest", truncate=4): rows (axis 0), then columns.
    radius = int(4.0 * float(sigma) + 0.5)
    k = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * k**2)
    weights = weights / weights.sum()
    return _correlate_nearest(_correlate_nearest(_unit(x), weights, 1), weights, 2)


@_register("defocus_blur")
def defocus_blur(x: torch.Tensor, param: tuple, rngs: list, profile: str) -> torch.Tensor:
    kernel = _dev(disk_kernel(*param).astype(np.float64), x)
    r = kernel.shape[0] // 2
    n, h, w, c = x.shape
    im = _unit(x).permute(0, 3, 1, 2).reshape(n * c, 1, h, w)
    # cv2.filter2D: correlation with reflect-101 borders, which is torch's "reflect" padding.
    y = F.conv2d(F.pad(im, (r, r, r, r), mode="reflect"), kernel[None, None])
    return y.reshape(n, c, h, w).permute(0, 2, 3, 1)


def motion_blur_tensor(x: torch.Tensor, radius: float, sigma: float, angles: np.ndarray) -> torch.Tensor:
    """_motion.motion_blur_batch on a device: the same taps, clamped offsets, float32 sum and Q16 rounding."""
    n, h, w, _ = x.shape
    k = motion_weights(radius, sigma).astype(np.float32)
    off = _dev(motion_offsets(len(k), np.asarray(angles)), x)  # (N, width, 2) as (dx, dy)
    xf = x.to(torch.float32)
    rows0 = torch.arange(h, device=x.device)
    cols0 = torch.arange(w, device=x.device)
    img = torch.arange(n, device=x.device)[:, None, None]
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(len(k)):
        rows = (rows0[None, :] + off[:, t, 1:2]).clamp(0, h - 1)
        cols = (cols0[None, :] + off[:, t, 0:1]).clamp(0, w - 1)
        acc += float(k[t]) * xf[img, rows[:, :, None], cols[:, None, :]]
    q = torch.floor((acc.to(_F64) * 257.0).clamp(0.0, 65535.0) + 0.5).to(torch.int32)
    return torch.div(q, 257, rounding_mode="floor").to(torch.uint8)


@_register("motion_blur")
def motion_blur(x: torch.Tensor, param: tuple, rngs: list, profile: str) -> torch.Tensor:
    radius, sigma = param
    angles = np.array([rng.uniform(-45, 45) for rng in rngs], dtype=np.float64)
    return motion_blur_tensor(x, radius, sigma, angles)


def clipped_zoom_tensor(x: torch.Tensor, z: float) -> torch.Tensor:
    """blur.clipped_zoom_batch on a device (same two taps per row and column, same operation order)."""
    r0, r1, a0, a1 = (_dev(a, x) for a in _zoom_taps(x.shape[1], float(z)))
    c0, c1, b0, b1 = (_dev(a, x) for a in _zoom_taps(x.shape[2], float(z)))
    chan = (1,) * (x.ndim - 3)
    b0, b1 = b0.reshape(-1, *chan).to(x.dtype), b1.reshape(-1, *chan).to(x.dtype)
    a0, a1 = a0.reshape(-1, 1, *chan).to(x.dtype), a1.reshape(-1, 1, *chan).to(x.dtype)
    y = x[:, :, c0] * b0 + x[:, :, c1] * b1
    return y[:, r0] * a0 + y[:, r1] * a1


@lru_cache(maxsize=5)
def _zoom_blur_taps(h: int, w: int, zooms: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The rows of blur.zoom_blur_operator as padded (h w, max taps) source indices and float32 weights (0 in the
    padding), in the sparse matrix's stored order."""
    op = zoom_blur_operator(h, w, zooms)
    counts = np.diff(op.indptr)
    row = np.repeat(np.arange(h * w), counts)
    pos = np.arange(op.nnz) - op.indptr[row]
    idx = np.zeros((h * w, counts.max()), np.int64)
    wts = np.zeros((h * w, counts.max()), np.float32)
    idx[row, pos], wts[row, pos] = op.indices, op.data
    return idx, wts


@_register("zoom_blur")
def zoom_blur(x: torch.Tensor, zooms: np.ndarray, rngs: list, profile: str) -> torch.Tensor:
    # The numpy engine's float32 sparse product (pixels as rows, (image, channel) as columns), tap by tap in the
    # matrix's stored order: scipy's csr product accumulates the same float32 terms in the same order.
    n, h, w, c = x.shape
    idx, wts = (_dev(a, x) for a in _zoom_blur_taps(h, w, tuple(float(z) for z in zooms)))
    cols = _unit(x).to(torch.float32).permute(1, 2, 0, 3).reshape(h * w, n * c)
    acc = torch.zeros_like(cols)
    for t in range(idx.shape[1]):
        acc += wts[:, t : t + 1] * cols[idx[:, t]]
    return acc.reshape(h, w, n, c).permute(2, 0, 1, 3)


# ------------------------------------------------------------------------------------------------------ pixelate

_PRECISION_BITS = 22  # Pillow's Resample.c: 32 - 8 - 2


@lru_cache(maxsize=64)
def pil_box_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) fixed-point coefficients of Pillow's BOX resize along one axis, as Resample.c's precompute_coeffs
    and normalize_coeffs_8bpc compute them (float64, then rounded to 22 fractional bits)."""
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


@_register("pixelate")
def pixelate(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    h, w = x.shape[1:3]
    sw, sh = int(w * c), int(h * c)
    y = x.to(_F64)
    # Each resize: horizontal pass, then vertical, each rounded to 8 bits (Pillow's two-pass order).
    for (fh, th), (fw, tw) in (((h, sh), (w, sw)), ((sh, h), (sw, w))):
        y = _pil_pass(y, _dev(pil_box_matrix(fw, tw), x), "ij,nhjc->nhic")
        y = _pil_pass(y, _dev(pil_box_matrix(fh, th), x), "ij,njwc->niwc")
    return y.to(torch.uint8)


# ------------------------------------------------------------------------------------------- fog, frost, snow


@_register("fog")
def fog(x: torch.Tensor, c: tuple, rngs: list, profile: str) -> torch.Tensor:
    strength, decay = c
    h, w = x.shape[1:3]
    mapsize = fog_map_size(profile, h, w)
    # The diamond-square steps are sequential per image: computed on the host, one image per thread.
    plasma = _drawn(lambda rng: plasma_fractal([rng], mapsize, decay)[0, :h, :w], x, rngs)
    im = _unit(x)
    peak = _div(x.amax(dim=(1, 2, 3), keepdim=True).to(_F64), 255.0)
    im = im + strength * plasma[..., None]
    return im * peak / (peak + strength)


@_register("frost")
def frost(x: torch.Tensor, c: tuple, rngs: list, profile: str) -> torch.Tensor:
    a, b = c
    n, h, w = x.shape[:3]
    folder = _frost_folder()
    crops = np.empty((n, h, w, 3), np.uint8)
    for i, rng in enumerate(rngs):  # the numpy engine's draws: texture, top, left
        tex = _texture_for(folder, profile, int(randint(rng, 0, len(FROST_FILES))), h, w)
        top = int(randint(rng, 0, tex.shape[0] - h))
        left = int(randint(rng, 0, tex.shape[1] - w))
        crops[i] = tex[top : top + h, left : left + w]
    # Blended on the 0..255 scale in float64 and truncated.
    y = a * x.to(_F64) + b * _dev(crops, x).to(_F64)
    return y.clamp(0, 255).to(torch.uint8)


@_register("snow")
def snow(x: torch.Tensor, param: tuple, rngs: list, profile: str) -> torch.Tensor:
    loc, scale, z, thr, radius, sigma, b = param
    n, h, w, c = x.shape
    # The layer, then the angle, per image (the numpy engine's order).
    draws = per_image(lambda rng: (rng.normal(loc, scale, (h, w)), rng.uniform(-135, -45)), rngs, pixels=h * w)
    angles = np.array([a for _, a in draws], np.float64)
    lay = clipped_zoom_tensor(_dev(np.stack([layer for layer, _ in draws]), x), z)
    lay = torch.where(lay < thr, 0.0, lay)
    layer8 = (lay.clamp(0, 1) * 255).to(torch.uint8)
    flakes = _div(motion_blur_tensor(layer8[..., None], radius, sigma, angles).to(_F64), 255.0)
    im = _div(x.to(torch.float32), 255.0)
    # cv2.cvtColor(RGB2GRAY) in float32 for colour images.
    grey = im[..., :1] * 0.299 + im[..., 1:2] * 0.587 + im[..., 2:] * 0.114 if c == 3 else im
    im = b * im + (1 - b) * torch.maximum(im, grey * 1.5 + 0.5)
    return im + flakes + flakes.flip(1, 2)
