"""rbn (RoTTA's robust BN) and dua (DUA): statistics against hand-computed updates, reset, one-image batches,
no warm-up, half precision, options, and the benchmark end to end."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt import adapt, method_names
from bnadapt.adapt import is_online, method_options, method_spec, parse_options
from bnadapt.benchmark import BenchConfig, run_benchmark
from bnadapt.cli import main
from bnadapt.data import open_data
from bnadapt.methods import DUA, reset
from bnadapt.methods.peers import augmented_copies, dua_momentum
from bnadapt.results import read_results
from conftest import make_tiny


def _images(n=8, seed=0, size=8, channels=3):
    # [0.5, 1]: images as models take them, brighter than the source statistics expect.
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.5


def _one_bn(channels=3):
    """A lone BN layer with non-trivial source statistics: it sees the image itself, so updates are computed by hand."""
    net = nn.Sequential(nn.BatchNorm2d(channels)).eval()
    with torch.no_grad():
        net[0].running_mean.copy_(torch.tensor([0.1, -0.2, 0.3])[:channels])
        net[0].running_var.copy_(torch.tensor([0.5, 1.5, 2.0])[:channels])
        net[0].weight.copy_(torch.tensor([1.5, 0.5, 1.0])[:channels])
        net[0].bias.copy_(torch.tensor([0.1, 0.0, -0.1])[:channels])
    return net


def test_registered_after_tent_online_and_not_shardable():
    assert method_names()[-2:] == ["rbn", "dua"]
    assert method_names().index("tent") < method_names().index("rbn")
    for name in ("rbn", "dua"):
        assert is_online(name) and method_spec(name).images == "optional"
        assert not method_spec(name).can_shard(method_options(name))
    assert method_options("rbn") == {"momentum": 0.05}
    assert method_options("dua") == {"momentum": 0.1, "decay": 0.94, "min_momentum": 0.005, "copies": 64}


def test_rbn_statistics_are_an_ema_with_the_biased_batch_variance():
    net = _one_bn()
    model = adapt(net, method="rbn")
    mean = net[0].running_mean.double().numpy().copy()
    var = net[0].running_var.double().numpy().copy()
    with torch.no_grad():
        for seed in range(4):
            x = _images(seed=seed)
            model(x)
            a = x.double().numpy()
            mean = 0.95 * mean + 0.05 * a.mean(axis=(0, 2, 3))
            var = 0.95 * var + 0.05 * a.var(axis=(0, 2, 3))  # numpy's default: biased, as RoTTA's unbiased=False
    np.testing.assert_allclose(model[0].running_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(model[0].running_var.numpy(), var, rtol=1e-5)
    # ema with the same momentum moves the mean alike; only the variance's correction differs
    rbn, ema = adapt(net, method="rbn"), adapt(net, method="ema", momentum=0.05)
    with torch.no_grad():
        rbn(_images(seed=0))
        ema(_images(seed=0))
    torch.testing.assert_close(rbn[0].running_mean, ema[0].running_mean)
    assert (ema[0].running_var > rbn[0].running_var).all()


def test_rbn_normalises_with_the_moved_global_statistics_not_the_batchs():
    net = _one_bn()
    x = _images(seed=1) * 3 + 2  # far from the source statistics
    with torch.no_grad():
        out = adapt(net, method="rbn")(x)
        own = adapt(net, method="test-batch")(x)
    mean = 0.95 * net[0].running_mean + 0.05 * x.mean(dim=(0, 2, 3))
    var = 0.95 * net[0].running_var + 0.05 * x.var(dim=(0, 2, 3), unbiased=False)
    bn = net[0]
    expected = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps) * bn.weight[:, None, None]
    torch.testing.assert_close(out, expected + bn.bias[:, None, None], rtol=1e-5, atol=1e-5)
    assert (out - own).abs().max() > 0.5  # test-batch would centre the batch on its own mean


def test_rbn_with_one_image_batches_moves_the_1d_layers_mean_only(one_thread):
    net = make_tiny()
    model = adapt(net, method="rbn")
    with torch.no_grad():
        y = model(_images(1, seed=3))
    assert y.shape == (1, 5) and torch.isfinite(y).all()
    # bn2 sees H x W values of the one image: both statistics move; bn3 (BatchNorm1d) sees one value per channel.
    assert not torch.equal(model.bn2.running_var, net.bn2.running_var)
    assert not torch.equal(model.bn3.running_mean, net.bn3.running_mean)
    assert torch.equal(model.bn3.running_var, net.bn3.running_var)


def test_dua_momentum_schedule_follows_the_reference_formula():
    assert dua_momentum(1) == pytest.approx(0.1 * 0.94 + 0.005)
    assert [dua_momentum(t, 0.2, 0.5, 0.01) for t in (1, 2, 3)] == pytest.approx([0.11, 0.06, 0.035])
    assert dua_momentum(500) == pytest.approx(0.005)


def test_dua_updates_equal_a_hand_computed_schedule_over_the_same_copies():
    net = _one_bn()
    x = _images(3, seed=4, size=16)
    model = adapt(net, method="dua", seed=7, options={"copies": 6})
    with torch.no_grad():
        model(x)
    g = torch.Generator().manual_seed(7)
    mean, var = net[0].running_mean.double(), net[0].running_var.double()
    for t, image in enumerate(x, start=1):
        c = augmented_copies(image, 6, g).double()
        m = 0.1 * 0.94**t + 0.005  # the reference code's schedule, written out
        mean = (1 - m) * mean + m * c.mean(dim=(0, 2, 3))
        var = (1 - m) * var + m * c.var(dim=(0, 2, 3))  # PyTorch's running update: unbiased
    assert model.step == 3
    torch.testing.assert_close(model.net[0].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.net[0].running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert net[0].momentum == 0.1 and not net[0].training  # the caller's layer is untouched


def test_dua_predicts_in_eval_mode_with_the_updated_statistics():
    net = _one_bn()
    model = adapt(net, method="dua", options={"copies": 4})
    x = _images(2, seed=5)
    with torch.no_grad():
        out = model(x)
        expected = model.net(x)  # eval mode: the running statistics after the two updates
    torch.testing.assert_close(out, expected)
    assert not model.net[0].training and model.net[0].momentum == 0.1


def test_augmented_copies_crop_flip_and_rotate():
    image = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16) + 1
    copies = augmented_copies(image, 32, torch.Generator().manual_seed(0))
    assert copies.shape == (32, 3, 16, 16)
    assert torch.equal(copies, augmented_copies(image, 32, torch.Generator().manual_seed(0)))
    # every copy shows a window of the image zero-padded by 2 pixels: at most 2 zero rows and 2 zero columns
    zeros = (copies == 0).flatten(1).sum(1)
    assert zeros.max() <= 3 * (16 * 16 - 14 * 14) and (zeros > 0).any()
    small = torch.rand(1, 4, 4)  # below 8 pixels: no padding, so each copy is one of the 8 flips/rotations
    views = [torch.rot90(v, k, (-2, -1)) for v in (small, small.flip(-1)) for k in range(4)]
    found = augmented_copies(small, 16, torch.Generator().manual_seed(1))
    assert all(any(torch.equal(c, v) for v in views) for c in found)
    assert len({c.flatten().tolist().__str__() for c in found}) > 1
    assert augmented_copies(torch.rand(3, 8, 12), 8, torch.Generator()).shape == (8, 3, 8, 12)  # not square


@pytest.mark.parametrize("method", ["rbn", "dua"])
def test_reset_returns_to_the_state_after_the_warm_up(one_thread, method):
    opts = {"copies": 4} if method == "dua" else None
    model = adapt(make_tiny(), _images(4, seed=1), method=method, options=opts)
    fresh = copy.deepcopy(model)
    probe = _images(4, seed=2)
    with torch.no_grad():
        expected = fresh(probe)
        for seed in (3, 4):
            model(_images(4, seed=seed) * 2)
        assert reset(model) is model
        assert torch.equal(model(probe), expected)


@pytest.mark.parametrize("method", ["rbn", "dua"])
def test_no_warm_up_one_image_batches_and_half_precision(one_thread, method):
    opts = {"copies": 2} if method == "dua" else None
    net = make_tiny()
    for images, n in ((None, 0), (torch.empty(0, 3, 8, 8), 0), (torch.empty(0, 3, 8, 8), None)):
        model = adapt(net, images, method=method, n=n, options=opts)
        with torch.no_grad():
            assert torch.isfinite(model(_images(1, seed=6))).all()
    half = adapt(net.to(torch.float16), _images(2), method=method, options=opts)
    with torch.no_grad():
        y = half(_images(2, seed=7).half())
    assert y.dtype == torch.float16 and torch.isfinite(y).all()


@pytest.mark.parametrize("method", ["rbn", "dua"])
def test_part_keeps_the_other_statistic(one_thread, method):
    net = make_tiny()
    model = adapt(net, method=method, part="mean", options={"copies": 4} if method == "dua" else None)
    with torch.no_grad():
        model(_images(4, seed=8))
    bn = model.net.bn2 if method == "dua" else model.bn2
    assert torch.equal(bn.running_var, net.bn2.running_var)
    assert not torch.equal(bn.running_mean, net.bn2.running_mean)


@pytest.mark.parametrize(
    "options, message",
    [({"momentum": 0}, "momentum in"), ({"decay": 1.5}, "decay in"), ({"min_momentum": -0.1}, "min_momentum >= 0"),
     ({"momentum": 1.0, "decay": 1.0}, "momentum \\* decay"), ({"copies": 1}, "copies >= 2")],
)  # fmt: skip
def test_bad_dua_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        parse_options(["dua"], options)


def test_options_parse_from_strings():
    got = parse_options(["rbn", "dua"], ["momentum=0.2", "copies=8", "decay=0.9"])
    assert got == {"momentum": 0.2, "copies": 8, "decay": 0.9} and type(got["copies"]) is int
    with pytest.raises(ValueError, match=r"momentum in \(0, 1\]"):
        parse_options(["rbn"], ["momentum=1.5"])
    assert isinstance(adapt(make_tiny(), method="dua"), DUA)


def test_run_benchmark_rows_for_rbn_and_dua(tmp_path, one_thread):
    x = np.random.default_rng(0).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "five.npz", x=x, y=np.arange(12) % 5)  # TinyNet has 5 classes
    data = open_data(f"generate:cifar:{tmp_path / 'five.npz'}", ["contrast"], [5])
    config = BenchConfig(methods=("source", "rbn", "dua"), ns=(4,), batch_size=4, options={"copies": 2})
    rows = run_benchmark({"tiny": make_tiny()}, data, config)
    assert [(r["method"], r["corruption"], r["total"]) for r in rows if r["method"] != "source"] == [
        ("rbn", "clean", 12), ("dua", "clean", 12), ("rbn", "contrast", 12), ("dua", "contrast", 12),
    ]  # fmt: skip


def test_dua_without_images_is_seeded_per_seed_in_a_benchmark(tmp_path, one_thread):
    x = np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "five.npz", x=x, y=np.arange(12) % 5)
    data = open_data(f"generate:cifar:{tmp_path / 'five.npz'}", ["contrast"], [5])
    config = BenchConfig(methods=("dua",), ns=(0,), seeds=(0, 1), batch_size=4, options={"copies": 2})

    def outcome():  # (seed, cell) -> the counts of one run
        rows = run_benchmark({"tiny": make_tiny()}, data, config)
        return {(r["seed"], r["corruption"]): (r["correct"], r["correct5"]) for r in rows}

    first = outcome()
    assert sorted(first) == [(0, "clean"), (0, "contrast"), (1, "clean"), (1, "contrast")]
    assert outcome() == first  # the augmentations come from the seed, not from fresh entropy


def test_bench_cli_with_rbn_and_dua_options(tmp_path, resnet20_checkpoint, capsys):
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(4))
    out = tmp_path / "o"
    argv = ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(resnet20_checkpoint), "--data",
            f"npz:{tmp_path / 'in.npz'}", "--methods", "rbn,dua", "--n", "2", "-b", "4", "--opt", "momentum=0.2",
            "--opt", "copies=2", "--out", str(out), "--no-progress", "--no-plots"]  # fmt: skip
    assert main(argv) == 0
    headers, rows = read_results(out)
    assert sorted((r["method"], r["total"]) for r in rows) == [("dua", 4), ("rbn", 4)]
    assert headers[0]["config"]["options"] == {"momentum": 0.2, "copies": 2}
    capsys.readouterr()
    assert main([*argv[:-6], "--opt", "copies=1", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "copies >= 2" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
