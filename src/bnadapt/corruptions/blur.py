"""Blur corruptions: defocus, glass, motion, zoom and Gaussian blur."""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from . import register


@register("gaussian_blur")
def gaussian_blur(x: np.ndarray, sigma: float, rngs: list, profile: str) -> np.ndarray:
    # skimage.filters.gaussian(channel_axis=-1): per channel, mode "nearest", truncate 4.
    return gaussian_filter(x / 255.0, sigma=(0, sigma, sigma, 0), mode="nearest", truncate=4.0)
