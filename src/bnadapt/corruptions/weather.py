"""Weather corruptions: frost, fog, and the held-out spatter (water and mud); frost and fog have torch variants.

Each function consumes its image's random numbers in the same order as the original code, so a legacy
``RandomState`` seeded like the original reproduces the original bytes (see tests/test_corruptions_weather.py).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .params import FOG_MAP_SIZE
from .registry import chunks, randint, register, register_torch
from .torch_path import F64, dev, div, drawn, unit

# Images per chunk are chosen so that a chunk's float temporaries stay in cache: one big batch is 2-3x slower.
_CHUNK_PIXELS = 1 << 17


def _chunked(x: np.ndarray, rngs: list, work) -> np.ndarray:
    """Run ``work(x_chunk, rngs_chunk) -> uint8`` over chunks of images; each image keeps its own generator."""
    out = np.empty(x.shape, np.uint8)
    for sl in chunks(x.shape[0], x.shape[1] * x.shape[2], _CHUNK_PIXELS):
        out[sl] = work(x[sl], rngs[sl])
    return out


def _truncate(y: np.ndarray) -> np.ndarray:
    """The engine's (and original's) ``uint8(clip(y, 0, 1) * 255)``, in place on the temporary ``y``, per chunk."""
    np.clip(y, 0, 1, out=y)
    y *= 255
    return y.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------- frost

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")  # frost6 is never drawn
FROST_ENV = "BNADAPT_FROST_DIR"


def frost_dir() -> Path | None:
    """Folder of the frost textures: $BNADAPT_FROST_DIR, else ``imagecorruptions``'s ``frost/`` (None if absent)."""
    env = os.environ.get(FROST_ENV)
    if env:
        return Path(env)
    # find_spec locates the package without importing it (importing imagecorruptions fails on recent stacks).
    spec = importlib.util.find_spec("imagecorruptions")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "frost"


@functools.lru_cache(maxsize=8)
def _textures(folder: str, profile: str) -> tuple[np.ndarray, ...]:
    """The five decoded RGB textures, loaded once per (folder, profile)."""
    out = []
    for name in FROST_FILES:
        path = Path(folder) / name
        im = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
        if im is None:
            raise FileNotFoundError(
                f"frost texture {name} is missing or unreadable (looked in {folder}); reinstall it with "
                f"`pip install --force-reinstall imagecorruptions` or set ${FROST_ENV} to a folder holding "
                f"{', '.join(FROST_FILES)}"
            )
        if profile == "cifar":
            # CIFAR-10-C shrinks the texture (bilinear, in BGR) before cropping.
            im = cv2.resize(im, (0, 0), fx=0.2, fy=0.2)
        im = np.ascontiguousarray(im[..., ::-1])  # cv2 decodes BGR; the original flips the crop to RGB
        im.flags.writeable = False  # shared through the cache
        out.append(im)
    return tuple(out)


def _frost_folder() -> str:
    folder = frost_dir()
    if folder is None:
        raise FileNotFoundError(
            "frost textures not found: the imagecorruptions package (which ships them) is not installed; "
            f"run `pip install imagecorruptions` or set ${FROST_ENV} to a folder holding {', '.join(FROST_FILES)}"
        )
    return str(folder)


@functools.lru_cache(maxsize=64)
def _texture_for(folder: str, profile: str, idx: int, h: int, w: int) -> np.ndarray:
    """Texture ``idx``, enlarged (bilinear, aspect kept) when the image does not fit strictly inside it.

    The original crops at ``randint(0, size - image)``, which needs the texture to be at least one pixel larger
    than the image; textures are 315..600 px high (63..120 for CIFAR), so this only happens for large images.
    """
    tex = _textures(folder, profile)[idx]
    th, tw = tex.shape[:2]
    if th > h and tw > w:
        return tex
    scale = max((h + 1) / th, (w + 1) / tw)
    size = (max(int(np.ceil(tw * scale)), w + 1), max(int(np.ceil(th * scale)), h + 1))
    big = cv2.resize(tex, size, interpolation=cv2.INTER_LINEAR)
    big.flags.writeable = False
    return big


