"""sequential and auto: statistics estimated in eval mode, layer by layer, and the shift-aware shrinkage."""

import numpy as np
import pytest
import torch

from bnadapt import adapt, bn_layers
from bnadapt.adapt import parse_options
from bnadapt.bn import equivalent_prior, shrinkage_weight
from bnadapt.methods.inorder import auto_weights
from conftest import make_tiny


def _stats(model):
    return {n.removeprefix("net."): (m.running_mean.clone(), m.running_var.clone()) for n, m in bn_layers(model)}


class Shifted(torch.nn.Module):
    """``net`` behind a fixed ``x * scale + shift``: a target as far from the source statistics as wanted, while the
    images stay in [0, 1] as adapt() requires."""

    def __init__(self, net: torch.nn.Module, scale: float, shift: float = 0.0) -> None:
        super().__init__()
        self.net, self.scale, self.shift = net, scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.scale + self.shift)


def _hand_sequential(model, x):
    """Reference: for each BN layer in order, measure its input in eval mode with earlier layers already set."""
    model = model.eval()
    for _, layer in bn_layers(model):
        seen = {}

        def grab(_m, a, seen=seen):
            seen["x"] = a[0].detach().double()

        h = layer.register_forward_pre_hook(grab)
        with torch.no_grad():
            model(x)
        h.remove()
        v = seen["x"].transpose(0, 1).reshape(seen["x"].shape[1], -1)
        layer.running_mean.copy_(v.mean(1).float())
        layer.running_var.copy_(v.var(1, correction=1).float())
    return model


