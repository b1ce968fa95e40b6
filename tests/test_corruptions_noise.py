"""Noise and the simplest deterministic corruptions against the original code's outputs (../shared fixtures).

Random corruptions are checked by replaying the original call sequence: the original seeds numpy's legacy global
RNG with the fixture index i, so passing ``np.random.RandomState(i)`` as the image's generator must reproduce the
reference bytes exactly. The same functions are then checked to be seeded and batch-split invariant with the
engine's own generators.
"""

from __future__ import annotations

import numpy as np
import pytest

from bnadapt.corruptions import corrupt, corruption_names
from conftest import reference_set, replay


@pytest.mark.shared
@pytest.mark.parametrize("profile", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"])
def test_noise_replays_original_exactly(shared, profile, name):
    ref = reference_set(profile)
    for s in range(1, 6):
        ours = replay(name, profile, s, ref["clean"])
        diff = np.abs(ours.astype(int) - ref[name][s - 1].astype(int))
        assert (diff <= 1).mean() >= 0.99, (name, s, (diff <= 1).mean())


@pytest.mark.shared
@pytest.mark.parametrize("profile", ["cifar", "imagenet"])
@pytest.mark.parametrize("name", ["gaussian_blur", "contrast"])
def test_deterministic_match_reference(shared, profile, name):
    ref = reference_set(profile)
    for s in range(1, 6):
        ours = corrupt(ref["clean"], name, s, profile=profile, seed=123)
        diff = np.abs(ours.astype(int) - ref[name][s - 1].astype(int))
        assert (diff <= 1).mean() >= 0.99, (name, s, (diff <= 1).mean())


def test_torch_in_torch_out_and_grey():
    import torch

    x = torch.full((2, 32, 32, 1), 100, dtype=torch.uint8)
    y = corrupt(x, "gaussian_noise", 5, profile="cifar", seed=0)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.uint8 and y.shape == x.shape
    assert (y != x).any()


def test_names_in_canonical_order():
    assert corruption_names("common")[:4] == ["gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur"]
    assert len(corruption_names("all")) == 19
    assert corruption_names("extra") == ["speckle_noise", "gaussian_blur", "spatter", "saturate"]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"name": "fogg"}, ValueError, "expected a corruption name"),
        ({"severity": 0}, ValueError, "severity"),
        ({"severity": 6}, ValueError, "severity"),
        ({"profile": "mnist"}, ValueError, "profile"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = {"name": "contrast", "severity": 1, "profile": "cifar"} | kwargs
    with pytest.raises(exc, match=match):
        corrupt(np.zeros((1, 32, 32, 3), np.uint8), **args)


@pytest.mark.parametrize(
    ("images", "exc"),
    [
        (np.zeros((1, 32, 32, 3), np.float32), TypeError),
        (np.zeros((1, 32, 32, 4), np.uint8), ValueError),
        (np.zeros((1, 3, 32, 32), np.uint8), ValueError),
        (np.zeros((1, 16, 16, 3), np.uint8), ValueError),
    ],
)
def test_bad_images(images, exc):
    with pytest.raises(exc):
        corrupt(images, "contrast", 1, profile="cifar")
