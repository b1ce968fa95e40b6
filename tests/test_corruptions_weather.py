"""Frost, fog and spatter against the original code's outputs (../shared fixtures), plus their generalisations.

The original seeds numpy's legacy global RNG with the fixture index i; each function here draws its numbers in the
original order (texture index then crop offsets; the plasma fractal's octaves; the liquid layer), so passing
``np.random.RandomState(i)`` reproduces the reference. Measured on the fixtures: every cell of the three corruptions x
5 severities x both profiles is bit-identical (100.000% exact), including CIFAR spatter s3, where 4 liquid pixels
exceed 255 and wrap around as in the original.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from bnadapt.corruptions import corrupt, to_uint8
from bnadapt.corruptions.weather import FROST_FILES, fog_map_size, plasma_fractal, spatter
from conftest import reference_set, replay

NAMES = ["frost", "fog", "spatter"]


@pytest.mark.shared
@pytest.mark.parametrize("profile", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", NAMES)
def test_replays_original(shared, profile, name):
    ref = reference_set(profile)
    for s in range(1, 6):
        ours = replay(name, profile, s, ref["clean"])
        diff = np.abs(ours.astype(int) - ref[name][s - 1].astype(int))
        # The target; on the reference machine the match is exact (see the module docstring).
        assert (diff <= 1).mean() >= 0.99, (name, profile, s, (diff <= 1).mean())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("profile", "shape"), [("cifar", (2, 130, 70, 3)), ("imagenet", (1, 400, 250, 1))])
def test_large_non_square_and_grey(name, profile, shape):
    # 130 px exceeds every CIFAR-sized texture (63..120 px) and 400 px every full texture (315..600): they are enlarged.
    x = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    y = corrupt(x, name, 5, profile=profile, seed=0)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert np.abs(y.astype(int) - x).mean() > 1


def test_fog_map_covers_the_image():
    assert fog_map_size("cifar", 32, 32) == 32
    assert fog_map_size("cifar", 33, 20) == 64
    assert fog_map_size("imagenet", 224, 224) == 256
    assert fog_map_size("imagenet", 100, 300) == 512
    maps = plasma_fractal([np.random.default_rng(i) for i in range(3)], 64, 2.0)
    assert maps.shape == (3, 64, 64)
    assert np.allclose(maps.min(axis=(1, 2)), 0) and np.allclose(maps.max(axis=(1, 2)), 1)
    assert not np.allclose(maps[0], maps[1])


def test_plasma_stream_matches_successive_uniform_draws():
    """One rng.random call per map replaces the original's many np.random.uniform calls: same numbers, same order."""
    size = 32
    counts = [3 * (size // step) ** 2 for step in (32, 16, 8, 4, 2)]
    a, b = np.random.RandomState(5), np.random.RandomState(5)
    plasma_fractal([a], size, 2.0)
    for k in counts:
        b.uniform(-1.0, 1.0, k)
    assert a.random_sample() == b.random_sample()


def test_frost_dir_override(monkeypatch, tmp_path):
    # Constant textures make the expected output a closed form: a * x + b * value, truncated.
    values = [10, 20, 30, 40, 50]
    for name, v in zip(FROST_FILES, values, strict=True):
        # PNG bytes under every name (cv2 sniffs the content), so that the .jpg ones decode losslessly.
        cv2.imencode(".png", np.full((300, 400, 3), v, np.uint8))[1].tofile(tmp_path / name)
    monkeypatch.setenv("BNADAPT_FROST_DIR", str(tmp_path))
    x = np.full((4, 224, 224, 3), 100, np.uint8)
    y = corrupt(x, "frost", 1, profile="imagenet", seed=0)  # (a, b) = (1, 0.4)
    expected = {int(100 + 0.4 * v) for v in values}
    assert {int(v) for v in np.unique(y)} <= expected
    assert np.array_equal(y, corrupt(x, "frost", 1, profile="imagenet", seed=0))


def test_frost_missing_textures(monkeypatch, tmp_path):
    monkeypatch.setenv("BNADAPT_FROST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="BNADAPT_FROST_DIR") as err:
        corrupt(np.zeros((1, 32, 32, 3), np.uint8), "frost", 1, profile="cifar")
    assert str(tmp_path) in str(err.value) and "\n" not in str(err.value)


def test_spatter_without_water_leaves_the_image():
    # A threshold no liquid reaches gives an empty map; the original would divide 0 by 0 here.
    x = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    y = spatter(x, (0.65, 0.3, 1, 10.0, 0.6, 0), [np.random.default_rng(i) for i in range(2)], "cifar")
    assert np.array_equal(to_uint8(y), x)
