"""Defocus, glass, motion and zoom blur and snow against the original code's outputs (../shared fixtures).

All five replay the original exactly: glass blur, motion blur and snow draw their random numbers in the original's
order, so ``np.random.RandomState(i)`` as fixture image i's generator reproduces the reference bytes; the remaining
differences are float rounding before the original's truncation to uint8 (at most 1, on well under 1% of values).
The building blocks are also checked against literal implementations of the original algorithms.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import zoom as scizoom

from bnadapt.corruptions import REGISTRY as _REGISTRY
from bnadapt.corruptions import corrupt, to_uint8
from bnadapt.corruptions._motion import motion_blur_batch, motion_offsets, motion_weights
from bnadapt.corruptions.blur import clipped_zoom_batch, glass_shuffle_map
from bnadapt.corruptions.params import TABLES
from conftest import reference_set, replay

NAMES = ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "snow"]
RANDOM = ["glass_blur", "motion_blur", "snow"]


@pytest.mark.shared
@pytest.mark.parametrize("profile", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", NAMES)
def test_replays_original(shared, profile, name):
    clean = reference_set(profile)["clean"]
    expected = reference_set(profile)[name]
    for s in range(1, 6):
        diff = np.abs(replay(name, profile, s, clean).astype(int) - expected[s - 1].astype(int))
        # The target is 99% within 1; the measured match is 100% within 1 and >= 99.7% exact.
        assert (diff <= 1).mean() >= 0.999, (name, s, (diff <= 1).mean())
        assert (diff == 0).mean() >= 0.99, (name, s, (diff == 0).mean())


@pytest.mark.shared
@pytest.mark.parametrize("profile", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", ["defocus_blur", "zoom_blur"])
def test_deterministic_through_engine(shared, profile, name):
    clean = reference_set(profile)["clean"]
    expected = reference_set(profile)[name]
    for s in (1, 5):
        diff = np.abs(corrupt(clean, name, s, profile=profile, seed=3).astype(int) - expected[s - 1].astype(int))
        assert (diff <= 1).mean() >= 0.999, (name, s, (diff <= 1).mean())


@pytest.mark.shared
@pytest.mark.parametrize("name", RANDOM)
def test_engine_generators_give_the_original_strength(shared, name):
    """The engine's own generators draw from the original's distributions: mean |out - clean| per severity within 5%
    of the replayed original's over 8 x 16 CIFAR draws (measured ratios 0.98-1.02)."""
    x = np.tile(reference_set("cifar")["clean"], (8, 1, 1, 1))
    fn = _REGISTRY[name].fn
    for s in range(1, 6):
        param = TABLES["cifar"][name][s - 1]
        original = to_uint8(fn(x, param, [np.random.RandomState(1000 + j) for j in range(len(x))], "cifar"))
        ours = corrupt(x, name, s, profile="cifar", seed=0)
        ratio = np.abs(ours.astype(int) - x).mean() / np.abs(original.astype(int) - x).mean()
        assert abs(ratio - 1) < 0.05, (name, s, ratio)


def _glass_loop(img: np.ndarray, d: int, iters: int, rng: np.random.RandomState) -> np.ndarray:
    """The original's pixel loop, generalised to H x W."""
    x = img.copy()
    h, w = x.shape[:2]
    for _ in range(iters):
        for hh in range(h - d, d, -1):
            for ww in range(w - d, d, -1):
                dx, dy = rng.randint(-d, d, size=(2,))
                hp, wp = hh + dy, ww + dx
                x[hh, ww], x[hp, wp] = x[hp, wp], x[hh, ww]
    return x


@pytest.mark.parametrize(("d", "iters"), [(1, 2), (2, 1), (3, 2), (4, 3)])
def test_glass_shuffle_matches_original_loop(d, iters):
    h, w = 34, 41
    ids = np.arange(2 * h * w).reshape(2, h, w, 1)
    expected = np.stack([_glass_loop(ids[i], d, iters, np.random.RandomState(10 + i)) for i in range(2)])
    src = glass_shuffle_map((2, h, w), d, iters, [np.random.RandomState(10 + i) for i in range(2)])
    assert np.array_equal(ids.reshape(-1)[src].reshape(ids.shape), expected)


