"""Snow: a zoomed, thresholded, motion-blurred noise layer over a brightened image (numpy and torch variants)."""

from __future__ import annotations

import numpy as np
import torch

from ._motion import motion_blur_batch, motion_blur_tensor
from .blur import clipped_zoom_batch, clipped_zoom_tensor
from .registry import chunks, register, register_torch, to_uint8
from .torch_path import F64, dev, div, per_image

# Batches are processed in chunks of about this many pixels to bound the float intermediates (the blurs' budget).
_CHUNK_PIXELS = 2**20


@register("snow")
def snow(x: np.ndarray, param: tuple, rngs: list, profile: str) -> np.ndarray:
    loc, scale, z, thr, radius, sigma, b = param
    n, h, w, c = x.shape
    out = np.empty(x.shape, np.uint8)
    for sl in chunks(n, h * w, _CHUNK_PIXELS):
        m = sl.stop - sl.start
        # The original draws the layer, then the blur angle, per image: the same order lets its stream be replayed.
        layers = np.empty((m, h, w), np.float64)
        angles = np.empty(m, np.float64)
        for i, rng in enumerate(rngs[sl]):
            layers[i] = rng.normal(loc, scale, (h, w))
            angles[i] = rng.uniform(-135, -45)
        layers = clipped_zoom_batch(layers, z)
        layers[layers < thr] = 0
        # The layer travels as an 8-bit greyscale PNG (truncated) through ImageMagick and back.
        layer8 = (np.clip(layers, 0, 1) * 255).astype(np.uint8)
        flakes = motion_blur_batch(layer8[..., None], radius, sigma, angles) / 255.0

        im = x[sl].astype(np.float32) / np.float32(255)
        if c == 3:  # cv2.cvtColor(RGB2GRAY) in float32
            grey = im[..., :1] * np.float32(0.299) + im[..., 1:2] * np.float32(0.587) + im[..., 2:] * np.float32(0.114)
        else:
            grey = im
        im = b * im + (1 - b) * np.maximum(im, grey * np.float32(1.5) + np.float32(0.5))
        out[sl] = to_uint8(im + flakes + flakes[:, ::-1, ::-1])
    return out


@register_torch("snow")
def snow_torch(x: torch.Tensor, param: tuple, rngs: list, profile: str) -> torch.Tensor:
    loc, scale, z, thr, radius, sigma, b = param
    n, h, w, c = x.shape
    # The layer, then the angle, per image (the numpy engine's order).
    draws = per_image(lambda rng: (rng.normal(loc, scale, (h, w)), rng.uniform(-135, -45)), rngs, pixels=h * w)
    angles = np.array([a for _, a in draws], np.float64)
    lay = clipped_zoom_tensor(dev(np.stack([layer for layer, _ in draws]), x), z)
    lay = torch.where(lay < thr, 0.0, lay)
    layer8 = (lay.clamp(0, 1) * 255).to(torch.uint8)
    flakes = div(motion_blur_tensor(layer8[..., None], radius, sigma, angles).to(F64), 255.0)
    im = div(x.to(torch.float32), 255.0)
    # cv2.cvtColor(RGB2GRAY) in float32 for colour images.
    grey = im[..., :1] * 0.299 + im[..., 1:2] * 0.587 + im[..., 2:] * 0.114 if c == 3 else im
    im = b * im + (1 - b) * torch.maximum(im, grey * 1.5 + 0.5)
    return im + flakes + flakes.flip(1, 2)