@pytest.mark.parametrize("batch_size", [64, 7])
def test_sequential_matches_a_by_hand_layer_by_layer_estimate(batch_size):
    net = Shifted(make_tiny(), 2, 0.5)
    x = torch.rand(20, 3, 12, 12)
    got = _stats(adapt(net, x, method="sequential", batch_size=batch_size))
    want = _stats(_hand_sequential(Shifted(make_tiny(), 2, 0.5), x))
    for name in want:
        torch.testing.assert_close(got[name][0], want[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[name][1], want[name][1], rtol=1e-4, atol=1e-5)


def test_sequential_differs_from_replace_only_where_earlier_layers_matter():
    net = Shifted(make_tiny(), 3)
    x = torch.rand(16, 3, 12, 12)
    seq, rep = _stats(adapt(net, x, method="sequential")), _stats(adapt(net, x, method="replace"))
    # The first layer sees no normalised input: identical; deeper ones differ by Bessel's correction at most here.
    torch.testing.assert_close(seq["bn1"][1], rep["bn1"][1])
    assert not torch.equal(seq["bn2"][1], rep["bn2"][1])
    torch.testing.assert_close(seq["bn2"][1], rep["bn2"][1], rtol=0.05, atol=1e-4)


def test_auto_is_source_when_the_target_has_the_source_statistics():
    x = torch.rand(24, 3, 12, 12)
    matched = adapt(make_tiny(), x, method="sequential")  # its source statistics ARE the statistics of x
    for select in ("none", "im", "entropy"):
        out = adapt(matched, x, method="auto", options={"select": select})
        for name, (m, v) in _stats(matched).items():
            assert torch.equal(_stats(out)[name][0], m) and torch.equal(_stats(out)[name][1], v), (select, name)
    assert all(w == (0.0, 0.0) for w in auto_weights(matched, x, options={"select": "none"}).values())


def test_auto_tends_to_replace_as_the_shift_grows():
    net = make_tiny()
    x = torch.rand(32, 3, 12, 12)
    weights = []
    for shift in (0.0, 0.5, 2.0, 8.0, 32.0):
        w = auto_weights(Shifted(net, 1 + shift, shift), x, options={"select": "none"})
        weights.append(w["net.bn1"])
    means = [m for m, _ in weights]
    variances = [v for _, v in weights]
    assert means == sorted(means) and variances == sorted(variances)
    assert means[-1] > 0.99 and variances[-1] > 0.99
    far = Shifted(net, 33, 32)
    auto = _stats(adapt(far, x, method="auto", options={"select": "none"}))["bn1"]
    seq = _stats(adapt(far, x, method="sequential"))["bn1"]
    torch.testing.assert_close(auto[0], seq[0], rtol=0.01, atol=0.0)
    torch.testing.assert_close(auto[1], seq[1], rtol=0.01, atol=0.0)


def test_auto_leaves_the_callers_model_and_is_deterministic():
    net = Shifted(make_tiny(), 2)
    before = _stats(net)
    x = torch.rand(40, 3, 12, 12)
    a = adapt(net, x, method="auto", n=16, seed=3)
    b = adapt(net, x, method="auto", n=16, seed=3)
    assert all(torch.equal(before[k][0], _stats(net)[k][0]) for k in before)
    assert all(torch.equal(_stats(a)[k][1], _stats(b)[k][1]) for k in before)
    assert a.bnadapt_auto_scale in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_auto_part_keeps_the_other_statistic():
    net = Shifted(make_tiny(), 5, 2)
    x = torch.rand(16, 3, 12, 12)
    mean_only = _stats(adapt(net, x, method="auto", part="mean", options={"select": "none"}))
    for name, (_, v) in _stats(net).items():
        assert torch.equal(mean_only[name][1], v)
    assert not torch.equal(mean_only["bn1"][0], _stats(net)["bn1"][0])


def test_auto_with_one_image_keeps_the_source_and_bad_select_is_refused():
    net = make_tiny()
    # (the BN1d head cannot take one image at all: a single value per channel)
    far = Shifted(net, 9)
    one = adapt(far, torch.rand(1, 3, 12, 12), method="auto", layers="net.bn[12]", options={"select": "none"})
    assert all(torch.equal(_stats(one)[k][0], v[0]) for k, v in _stats(net).items())
    with pytest.raises(ValueError, match="select to be one of im, entropy, none"):
        adapt(net, torch.rand(4, 3, 12, 12), method="auto", options={"select": "best"})


def test_shrinkage_weight_and_equivalent_prior():
    noise = torch.full((8,), 0.5)
    assert torch.equal(shrinkage_weight(torch.zeros(8), noise), torch.zeros(8))
    w = shrinkage_weight(torch.full((8,), 2.0), noise)  # tau^2 = 4 - 0.5 = 3.5 -> 3.5 / 4
    torch.testing.assert_close(w, torch.full((8,), 0.875))
    assert equivalent_prior(0.875, 32) == pytest.approx(32 * 0.125 / 0.875)
    assert np.isinf(equivalent_prior(0.0, 32))


def test_auto_and_sequential_run_in_the_benchmark(tmp_path):
    from bnadapt import BenchConfig, open_data, run_benchmark

    f = tmp_path / "c.npz"
    rng = np.random.default_rng(0)
    np.savez(f, x=rng.integers(0, 255, (12, 32, 32, 3), dtype=np.uint8), y=np.arange(12) % 5)
    data = open_data(f"generate:cifar:{f}", ["contrast"], [5])
    rows = run_benchmark({"t": make_tiny()}, data, BenchConfig(methods=("auto", "sequential"), ns=(8,)))
    assert sorted({r["method"] for r in rows}) == ["auto", "sequential"] and all(r["total"] == 12 for r in rows)


def test_prior_in_order_spans_source_to_sequential(tiny, one_thread):
    from bnadapt.bn import BNStats

    x = torch.rand(16, 3, 16, 16) * 0.5 + 0.3
    seq = BNStats.from_model(adapt(tiny, x, method="sequential"))
    zero = BNStats.from_model(adapt(tiny, x, method="prior", prior=0.0, options={"order": "sequential"}))
    for n in seq.names:
        torch.testing.assert_close(zero.mean[n], seq.mean[n])
        torch.testing.assert_close(zero.var[n], seq.var[n])
    src = BNStats.from_model(tiny)
    huge = BNStats.from_model(adapt(tiny, x, method="prior", prior=1e9, options={"order": "sequential"}))
    for n in src.names:
        torch.testing.assert_close(huge.mean[n], src.mean[n], rtol=1e-5, atol=1e-6)


def test_prior_orders_agree_on_the_first_layer_only(tiny, one_thread):
    """Both mix the first layer the same way; deeper layers differ because their inputs were normalised
    differently (fully adapted vs mixed)."""
    from bnadapt.bn import BNStats

    x = torch.rand(16, 3, 16, 16) * 0.5 + 0.3
    ind = BNStats.from_model(adapt(tiny, x, method="prior", prior=16.0, options={"order": "independent"}))
    seq = BNStats.from_model(adapt(tiny, x, method="prior", prior=16.0))  # sequential: the default
    first, *rest = ind.names
    torch.testing.assert_close(ind.mean[first], seq.mean[first])
    assert rest and any(not torch.allclose(ind.mean[n], seq.mean[n], atol=1e-4) for n in rest)


def test_prior_order_is_checked():
    with pytest.raises(ValueError, match="order"):
        parse_options(["prior"], ["order=backwards"])
