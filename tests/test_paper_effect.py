"""The paper's effect on real data: ResNet-20, CIFAR-10 test images, CIFAR-10-C gaussian noise severity 5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnadapt import adapt, corrupt, load_model
from bnadapt.data import to_float_nchw


@pytest.mark.shared
def test_replace_n32_recovers_over_20_points_on_gaussian_noise_s5(shared):
    d = np.load(shared / "data" / "cifar10" / "test1000_lossless.npz")
    ck = next((shared / "data" / "weights" / "akamaster_cifar10_resnet").glob("resnet20-*.th"))
    model = load_model("cifar10_resnet20", checkpoint=ck)
    x = corrupt(d["x"], "gaussian_noise", 5, profile="cifar", seed=0)  # x + N(0, 0.10)
    xt = to_float_nchw(x)

    def accuracy(m):
        with torch.inference_mode():
            return float((m(xt).argmax(1).numpy() == d["y"]).mean())

    source = accuracy(model)
    replaced = [accuracy(adapt(model, x, method="replace", n=32, seed=s)) for s in range(3)]
    # Measured: source 24.5%, replace 57.4 / 55.9 / 57.0% (seeds 0-2).
    assert min(replaced) > source + 0.20, (source, replaced)