def _motion_direct(img: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """Per-tap clamped reads in float64, then the Q16 round and 8-bit truncation."""
    k = motion_weights(radius, sigma)
    off = motion_offsets(len(k), np.array([angle]))[0]
    h, w = img.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w]
    acc = sum(
        kk * img[np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, w - 1)] for (dx, dy), kk in zip(off, k, strict=True)
    )
    return (np.floor(acc * 257.0 + 0.5) // 257).astype(np.uint8)


def test_motion_blur_matches_direct_sum():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 33, 40, 3), dtype=np.uint8)
    angles = rng.uniform(-180, 180, 12)
    ours = motion_blur_batch(x, 6, 2.5, angles)
    expected = np.stack([_motion_direct(x[i].astype(np.float64), 6, 2.5, angles[i]) for i in range(12)])
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_motion_kernel_facts():
    # GetOptimalKernelWidth1D: 2 ceil(radius) + 1 taps; one-sided Gaussian normalised to 1.
    k = motion_weights(10, 3)
    assert len(k) == 21 and np.isclose(k.sum(), 1) and np.all(np.diff(k) < 0)
    assert np.array_equal(motion_offsets(5, np.array([0.0]))[0], [[i, 0] for i in range(5)])
    assert np.array_equal(motion_offsets(5, np.array([-90.0]))[0], [[0, -i] for i in range(5)])
    assert np.array_equal(motion_offsets(3, np.array([45.0]))[0], [[0, 0], [1, 1], [1, 1]])  # ceil(x - 0.5)


def _clipped_zoom(img: np.ndarray, z: float) -> np.ndarray:
    """The original's clipped_zoom (square images)."""
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    img = scizoom(img[top : top + ch, top : top + ch], (z, z, 1), order=1)
    trim = (img.shape[0] - h) // 2
    return img[trim : trim + h, trim : trim + h]


@pytest.mark.parametrize("size", [32, 57, 96])
def test_clipped_zoom_matches_scipy(size):
    x = np.random.default_rng(size).random((2, size, size, 3))
    for z in [*TABLES["imagenet"]["zoom_blur"][4][1::3], 1.75, 2.25, 3.0, 4.5]:
        expected = np.stack([_clipped_zoom(im, z) for im in x])
        assert np.abs(clipped_zoom_batch(x, z) - expected).max() < 1e-12, z


def test_zoom_blur_matches_scipy_sum():
    x = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    zooms = TABLES["imagenet"]["zoom_blur"][2]
    im = (x / 255.0).astype(np.float32)
    expected = [(im[i] + sum(_clipped_zoom(im[i], z) for z in zooms)) / (len(zooms) + 1) for i in range(3)]
    diff = np.abs(corrupt(x, "zoom_blur", 3).astype(int) - to_uint8(np.stack(expected)).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99


@pytest.mark.parametrize("name", NAMES)
def test_seeded_split_invariant_and_shapes(name):
    x = np.random.default_rng(0).integers(0, 256, (5, 36, 44, 3), dtype=np.uint8)
    whole = corrupt(x, name, 4, profile="cifar", seed=7)
    assert whole.shape == x.shape and whole.dtype == np.uint8
    parts = [corrupt(x[a:b], name, 4, profile="cifar", seed=7, start=a) for a, b in ((0, 2), (2, 3), (3, 5))]
    assert np.array_equal(whole, np.concatenate(parts))
    np.random.seed(1)  # the global RNG must not matter
    assert np.array_equal(whole, corrupt(x, name, 4, profile="cifar", seed=7))
    if name in RANDOM:
        assert not np.array_equal(whole, corrupt(x, name, 4, profile="cifar", seed=8))
    grey = corrupt(x[:2, :, :, :1], name, 2, profile="imagenet", seed=0)
    assert grey.shape == (2, 36, 44, 1) and grey.dtype == np.uint8


@pytest.mark.parametrize("name", ["defocus_blur", "glass_blur", "motion_blur", "zoom_blur"])
def test_blurs_keep_a_flat_image_flat(name):
    x = np.full((2, 40, 32, 3), 200, np.uint8)
    y = corrupt(x, name, 3, profile="imagenet", seed=0).astype(int)
    assert np.abs(y - 200).max() <= 1


def test_defocus_brightens_like_the_original_at_imagenet_severity_4_and_5():
    """The original's disk touches its grid's edge for radius 8 and 10, and cv2.GaussianBlur's reflect-101 border
    folds mass back in: the kernels sum to 1.013 and 1.011, so flat regions get ~1% brighter (the fixtures agree)."""
    x = np.full((1, 32, 32, 3), 200, np.uint8)
    assert np.all(corrupt(x, "defocus_blur", 4) == 202) and np.all(corrupt(x, "defocus_blur", 5) == 202)
