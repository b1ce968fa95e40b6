"""Noise corruptions: additive, multiplicative and photon noise, salt and pepper."""

from __future__ import annotations

import numpy as np

from . import register, to_uint8


def _each(x: np.ndarray, rngs: list, draw) -> np.ndarray:
    # Image by image: each image owns its random stream, and float64 temporaries stay one image large.
    out = np.empty(x.shape, np.uint8)
    for i, rng in enumerate(rngs):
        out[i] = to_uint8(draw(x[i] / 255.0, rng))
    return out


@register("gaussian_noise")
def gaussian_noise(x: np.ndarray, c: float, rngs: list, profile: str) -> np.ndarray:
    return _each(x, rngs, lambda im, rng: im + rng.normal(size=im.shape, scale=c))


@register("shot_noise")
def shot_noise(x: np.ndarray, c: float, rngs: list, profile: str) -> np.ndarray:
    return _each(x, rngs, lambda im, rng: rng.poisson(im * c) / c)


@register("speckle_noise")
def speckle_noise(x: np.ndarray, c: float, rngs: list, profile: str) -> np.ndarray:
    return _each(x, rngs, lambda im, rng: im + im * rng.normal(size=im.shape, scale=c))


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
