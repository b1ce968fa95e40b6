"""Adaptation methods: what changes, what must not, reproducibility, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt import BNStats, adapt, estimate_stats, method_names
from bnadapt.adapt import is_online, sample_indices
from conftest import make_tiny


def _images(n=40, seed=0, size=8):
    # [0.5, 1]: images as models take them, brighter than the source statistics expect (a shift to adapt to).
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.5


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_registry_names():
    assert method_names()[:5] == ["source", "replace", "prior", "test-batch", "ema"]
    assert method_names()[-3:] == ["tent", "rbn", "dua"]  # later methods register after the earlier ones
    assert is_online("test-batch") and is_online("ema") and not is_online("replace")


@pytest.mark.parametrize("method", ["source", "replace", "prior", "test-batch", "ema"])
def test_callers_model_is_never_mutated(tiny, method):
    before = _state(tiny)
    out = adapt(tiny, _images(), method=method, n=16)
    with torch.no_grad():
        out(_images(4, seed=5))
    assert out is not tiny
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_replace_changes_only_bn_buffers(tiny):
    x = _images()
    before = _state(tiny)
    out = adapt(tiny, x, method="replace", n=32, seed=3)
    after = out.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"bn{i}.running_{s}" for i in (1, 2, 3) for s in ("mean", "var")}
    idx = torch.from_numpy(sample_indices(40, 32, 3))
    expected = estimate_stats(tiny, x[idx])
    assert all(torch.equal(out.get_submodule(n).running_var, expected.var[n]) for n in expected.names)
    assert not out.training


def test_seed_reproducible_and_seed_sensitive(tiny):
    x = _images(100)
    a = BNStats.from_model(adapt(tiny, x, n=8, seed=1))
    b = BNStats.from_model(adapt(tiny, x, n=8, seed=1))
    c = BNStats.from_model(adapt(tiny, x, n=8, seed=2))
    np.random.seed(0)  # global state must not matter
    torch.manual_seed(0)
    d = BNStats.from_model(adapt(tiny, x, n=8, seed=1))
    assert all(torch.equal(a.mean[n], b.mean[n]) and torch.equal(a.mean[n], d.mean[n]) for n in a.names)
    assert not torch.equal(a.mean["bn1"], c.mean["bn1"])


def test_batch_size_does_not_change_result(tiny):
    x = _images(64)
    a = BNStats.from_model(adapt(tiny, x, n=64, batch_size=64))
    b = BNStats.from_model(adapt(tiny, x, n=64, batch_size=10))
    # Micro-batches change what later layers see in train mode (PreciseBN's approximation), not the first layer.
    torch.testing.assert_close(a.mean["bn1"], b.mean["bn1"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.var["bn1"], b.var["bn1"], rtol=1e-5, atol=1e-6)


def test_prior_interpolates(tiny):
    x = _images()
    src = BNStats.from_model(tiny)
    rep = BNStats.from_model(adapt(tiny, x, method="replace", n=32))
    # The independent order mixes one train-mode measurement linearly (the default, sequential, re-measures).
    opts = {"order": "independent"}
    zero = BNStats.from_model(adapt(tiny, x, method="prior", n=32, prior=0, options=opts))
    half = BNStats.from_model(adapt(tiny, x, method="prior", n=32, prior=32, options=opts))
    for n in src.names:
        torch.testing.assert_close(zero.mean[n], rep.mean[n])
        torch.testing.assert_close(half.var[n], 0.5 * (src.var[n] + rep.var[n]))


def test_part_and_layer_selection(tiny):
    x = _images()
    src = BNStats.from_model(tiny)
    mean_only = BNStats.from_model(adapt(tiny, x, part="mean"))
    assert torch.equal(mean_only.var["bn1"], src.var["bn1"]) and not torch.equal(mean_only.mean["bn1"], src.mean["bn1"])
    var_only = BNStats.from_model(adapt(tiny, x, part="var"))
    assert torch.equal(var_only.mean["bn2"], src.mean["bn2"]) and not torch.equal(var_only.var["bn2"], src.var["bn2"])
    first = BNStats.from_model(adapt(tiny, x, first=1))
    assert not torch.equal(first.mean["bn1"], src.mean["bn1"]) and torch.equal(first.mean["bn3"], src.mean["bn3"])
    last = BNStats.from_model(adapt(tiny, x, last=1))
    assert torch.equal(last.mean["bn1"], src.mean["bn1"]) and not torch.equal(last.mean["bn3"], src.mean["bn3"])
    named = BNStats.from_model(adapt(tiny, x, layers="bn2"))
    assert torch.equal(named.mean["bn1"], src.mean["bn1"]) and not torch.equal(named.mean["bn2"], src.mean["bn2"])


def test_test_batch_uses_each_batch_statistics_even_in_eval():
    net = nn.Sequential(nn.BatchNorm2d(3)).eval()
    out = adapt(net, method="test-batch").eval()
    x = _images(4)
    y = out(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert net[0].running_mean is not None  # the original keeps its buffers


def test_ema_moves_towards_stream():
    net = nn.Sequential(nn.BatchNorm2d(3)).eval()
    out = adapt(net, method="ema", momentum=0.5)
    x = torch.full((2, 3, 4, 4), 0.9) + torch.rand(2, 3, 4, 4) * 0.1
    with torch.no_grad():
        for _ in range(20):
            out(x)
    assert (out[0].running_mean > 0.89).all() and (out[0].running_mean < 1).all()
    warm = adapt(net, x, method="ema", momentum=1.0)
    torch.testing.assert_close(warm[0].running_mean, x.mean(dim=(0, 2, 3)))


def test_uint8_nhwc_and_iterable_inputs(tiny):
    u8 = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    a = BNStats.from_model(adapt(tiny, u8, n=None))
    as_float = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    b = BNStats.from_model(adapt(tiny, as_float, n=None))
    loader = [(as_float[i : i + 5], torch.zeros(5)) for i in range(0, 20, 5)]
    c = BNStats.from_model(adapt(tiny, loader, n=20))
    torch.testing.assert_close(a.mean["bn1"], b.mean["bn1"])
    torch.testing.assert_close(a.mean["bn1"], c.mean["bn1"])


@pytest.mark.parametrize(
    ("model", "images", "kwargs", "exc", "match"),
    [
        (nn.Sequential(nn.Conv2d(3, 3, 1)), torch.rand(4, 3, 8, 8), {}, ValueError, "BatchNorm"),
        (None, torch.rand(4, 3, 8, 8), {"n": 5}, ValueError, "n <= the number"),
        (None, [torch.rand(4, 3, 8, 8)], {"n": 5}, ValueError, "n <= the number"),
        (None, torch.rand(4, 3, 8, 8), {"n": 1}, ValueError, "single value per channel"),
        (None, torch.full((4, 3, 8, 8), float("nan")), {}, ValueError, "NaN"),
        (None, np.zeros((4, 8, 8, 4), np.uint8), {}, ValueError, "C = 1 or 3"),
        (None, np.zeros((4, 8, 8, 3), np.int32), {}, TypeError, "uint8"),
        (None, torch.rand(4, 3, 8, 8), {"method": "magic"}, ValueError, "source, replace"),
        (None, None, {}, ValueError, "target images"),
        (None, torch.rand(4, 3, 8, 8), {"part": "mean", "method": "test-batch"}, ValueError, "part='both'"),
    ],
)
def test_bad_input(model, images, kwargs, exc, match):
    model = model or make_tiny()
    before = _state(model)
    with pytest.raises(exc, match=match):
        adapt(model, images, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_n_one_works_without_flat_bn_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    out = adapt(net, torch.rand(5, 3, 8, 8), n=1, seed=0)
    assert not torch.equal(out[1].running_mean, net[1].running_mean)


def test_every_batchnorm_kind_is_adapted():
    """BatchNorm1d/2d/3d and SyncBatchNorm (which falls back to plain BN without a process group)."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn3d = nn.BatchNorm3d(3)
            self.sync = nn.SyncBatchNorm(3)
            self.bn1d = nn.BatchNorm1d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn3d(x.unsqueeze(2)).squeeze(2)
            return self.bn1d(self.sync(x).mean(dim=(2, 3)))

    net = Mixed().eval()
    x = _images(6)
    out = adapt(net, x, n=None)
    torch.testing.assert_close(out.bn3d.running_mean, x.mean(dim=(0, 2, 3)))
    for name in ("bn3d", "sync", "bn1d"):
        assert not torch.equal(out.get_submodule(name).running_var, torch.ones(3)), name
