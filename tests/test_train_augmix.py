"""benchmarks/train_augmix.py's pieces: the Jensen-Shannon loss and the three views of an image."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

_spec = importlib.util.spec_from_file_location(
    "train_augmix", Path(__file__).resolve().parents[1] / "benchmarks" / "train_augmix.py"
)
train_augmix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_augmix)


def test_jsd_loss_is_cross_entropy_when_the_views_agree_and_grows_when_they_do_not():
    g = torch.Generator().manual_seed(0)
    clean, y = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    same = train_augmix.jsd_loss(torch.cat([clean, clean, clean]), y)
    torch.testing.assert_close(same, F.cross_entropy(clean, y))
    apart = train_augmix.jsd_loss(torch.cat([clean, torch.randn(8, 10, generator=g), clean]), y)
    assert apart > same + 0.01


def test_views_are_a_crop_of_the_image_and_two_different_augmix_mixes():
    torch.manual_seed(0)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    views, label = train_augmix.AugMixViews(x, np.array([3, 7]))[1]
    assert views.shape == (3, 3, 32, 32) and views.dtype == torch.float32 and label == 7
    assert float(views.min()) >= 0 and float(views.max()) <= 1
    assert not torch.equal(views[1], views[2]) and not torch.equal(views[0], views[1])
    # The clean view is the image shifted by at most 4 pixels (zero padding) and maybe flipped: its values are the
    # image's own values or 0.
    values = set((torch.from_numpy(x[1]).float() / 255).flatten().tolist()) | {0.0}
    assert set(views[0].flatten().tolist()) <= values
