"""Digital corruptions (brightness, saturate, elastic transform, pixelate, JPEG) against the original code's outputs.

The fixtures in ../shared were made with the original scripts (scikit-image HSV, OpenCV 3.4 warpAffine, scipy
map_coordinates, Pillow). elastic_transform is the only random one here: it is replayed with
``np.random.RandomState(i)`` for fixture image i, as the original seeded the global RNG with i. The other four are
deterministic, so the engine's own seed must not matter. The building blocks that replace library calls for speed
(HSV arithmetic, Gaussian smoothing, bilinear lookup, cv2 JPEG) are also checked against those libraries directly.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
import pytest
from PIL import Image

from bnadapt.corruptions import REGISTRY as _REGISTRY
from bnadapt.corruptions import corrupt, digital, to_uint8
from bnadapt.corruptions.digital import _hsv_roundtrip, _map_coordinates_reflect, _smooth, nearest_exact_is_box
from bnadapt.corruptions.params import TABLES
from conftest import reference_set, replay

NAMES = ["brightness", "saturate", "elastic_transform", "pixelate", "jpeg_compression"]


@pytest.mark.shared
@pytest.mark.parametrize("profile", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", NAMES)
def test_replays_original(shared, profile, name):
    """Measured on the fixtures: every cell of all five corruptions, both profiles, is byte-identical (fraction of
    exact bytes 1.0, max |diff| 0). The issue's target is asserted for all (>= 99% within +-1); exactness is asserted
    too for the parts that are pure numpy / cv2.remap arithmetic and do not depend on a JPEG library build."""
    clean = reference_set(profile)["clean"]
    for s in range(1, 6):
        ours = replay(name, profile, s, clean)
        diff = np.abs(ours.astype(int) - reference_set(profile)[name][s - 1].astype(int))
        assert (diff <= 1).mean() >= 0.99, (name, profile, s, (diff <= 1).mean())
        if name in ("brightness", "saturate", "elastic_transform"):
            assert (diff == 0).mean() >= 0.999, (name, profile, s, (diff == 0).mean())


@pytest.mark.shared
@pytest.mark.parametrize("profile", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", ["brightness", "saturate", "pixelate", "jpeg_compression"])
def test_deterministic_through_engine(shared, profile, name):
    clean = reference_set(profile)["clean"]
    for s in (1, 5):
        ours = corrupt(clean, name, s, profile=profile, seed=123)
        assert np.array_equal(ours, corrupt(clean, name, s, profile=profile, seed=9))
        diff = np.abs(ours.astype(int) - reference_set(profile)[name][s - 1].astype(int))
        assert (diff <= 1).mean() >= 0.99, (name, profile, s)


def _skimage_hsv(x: np.ndarray, channel: int, mul: float, add: float) -> np.ndarray:
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(x / 255.0)
    hsv[..., channel] = np.clip(hsv[..., channel] * mul + add, 0, 1)
    return to_uint8(hsv2rgb(hsv))


def test_hsv_roundtrip_matches_skimage_bytes():
    # A grid of colours with every edge case: greys, black, primaries, ties between channels, both ends of the hue.
    levels = np.r_[0:256:8, 1, 127, 128, 254, 255].astype(np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(1, -1, 3)
    for channel, table in ((2, "brightness"), (1, "saturate")):
        for profile in ("imagenet", "cifar"):
            for param in TABLES[profile][table]:
                mul, add = (1.0, param) if channel == 2 else param
                ref = _skimage_hsv(grid, channel, mul, add)
                ours = _REGISTRY[table].fn(grid, param, [], profile)
                assert np.array_equal(ours, ref), (table, param)


def test_hsv_chunking_is_invisible():
    x = np.random.default_rng(0).integers(0, 256, (3, 70, 90, 3), dtype=np.uint8)  # > one chunk, ragged end

    def adjust(s: np.ndarray, v: np.ndarray) -> None:
        s *= 2

    whole = _hsv_roundtrip(x, adjust)
    assert np.array_equal(whole[1:2], _hsv_roundtrip(x[1:2], adjust))


@pytest.mark.parametrize(("shape", "sigma"), [((4, 32, 32), 6.4), ((4, 32, 40), 0.96), ((2, 60, 45), 47.0)])
def test_smooth_matches_skimage_gaussian(shape, sigma):
    from skimage.filters import gaussian

    fields = np.random.default_rng(1).uniform(-1, 1, shape)
    ref = np.stack([gaussian(f, sigma, mode="reflect", truncate=3) for f in fields])
    np.testing.assert_allclose(_smooth(fields, sigma), ref, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("shape", "scale"),
    [((2, 40, 33, 3), 30.0), ((3, 32, 32, 1), 2.0), ((1, 200, 180, 3), 5.0)],  # last: row bands
)
def test_bilinear_lookup_matches_scipy_bytes(shape, scale):
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(2)
    n, h, w, c = shape
    img = rng.random(shape).astype(np.float32)
    dy = rng.normal(0, scale, (n, h, w)).astype(np.float32)
    dx = rng.normal(0, scale, (n, h, w)).astype(np.float32)
    # Columns on and just past every kind of border, where scipy's "reflect" folding and tap clamping kick in.
    targets = np.array([-0.3, -0.5, -1.0, -1.5, w - 1, w - 0.5, w, 2 * w, -2 * w - 0.25, 3 * w + 0.5])
    dx[0, 0, : len(targets)] = targets - np.arange(len(targets))
    ours = _map_coordinates_reflect(img, dy, dx)
    for i in range(n):
        xg, yg, zg = np.meshgrid(np.arange(w), np.arange(h), np.arange(c))
        coords = [(yg + dy[i][..., None]).ravel(), (xg + dx[i][..., None]).ravel(), zg.ravel()]
        ref = map_coordinates(img[i], coords, order=1, mode="reflect").reshape(h, w, c)
        assert np.array_equal(ours[i], ref)


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 45, 61, 3), (2, 40, 36, 1)])
def test_jpeg_matches_pillow_round_trip(shape):
    """The cv2 path must give Pillow's bytes (the original's `x.save(output, 'JPEG', quality=c)`)."""
    x = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    x[0] = np.linspace(0, 255, shape[1] * shape[2] * shape[3]).reshape(shape[1:]).astype(np.uint8)  # smooth image
    for quality in sorted({q for t in TABLES.values() for q in t["jpeg_compression"]}):
        ours = _REGISTRY["jpeg_compression"].fn(x, quality, [], "cifar")
        for i in range(len(x)):
            buf = BytesIO()
            Image.fromarray(x[i, ..., 0] if shape[-1] == 1 else x[i]).save(buf, "JPEG", quality=quality)
            ref = np.asarray(Image.open(buf)).reshape(shape[1:])
            assert np.array_equal(ours[i], ref), quality


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(2, 37, 50, 3), (2, 33, 32, 1), (1, 64, 64, 3)])
def test_any_size_and_grey(name, shape):
    x = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
    for profile in ("cifar", "imagenet"):
        y = corrupt(x, name, 5, profile=profile, seed=0)
        assert y.shape == x.shape and y.dtype == np.uint8
        assert not np.array_equal(y, x), (name, profile)


def test_elastic_seeded_and_split_invariant():
    x = np.random.default_rng(5).integers(0, 256, (6, 32, 40, 3), dtype=np.uint8)
    for profile in ("cifar", "imagenet"):
        whole = corrupt(x, "elastic_transform", 3, profile=profile, seed=7)
        assert np.array_equal(whole, corrupt(x, "elastic_transform", 3, profile=profile, seed=7))
        parts = [corrupt(x[a:b], "elastic_transform", 3, profile=profile, seed=7, start=a) for a, b in ((0, 1), (1, 6))]
        assert np.array_equal(whole, np.concatenate(parts))
        np.random.seed(1)  # the global RNG must not matter
        assert np.array_equal(whole, corrupt(x, "elastic_transform", 3, profile=profile, seed=7))
        assert not np.array_equal(whole, corrupt(x, "elastic_transform", 3, profile=profile, seed=8))


def test_elastic_chunks_are_invisible():
    # Enough 32x32 images for several internal chunks: each image's output must not depend on its neighbours.
    x = np.random.default_rng(6).integers(0, 256, (200, 32, 32, 3), dtype=np.uint8)
    whole = corrupt(x, "elastic_transform", 2, profile="cifar", seed=1)
    assert np.array_equal(whole[150:], corrupt(x[150:], "elastic_transform", 2, profile="cifar", seed=1, start=150))


def test_pixelate_blocks_and_jpeg_quality_order():
    x = np.random.default_rng(7).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    # Stronger severities lose more detail.
    err = [np.abs(corrupt(x, "jpeg_compression", s, profile="cifar").astype(int) - x).mean() for s in (1, 5)]
    assert err[0] < err[1]
    px = corrupt(x, "pixelate", 5, profile="imagenet")  # 0.25: 8x8 blocks of 4x4 pixels
    assert np.array_equal(px, px[:, ::4, ::4].repeat(4, axis=1).repeat(4, axis=2))


@pytest.mark.parametrize("by_numpy", [False, True])
@pytest.mark.parametrize(
    ("shape", "c"),
    [
        ((3, 224, 224, 3), 0.6),
        ((2, 224, 224, 3), 0.25),
        ((4, 37, 53, 3), 0.65),
        ((3, 41, 33, 1), 0.4),
        ((2, 10, 10, 3), 0.4),
        ((2, 15, 9, 1), 0.3),
    ],
)
def test_pixelate_is_pillows_two_box_resizes(monkeypatch, shape, c, by_numpy):
    """Byte for byte the original's per-image PIL calls, on odd sizes, grey, a strided batch, by either way up."""
    if by_numpy:  # the way up where cv2's nearest-neighbour picks other pixels than BOX (e.g. 4 -> 10)
        monkeypatch.setattr(digital, "nearest_exact_is_box", lambda *a: False)
    x = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)[:, ::-1]
    (h, w), box = shape[1:3], Image.Resampling.BOX
    small = (int(w * c), int(h * c))
    ref = [
        np.asarray(Image.fromarray(im.squeeze(-1) if shape[-1] == 1 else im).resize(small, box).resize((w, h), box))
        for im in x
    ]
    assert np.array_equal(digital.pixelate(x, c, [], "imagenet"), np.stack(ref).reshape(x.shape))


def test_nearest_exact_probe_tells_the_sizes_apart():
    assert nearest_exact_is_box((134, 134), (224, 224), 3)  # ImageNet, severity 1: the fast way up
    assert not nearest_exact_is_box((4, 4), (10, 10), 3)  # cv2 copies another pixel than BOX for some output pixels