def _frost_crops(n: int, h: int, w: int, rngs: list, profile: str) -> np.ndarray:
    """(n, h, w, 3) uint8 texture crops, one per image, from the original's draws: texture, top, left."""
    folder = _frost_folder()
    crops = np.empty((n, h, w, 3), np.uint8)
    for i, rng in enumerate(rngs):
        idx = int(randint(rng, 0, len(FROST_FILES)))
        tex = _texture_for(folder, profile, idx, h, w)
        top = int(randint(rng, 0, tex.shape[0] - h))
        left = int(randint(rng, 0, tex.shape[1] - w))
        crops[i] = tex[top : top + h, left : left + w]
    return crops


@register("frost", rgb_only=True)
def frost(x: np.ndarray, c: tuple, rngs: list, profile: str) -> np.ndarray:
    a, b = c
    n, h, w = x.shape[:3]
    crops = _frost_crops(n, h, w, rngs, profile)
    # Blended on the 0..255 scale in float64 and truncated, as the original.
    out = np.empty_like(x)
    for sl in chunks(n, h * w, _CHUNK_PIXELS):
        y = a * x[sl].astype(np.float64)
        y += b * crops[sl]
        np.clip(y, 0, 255, out=y)
        out[sl] = y
    return out


@register_torch("frost")
def frost_torch(x: torch.Tensor, c: tuple, rngs: list, profile: str) -> torch.Tensor:
    a, b = c
    n, h, w = x.shape[:3]
    # The crops are cut on the host (uint8) and only blended on the device.
    crops = _frost_crops(n, h, w, rngs, profile)
    # Blended on the 0..255 scale in float64 and truncated.
    y = a * x.to(F64) + b * dev(crops, x).to(F64)
    return y.clamp(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------------------ fog


def fog_map_size(profile: str, h: int, w: int) -> int:
    """Side of the square plasma map: the profile's size, or the next power of two covering a larger image."""
    m = FOG_MAP_SIZE[profile]
    while m < max(h, w):
        m *= 2
    return m


def plasma_fractal(rngs: list, mapsize: int, wibbledecay: float) -> np.ndarray:
    """Diamond-square height maps in [0, 1], one (mapsize, mapsize) map per generator, batched.

    Each map draws, per octave, the square-step noise then the two diamond-step noises, C order, as uniform
    ``(-wibble, wibble)`` scaled by ``wibble`` again (the original's squared amplitude); all of an image's draws
    are taken with one ``rng.random`` call, which gives the same stream as the original's successive calls.
    """
    out = np.empty((len(rngs), mapsize, mapsize), np.float64)
    # Chunks of about 2 MB keep the strided octave updates in cache (measured ~1.5-3x faster at mapsize 256).
    step = max(1, (1 << 21) // (mapsize * mapsize * 8))
    for s in range(0, len(rngs), step):
        out[s : s + step] = _plasma_chunk(rngs[s : s + step], mapsize, wibbledecay)
    return out


def _plasma_chunk(rngs: list, mapsize: int, wibbledecay: float) -> np.ndarray:
    total = sum(3 * (mapsize // (1 << k)) ** 2 for k in range(mapsize.bit_length() - 1, 0, -1))
    u = np.stack([rng.random(total) for rng in rngs])
    grid = np.empty((len(rngs), mapsize, mapsize), np.float64)
    grid[:, 0, 0] = 0.0
    step, wibble, pos = mapsize, 100.0, 0

    def wibbled(acc: np.ndarray) -> np.ndarray:
        nonlocal pos
        k = acc.shape[1] * acc.shape[2]
        # np.random.uniform(low, high) is low + (high - low) * next_double: same float ops, same bits.
        noise = (-wibble + (wibble - -wibble) * u[:, pos : pos + k]).reshape(acc.shape)
        pos += k
        return acc / 4 + wibble * noise

    while step >= 2:
        half = step // 2
        corners = grid[:, 0:mapsize:step, 0:mapsize:step]
        acc = corners + np.roll(corners, -1, axis=1)
        acc += np.roll(acc, -1, axis=2)
        grid[:, half:mapsize:step, half:mapsize:step] = wibbled(acc)
        centres = grid[:, half:mapsize:step, half:mapsize:step]
        left = (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=2))
        grid[:, 0:mapsize:step, half:mapsize:step] = wibbled(left)
        top = (centres + np.roll(centres, 1, axis=2)) + (corners + np.roll(corners, -1, axis=1))
        grid[:, half:mapsize:step, 0:mapsize:step] = wibbled(top)
        step //= 2
        wibble /= wibbledecay
    grid -= grid.min(axis=(1, 2), keepdims=True)
    grid /= grid.max(axis=(1, 2), keepdims=True)
    return grid


@register("fog")
def fog(x: np.ndarray, c: tuple, rngs: list, profile: str) -> np.ndarray:
    strength, decay = c
    h, w = x.shape[1:3]
    # Larger or non-square images get a larger power-of-two map (as the imagecorruptions package does), cropped at
    # the top-left like the original's [:224, :224].
    mapsize = fog_map_size(profile, h, w)

    def work(xs: np.ndarray, rs: list) -> np.ndarray:
        im = xs / 255.0
        peak = xs.max(axis=(1, 2, 3), keepdims=True) / 255.0  # = max(xs / 255), on uint8
        im += strength * plasma_fractal(rs, mapsize, decay)[:, :h, :w, None]
        # In place, in the original's order: (im * peak) / (peak + strength).
        im *= peak
        im /= peak + strength
        return _truncate(im)

    return _chunked(x, rngs, work)


@register_torch("fog")
def fog_torch(x: torch.Tensor, c: tuple, rngs: list, profile: str) -> torch.Tensor:
    strength, decay = c
    h, w = x.shape[1:3]
    mapsize = fog_map_size(profile, h, w)
    # The diamond-square steps are sequential per image: computed on the host, one image per thread.
    plasma = drawn(lambda rng: plasma_fractal([rng], mapsize, decay)[0, :h, :w], x, rngs)
    im = unit(x)
    peak = div(x.amax(dim=(1, 2, 3), keepdim=True).to(F64), 255.0)
    im = im + strength * plasma[..., None]
    return im * peak / (peak + strength)


# -------------------------------------------------------------------------------------------------------- spatter

_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], np.float32)
_WATER = np.array([175, 238, 238], np.float64) / 255.0  # pale turquoise, given as BGR but added to RGB channels
_MUD = np.array([63, 42, 20], np.float64) / 255.0


def _as_uint8_wrapping(v: np.ndarray) -> np.ndarray:
    # The original's (layer * 255).astype(uint8) wraps values above 255 (x86 numpy); made explicit and portable.
    return (v.astype(np.int64) & 255).astype(np.uint8)


def _water_mask(layer: np.ndarray) -> np.ndarray:
    """Water intensity of one image before normalisation: liquid layer times an embossed edge-distance map."""
    liquid = _as_uint8_wrapping(layer * 255)
    dist = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
    np.minimum(dist, 20, out=dist)
    dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
    dist = cv2.equalizeHist(dist)
    dist = cv2.filter2D(dist, cv2.CV_8U, _EMBOSS)
    dist = cv2.blur(dist, (3, 3)).astype(np.float32)
    return liquid * dist


@register("spatter", rgb_only=True)
def spatter(x: np.ndarray, c: tuple, rngs: list, profile: str) -> np.ndarray:
    loc, scale, sigma, thr, intensity, mode = c
    h, w = x.shape[1:3]

    def work(xs: np.ndarray, rs: list) -> np.ndarray:
        layer = np.stack([rng.normal(loc, scale, (h, w)) for rng in rs])
        # skimage.filters.gaussian: mode nearest, truncate 4; the batch axis is left alone.
        layer = gaussian_filter(layer, sigma=(0, sigma, sigma), mode="nearest", truncate=4.0)
        layer[layer < thr] = 0
        im = xs.astype(np.float32)
        im /= 255
        if mode == 0:
            m = np.stack([_water_mask(one) for one in layer])
            peak = m.max(axis=(1, 2), keepdims=True)
            # A map without any water (peak 0) gives NaN in the original; here it adds nothing.
            m = np.divide(m, peak, out=np.zeros_like(m), where=peak > 0)
            m *= intensity
            im += m[..., None] * _WATER.astype(np.float32)
            return _truncate(im)
        # Mud: the fifth constant is the mask's blur sigma here, not an intensity.
        m = (layer > thr).astype(np.float32)
        m = gaussian_filter(m, sigma=(0, intensity, intensity), mode="nearest", truncate=4.0)
        m[m < 0.8] = 0
        m = m[..., None]
        im *= 1 - m
        im += _MUD.astype(np.float32) * m
        return _truncate(im)

    return _chunked(x, rngs, work)
