"""Digital corruptions: brightness, contrast, saturation, elastic transform, pixelation, JPEG."""

from __future__ import annotations

import numpy as np

from . import register


@register("contrast")
def contrast(x: np.ndarray, c: float, rngs: list, profile: str) -> np.ndarray:
    im = x / 255.0
    means = im.mean(axis=(1, 2), keepdims=True)
    return (im - means) * c + means
