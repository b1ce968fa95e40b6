"""The statistics core against numpy computed by hand (the fvcore PreciseBN test style)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt.bn import BNStats, bn_layers, copy_model, estimate_stats, image_moments, mix_stats, select_layers
from conftest import make_tiny


def _bn_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Each BN layer's input in a single train-mode (BN only) forward, captured by hooks, as float64 numpy."""
    seen: dict[str, np.ndarray] = {}

    def capture(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            seen[name] = args[0].double().numpy()

        return hook

    hooks = [m.register_forward_pre_hook(capture(n)) for n, m in bn_layers(model)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for _, m in bn_layers(model):
        m.train()
    with torch.no_grad():
        model(x)
    model.eval()
    model.load_state_dict(state)
    for h in hooks:
        h.remove()
    return seen


def _numpy_moments(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])
    return flat.mean(axis=0), flat.var(axis=0, ddof=1) if flat.shape[0] > 1 else np.zeros(a.shape[1])


def test_bn_layers_finds_every_kind(tiny):
    names = [n for n, _ in bn_layers(tiny)]
    assert names == ["bn1", "bn2", "bn3"]
    net = nn.Sequential(nn.BatchNorm3d(2), nn.BatchNorm2d(3, track_running_stats=False), nn.SyncBatchNorm(4))
    assert [n for n, _ in bn_layers(net)] == ["0", "2"]  # no running stats -> nothing to adapt


def test_single_batch_matches_pytorch_momentum_none(tiny):
    """One batch reproduces exactly the paper's recipe: momentum=None, reset, one train() forward."""
    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    stats = estimate_stats(tiny, x, batch_size=64)
    # The paper's recipe runs the whole model in train mode; TinyNet's dropout would differ, so switch BN alone.
    ref = make_tiny()
    for _, m in bn_layers(ref):
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        ref(x)
    for name, m in bn_layers(ref):
        torch.testing.assert_close(stats.mean[name], m.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(stats.var[name], m.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [7, 32, 100])
def test_micro_batches_merge_exactly_like_numpy(batch_size):
    """Uneven micro-batches: per-batch inputs captured by hooks, pooled by numpy, must equal our merged moments."""
    net = make_tiny()
    x = torch.rand(45, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    stats = estimate_stats(net, x, batch_size=batch_size)
    k = -(-45 // batch_size)
    bounds = [round(i * 45 / k) for i in range(k + 1)]
    pooled: dict[str, list[np.ndarray]] = {}
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        for name, inp in _bn_inputs(net, x[a:b]).items():
            pooled.setdefault(name, []).append(np.moveaxis(inp, 1, -1).reshape(-1, inp.shape[1]))
    for name, parts in pooled.items():
        flat = np.concatenate(parts)
        np.testing.assert_allclose(stats.mean[name].numpy(), flat.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats.var[name].numpy(), flat.var(0, ddof=1), rtol=1e-5, atol=1e-6)
        assert stats.count[name] == flat.shape[0]
    assert stats.metadata["images"] == "45"


def test_n_equals_one_on_spatial_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.rand(1, 3, 9, 9, generator=torch.Generator().manual_seed(3))
    stats = estimate_stats(net, x)
    inp = net[0](x).detach().double().numpy()
    mean, var = _numpy_moments(inp)
    np.testing.assert_allclose(stats.mean["1"].numpy(), mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.var["1"].numpy(), var, rtol=1e-5, atol=1e-6)


def test_many_values_float64_merge():
    """A million values per channel, in 1000 batches: same as numpy's float64 result to 1e-6 relative."""
    g = torch.Generator().manual_seed(4)
    net = nn.Sequential(nn.BatchNorm2d(2)).eval()
    x = torch.randn(1000, 2, 32, 32, generator=g) * 3 + 1000  # a large offset punishes naive sums of squares
    stats = estimate_stats(net, x, batch_size=1)
    flat = x.double().permute(1, 0, 2, 3).reshape(2, -1).numpy()
    np.testing.assert_allclose(stats.mean["0"].numpy(), flat.mean(1), rtol=1e-6)
    np.testing.assert_allclose(stats.var["0"].numpy(), flat.var(1, ddof=1), rtol=1e-6)


def test_estimate_leaves_model_unchanged(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    tiny.drop.train()  # a mixed mode that must come back as it was
    estimate_stats(tiny, torch.rand(8, 3, 8, 8), batch_size=3)
    after = tiny.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert tiny.drop.training and not tiny.bn1.training


def test_estimate_restores_each_layers_momentum(tiny):
    # Statistics come from BN's own train-mode kernel with cumulative averaging: the momentum must come back.
    tiny.bn1.momentum, tiny.bn2.momentum = 0.01, None
    stats = estimate_stats(tiny, torch.rand(9, 3, 8, 8), batch_size=4)
    assert tiny.bn1.momentum == 0.01 and tiny.bn2.momentum is None and tiny.bn3.momentum == 0.1
    assert stats.count["bn1"] == 9 * 8 * 8


def test_snapshot_restore_is_bit_exact(tiny):
    snap = BNStats.from_model(tiny)
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    with torch.no_grad():
        for _, m in bn_layers(tiny):
            m.running_mean.add_(1.2345678)
            m.running_var.mul_(3.3)
    snap.apply_to(tiny)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())


def test_save_load_round_trip(tmp_path, tiny):
    stats = estimate_stats(tiny, torch.rand(8, 3, 8, 8))
    stats.metadata["corruption"] = "fog"
    stats.save(tmp_path / "s.safetensors")
    back = BNStats.load(tmp_path / "s.safetensors")
    assert back.names == stats.names and back.metadata["corruption"] == "fog" and back.count == stats.count
    assert all(torch.equal(back.mean[n], stats.mean[n]) and torch.equal(back.var[n], stats.var[n]) for n in back.names)


def test_load_rejects_tampered_and_mismatched(tmp_path, tiny):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="unreadable"):
        BNStats.load(bad)
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(2)}, str(other))
    with pytest.raises(ValueError, match="bnadapt statistics file"):
        BNStats.load(other)
    wide = BNStats(mean={"bn1": torch.zeros(9)}, var={"bn1": torch.ones(9)})
    with pytest.raises(ValueError, match="channels for BN layer 'bn1'"):
        wide.apply_to(tiny)
    with pytest.raises(ValueError, match="BN layers"):
        BNStats(mean={"nope": torch.zeros(8)}, var={"nope": torch.ones(8)}).apply_to(tiny)
    with pytest.raises(FileNotFoundError):
        BNStats.load(tmp_path / "missing.safetensors")


def test_select_layers():
    names = ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1"]
    assert select_layers(names) == names
    assert select_layers(names, include="layer1.*") == ["layer1.0.bn1", "layer1.0.bn2"]
    assert select_layers(names, first=2) == names[:2]
    assert select_layers(names, last=1) == ["layer2.0.bn1"]
    with pytest.raises(ValueError, match="matched none"):
        select_layers(names, include="head*")
    with pytest.raises(ValueError, match="at most one"):
        select_layers(names, first=1, last=1)
    with pytest.raises(ValueError, match="positive integer"):
        select_layers(names, first=0)


def test_mix_stats_parts():
    src = BNStats(mean={"b": torch.zeros(3)}, var={"b": torch.ones(3)})
    tgt = BNStats(mean={"b": torch.full((3,), 4.0)}, var={"b": torch.full((3,), 9.0)})
    both = mix_stats(src, tgt, 0.25)
    assert both.mean["b"].tolist() == [1.0] * 3 and both.var["b"].tolist() == [3.0] * 3
    mean_only = mix_stats(src, tgt, 1.0, part="mean")
    assert mean_only.mean["b"].tolist() == [4.0] * 3 and mean_only.var["b"].tolist() == [1.0] * 3
    var_only = mix_stats(src, tgt, 1.0, part="var")
    assert var_only.mean["b"].tolist() == [0.0] * 3 and var_only.var["b"].tolist() == [9.0] * 3
    with pytest.raises(ValueError):
        mix_stats(src, tgt, 1.5)


class _Pickles(nn.Module):
    """A module that changes how it is copied: copy_model leaves it to copy.deepcopy."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.copies = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x)

    def __getstate__(self):
        state = super().__getstate__()
        state["copies"] = self.copies + 1
        return state


def test_copy_model_is_a_deep_copy_with_ties_hooks_and_custom_copies_kept():
    conv = nn.Conv2d(3, 3, 1)
    net = nn.Sequential(conv, nn.BatchNorm2d(3), conv, _Pickles())  # the same conv twice: tied
    net.scale = torch.ones(3)  # a plain tensor attribute
    net[1].register_forward_hook(lambda m, a, out: out * 2)
    twin = copy_model(net)
    ref = copy.deepcopy(net)
    x = torch.rand(2, 3, 4, 4)
    assert torch.equal(twin.eval()(x), ref.eval()(x))
    assert twin[0] is twin[2] and twin[0] is not conv and twin[3].copies == 1
    pairs = [*zip(net.state_dict().values(), twin.state_dict().values(), strict=True), (net.scale, twin.scale)]
    assert all(a is not b and a.data_ptr() != b.data_ptr() and torch.equal(a, b) for a, b in pairs)
    twin[1].running_var.add_(1)
    assert torch.equal(net[1].running_var, torch.ones(3))
    assert sorted(twin.__dict__) == sorted(ref.__dict__) and len(twin[1]._forward_hooks) == 1


@pytest.mark.parametrize("shape", [(5, 3, 7, 9), (4, 6), (3, 2, 11), (2, 2, 3, 4, 5)])
def test_image_moments_are_each_images_own_mean_and_biased_variance(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mean, var, positions = image_moments(x)
    flat = x.double().flatten(2) if x.ndim > 2 else x.double().unsqueeze(-1)
    ref_var, ref_mean = torch.var_mean(flat, dim=2, correction=0)
    assert positions == flat.shape[2] and mean.dtype == var.dtype == torch.float64
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-6)
