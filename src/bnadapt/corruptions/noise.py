"""Noise corruptions: additive, multiplicative and photon noise, salt and pepper (numpy and torch variants)."""

from __future__ import annotations

import numpy as np
import torch

from .registry import register, register_torch, to_uint8
from .torch_path import F64, div, drawn, unit


def _each(x: np.ndarray, rngs: list, draw) -> np.ndarray:
    # Image by image: each image owns its random stream, and float64 temporaries stay one image large.
    out = np.empty(x.shape, np.uint8)
    for i, rng in enumerate(rngs):
        out[i] = to_uint8(draw(x[i] / 255.0, rng))
    return out


@register("gaussian_noise")
def gaussian_noise(x: np.ndarray, c: float, rngs: list, profile: str) -> np.ndarray:
    return _each(x, rngs, lambda im, rng: im + rng.normal(size=im.shape, scale=c))


@register_torch("gaussian_noise")
def gaussian_noise_torch(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    shape = x.shape[1:]
    return unit(x) + drawn(lambda rng: rng.normal(size=shape, scale=c), x, rngs)


@register("shot_noise")
def shot_noise(x: np.ndarray, c: float, rngs: list, profile: str) -> np.ndarray:
    return _each(x, rngs, lambda im, rng: rng.poisson(im * c) / c)


@register_torch("shot_noise")
def shot_noise_torch(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    # numpy's Poisson draw takes the rate per pixel: the images go to the host (uint8) and the counts come back.
    counts = drawn(lambda rng, im: rng.poisson(im / 255.0 * c).astype(np.int32), x, rngs, x.cpu().numpy())
    return div(counts.to(F64), c)


@register("speckle_noise")
def speckle_noise(x: np.ndarray, c: float, rngs: list, profile: str) -> np.ndarray:
    return _each(x, rngs, lambda im, rng: im + im * rng.normal(size=im.shape, scale=c))


@register_torch("speckle_noise")
def speckle_noise_torch(x: torch.Tensor, c: float, rngs: list, profile: str) -> torch.Tensor:
    shape = x.shape[1:]
    im = unit(x)
    return im + im * drawn(lambda rng: rng.normal(size=shape, scale=c), x, rngs)


@register("impulse_noise")
def impulse_noise(x: np.ndarray, amount: float, rngs: list, profile: str) -> np.ndarray:
    def draw(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # scikit-image's salt & pepper: each element is flipped with probability `amount`, to 1 or 0 with equal odds.
        flip = rng.random(im.shape) < amount
        salt = rng.random(im.shape) < 0.5
        out = im.copy()
        out[flip & salt] = 1.0
        out[flip & ~salt] = 0.0
        return out

    return _each(x, rngs, draw)


@register_torch("impulse_noise")
def impulse_noise_torch(x: torch.Tensor, amount: float, rngs: list, profile: str) -> torch.Tensor:
    # The two uniform draws per element are compared on the host (exactly the numpy comparisons) and travel as masks.
    shape = x.shape[1:]
    masks = drawn(lambda rng: np.stack([rng.random(shape) < amount, rng.random(shape) < 0.5], axis=-1), x, rngs)
    flip, salt = masks[..., 0], masks[..., 1]
    im = unit(x)
    im = torch.where(flip & salt, 1.0, im)
    return torch.where(flip & ~salt, 0.0, im)
