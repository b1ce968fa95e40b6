"""tent: entropy steps on BN affine parameters only, batch statistics, online/episodic, inference_mode, bench rows."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt import Tent, adapt, bn_layers
from bnadapt.adapt import is_online, method_options, parse_options
from bnadapt.benchmark import BenchConfig, run_benchmark
from bnadapt.cli import main
from bnadapt.data import open_data
from bnadapt.methods.tent import softmax_entropy
from bnadapt.results import read_results
from conftest import make_tiny


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    # A shifted input distribution, so the source model is unsure and entropy has room to fall.
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g) * 0.5 + 0.5  # [0.5, 1]: in range, brighter than the source expects


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_registered_online_with_options():
    assert is_online("tent")
    assert method_options("tent") == {"lr": 1e-3, "optimizer": "adam", "steps": 1, "episodic": False}


def test_callers_model_untouched(tiny):
    before = _state(tiny)
    model = adapt(tiny, method="tent", options={"lr": 0.05})
    for _ in range(3):
        model(_images())
    assert isinstance(model, Tent) and model.net is not tiny
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())
    assert all(p.requires_grad for p in tiny.parameters())  # freezing happened on the copy only


def test_entropy_falls_on_a_fixed_batch(tiny):
    model = adapt(tiny, method="tent", options={"lr": 0.01})
    x = _images()
    # Each call returns the logits from before its own update, so call k shows the effect of k - 1 steps.
    ent = [softmax_entropy(model(x)).mean().item() for _ in range(8)]
    assert ent[-1] < ent[0] - 0.01, ent


def test_returns_logits_from_before_the_update(tiny):
    model = adapt(tiny, method="tent", options={"lr": 0.05})
    x = _images()
    frozen = copy.deepcopy(model.net)
    with torch.no_grad():
        expected = frozen(x)
    out = model(x)
    torch.testing.assert_close(out, expected)
    assert not out.requires_grad
    with torch.no_grad():
        assert not torch.allclose(model.net(x), expected)  # the step did happen


def test_only_selected_bn_affine_params_change(tiny):
    model = adapt(tiny, method="tent", layers=["bn1", "bn2"], options={"lr": 0.05, "optimizer": "sgd", "steps": 2})
    before = {k: v.clone() for k, v in model.net.named_parameters()}
    for _ in range(3):
        model(_images())
    changed = {k for k, v in model.net.named_parameters() if not torch.equal(before[k], v)}
    assert changed == {"bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias"}
    # Selected layers normalise with batch statistics; the unselected bn3 keeps its source statistics untouched.
    assert [name for name, _ in bn_layers(model.net)] == ["bn3"]
    assert torch.equal(model.net.bn3.running_mean, tiny.bn3.running_mean)
    assert torch.equal(model.net.bn3.running_var, tiny.bn3.running_var)


def test_batch_statistics_mode_even_in_eval():
    net = nn.Sequential(nn.BatchNorm2d(3)).eval()
    model = adapt(net, method="tent", options={"lr": 1e-6}).eval()
    y = model(_images(4))
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4, rtol=0)


def test_episodic_repeats_online_does_not(tiny):
    x = _images()
    episodic = adapt(tiny, method="tent", options={"lr": 0.05, "episodic": True})
    first = episodic(x)
    for _ in range(3):
        torch.testing.assert_close(episodic(x), first, rtol=0, atol=0)
    online = adapt(tiny, method="tent", options={"lr": 0.05})
    a, b = online(x), online(x)
    torch.testing.assert_close(a, first, rtol=0, atol=0)  # same start
    assert not torch.allclose(a, b)


def test_reset_restores_parameters_and_optimizer(tiny):
    model = adapt(tiny, method="tent", options={"lr": 0.05})
    x = _images()
    first = model(x)
    model(x)
    model.reset()
    torch.testing.assert_close(model(x), first, rtol=0, atol=0)
    assert model.optimizer.state_dict()["state"]  # Adam moments exist again after the step


def test_works_under_inference_mode(tiny):
    model = adapt(tiny, method="tent", options={"lr": 0.05})
    before = model.net.bn1.weight.detach().clone()
    with torch.inference_mode():
        x = _images()  # an inference tensor, as the benchmark passes
        out = model(x)
        model(x)
    assert out.shape == (16, 5) and not out.requires_grad
    assert not torch.equal(model.net.bn1.weight.detach(), before)


def test_deepcopy_is_independent(tiny):
    """bench --adapt-on deep-copies an adapted online model per cell: the copy must step its own parameters."""
    model = adapt(tiny, method="tent", options={"lr": 0.05})
    twin = copy.deepcopy(model)
    x = _images()
    twin(x)
    assert torch.equal(model.net.bn1.weight, tiny.bn1.weight)
    assert not torch.equal(twin.net.bn1.weight, tiny.bn1.weight)
    torch.testing.assert_close(model(x), copy.deepcopy(adapt(tiny, method="tent", options={"lr": 0.05}))(x))


def test_optimizer_state_follows_to(tiny):
    model = adapt(tiny, method="tent", options={"lr": 0.05})
    model(_images())  # Adam moments now exist, in float32
    model.to(torch.float64)
    assert model(_images().double()).dtype == torch.float64
    assert all(v.dtype == torch.float64 for s in model.optimizer.state.values() for k, v in s.items() if k != "step")


def test_images_give_a_starting_state_kept_by_episodic(tiny):
    x = _images(seed=1)
    model = adapt(tiny, _images(32), method="tent", n=32, options={"lr": 0.05, "episodic": True})
    assert not torch.equal(model.net.bn1.weight, tiny.bn1.weight)
    start = model.net.bn1.weight.detach().clone()
    model(x)
    assert torch.equal(model.net.bn1.weight.detach(), start)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lr": 0.0}, "lr > 0"),
        ({"lr": -1.0}, "lr > 0"),
        ({"lr": float("nan")}, "lr > 0"),
        ({"lr": "fast"}, "lr to be a float"),
        ({"steps": 0}, "steps >= 1"),
        ({"optimizer": "rmsprop"}, "adam, sgd"),
        ({"momentum": 0.5}, "accepted: episodic, lr, optimizer, steps"),
    ],
)
def test_bad_options(tiny, options, match):
    with pytest.raises(ValueError, match=match):
        adapt(tiny, method="tent", options=options)
    with pytest.raises(ValueError, match=match):  # the CLI's early check, before anything runs
        parse_options(["source", "tent"], {k: str(v) for k, v in options.items()})


def test_no_affine_parameters_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False)).eval()
    with pytest.raises(ValueError, match="affine"):
        adapt(net, method="tent")


def test_part_must_be_both(tiny):
    with pytest.raises(ValueError, match="part='both' for tent"):
        adapt(tiny, method="tent", part="mean")


@pytest.fixture
def npz(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(8) % 10)
    return tmp_path / "in.npz"


def test_run_benchmark_rows_for_tent(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "five.npz", x=x, y=np.arange(24) % 5)  # TinyNet has 5 classes
    data = open_data(f"generate:cifar:{tmp_path / 'five.npz'}", ["contrast"], [5])
    config = BenchConfig(methods=("source", "tent"), ns=(8,), batch_size=8, options={"lr": 0.01})
    rows = run_benchmark({"tiny": make_tiny()}, data, config)
    assert [(r["method"], r["corruption"], r["total"]) for r in rows] == [
        ("source", "clean", 24), ("tent", "clean", 24), ("source", "contrast", 24), ("tent", "contrast", 24),
    ]  # fmt: skip


def test_bench_cli_tent_with_option(npz, tmp_path, resnet20_checkpoint, capsys):
    out = tmp_path / "o"
    argv = ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(resnet20_checkpoint), "--data",
            f"generate:cifar:{npz}", "--corruptions", "fog", "--severities", "3", "--methods", "source,tent",
            "--n", "4", "-b", "8", "--opt", "lr=0.0001", "--out", str(out), "--no-progress", "--no-plots"]  # fmt: skip
    assert main(argv) == 0
    headers, rows = read_results(out)
    tent_cells = sorted((r["corruption"], r["total"]) for r in rows if r["method"] == "tent")
    assert tent_cells == [("clean", 8), ("fog", 8)]
    assert headers[0]["config"]["options"] == {"lr": 0.0001}
    capsys.readouterr()
    assert main([*argv[:-6], "--opt", "steps=0", "--out", str(tmp_path / "bad"), "--no-progress"]) == 2
    assert "steps >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before the benchmark wrote anything


def test_adapt_cli_refuses_tent(npz, tmp_path, resnet20_checkpoint, capsys):
    argv = ["adapt", "--model", "cifar10_resnet20", "--checkpoint", str(resnet20_checkpoint), "--images", str(npz),
            "--method", "tent", "--out", str(tmp_path / "o.pt")]  # fmt: skip
    assert main(argv) == 2
    assert "adapts while it runs" in capsys.readouterr().err
