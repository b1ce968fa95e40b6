"""Property tests over every corruption: shape, dtype, determinism and batch-split invariance on random inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnadapt import corrupt, corruption_names

ALL = corruption_names("all")


@st.composite
def batches(draw):
    n = draw(st.integers(1, 3))
    h = draw(st.integers(32, 56))
    w = draw(st.integers(32, 56))
    c = draw(st.sampled_from([1, 3]))
    kind = draw(st.sampled_from(["random", "black", "white", "flat"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if kind == "random":
        x = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    else:
        value = {"black": 0, "white": 255, "flat": int(rng.integers(0, 256))}[kind]
        x = np.full((n, h, w, c), value, np.uint8)
    return x


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=batches(), severity=st.integers(1, 5), profile=st.sampled_from(["cifar", "imagenet"]),
       seed=st.integers(0, 2**31))  # fmt: skip
def test_shape_dtype_determinism_split(name, x, severity, profile, seed):
    y = corrupt(x, name, severity, profile=profile, seed=seed)
    assert y.shape == x.shape and y.dtype == np.uint8
    assert np.array_equal(y, corrupt(x, name, severity, profile=profile, seed=seed))
    tail = corrupt(x[1:], name, severity, profile=profile, seed=seed, start=1)
    assert np.array_equal(y[1:], tail)


def test_every_name_has_constants_and_an_implementation():
    from bnadapt.corruptions import REGISTRY as _REGISTRY
    from bnadapt.corruptions.params import TABLES

    assert set(ALL) == set(TABLES["imagenet"]) == set(TABLES["cifar"]) == set(_REGISTRY)
    assert all(len(TABLES[p][n]) == 5 for p in TABLES for n in ALL)


@pytest.mark.parametrize("name", ALL)
def test_single_image_and_global_rng_independence(name):
    x = np.random.default_rng(0).integers(0, 256, (2, 40, 36, 3), dtype=np.uint8)
    np.random.seed(123)
    a = corrupt(x, name, 3, profile="cifar", seed=5)
    np.random.seed(456)
    b = corrupt(x[1], name, 3, profile="cifar", seed=5, start=1)
    assert b.shape == (40, 36, 3) and np.array_equal(a[1], b)


RANDOM = [n for n in ALL if n not in ("defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate",
                                      "jpeg_compression", "gaussian_blur", "saturate")]  # fmt: skip


@pytest.mark.parametrize("name", RANDOM)
def test_random_corruptions_depend_on_the_seed(name):
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert not np.array_equal(
        corrupt(x, name, 5, profile="cifar", seed=7), corrupt(x, name, 5, profile="cifar", seed=8)
    )
