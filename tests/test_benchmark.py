"""The benchmark protocol: which variants run per cell, that they match a hand-written adapt + evaluate, seeds,
determinism across batch sizes, --adapt-on, and bad input caught before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt import adapt
from bnadapt.adapt import sample_indices
from bnadapt.benchmark import BenchConfig, parse_cell, run_benchmark, variants
from bnadapt.data import Cell, open_data, to_float_nchw
from bnadapt.streams import draw_seed
from conftest import make_tiny

CORR = ["gaussian_noise", "contrast"]


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(40) % 5)
    return open_data(f"generate:cifar:{tmp_path / 'in.npz'}", CORR, [1, 5])


def _accs(rows):
    return {(r["method"], r["n"], r["seed"], r["corruption"], r["severity"]): r["accuracy"] for r in rows}


def test_variants_and_rows(data):
    tiny = make_tiny()
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    cfg = BenchConfig(methods=("source", "replace", "test-batch"), ns=(8, 16), seeds=(0, 1), batch_size=16)
    rows = run_benchmark({"tiny": tiny}, data, cfg)
    assert len(variants(cfg)) == 6  # source and test-batch once per cell, replace per n x seed
    assert len(rows) == 6 * len(data.cells) == 30
    assert {(r["method"], r["n"], r["seed"]) for r in rows if r["method"] != "replace"} == {
        ("source", 0, None), ("test-batch", 0, None)}  # fmt: skip
    assert all(r["total"] == 40 and r["accuracy"] == r["correct"] / 40 for r in rows)
    # Top-5 beside top-1; the tiny net has 5 classes, so k = min(5, classes) takes them all: top-5 is 1.0.
    assert all(r["correct5"] == 40 and r["top5"] == 1.0 for r in rows)
    assert all(torch.equal(before[k], v) for k, v in tiny.state_dict().items())  # the caller's model is untouched


def test_matches_adapt_then_evaluate(data):
    tiny = make_tiny()
    rows = run_benchmark({"tiny": tiny}, data, BenchConfig(methods=("replace",), ns=(16,), seeds=(3,)))
    cell = data.cell("gaussian_noise", 5)
    x = cell.get(np.arange(len(cell)))
    drawn = sample_indices(40, 16, draw_seed(3, Cell("gaussian_noise", 5)))  # each (seed, cell) draws its own
    manual = adapt(tiny, x[drawn], method="replace", batch_size=16)
    with torch.no_grad():
        pred = manual(to_float_nchw(x)).argmax(1).numpy()
    assert _accs(rows)[("replace", 16, 3, "gaussian_noise", 5)] == float(np.mean(pred == cell.labels))


def test_deterministic_and_batch_size_free(data):
    tiny = make_tiny()
    cfg = dict(methods=("source", "replace", "prior", "ema"), ns=(8,), seeds=(0, 1))
    a = _accs(run_benchmark({"t": tiny}, data, BenchConfig(batch_size=16, **cfg)))
    b = _accs(run_benchmark({"t": tiny}, data, BenchConfig(batch_size=16, **cfg)))
    c = _accs(run_benchmark({"t": tiny}, data, BenchConfig(batch_size=64, **cfg)))
    assert a == b
    assert {k: v for k, v in a.items() if k[0] != "ema"} == {k: v for k, v in c.items() if k[0] != "ema"}


def test_seeds_draw_different_images(data):
    rows = run_benchmark({"t": make_tiny()}, data, BenchConfig(methods=("replace",), ns=(2,), seeds=(0, 1, 2, 3)))
    per_seed = {r["seed"]: r["accuracy"] for r in rows if r["corruption"] == "contrast" and r["severity"] == 5}
    assert len(set(per_seed.values())) > 1


def test_adapt_on_one_cell(data):
    tiny = make_tiny()
    cfg = dict(methods=("source", "replace"), ns=(16,), seeds=(0,))
    normal = _accs(run_benchmark({"t": tiny}, data, BenchConfig(**cfg)))
    rows = run_benchmark({"t": tiny}, data, BenchConfig(adapt_on="gaussian_noise:5", **cfg))
    on = _accs(rows)
    assert all(r["adapt_on"] == "gaussian_noise:5" for r in rows)
    assert on[("replace", 16, 0, "gaussian_noise", 5)] == normal[("replace", 16, 0, "gaussian_noise", 5)]
    assert on[("source", 0, None, "contrast", 1)] == normal[("source", 0, None, "contrast", 1)]


def test_parse_cell():
    assert parse_cell("clean") == ("clean", 0) and parse_cell("fog:3") == ("fog", 3)
    with pytest.raises(ValueError, match="<corruption>:<severity"):
        parse_cell("fog")


def test_labels_out_of_range(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros((8, 32, 32, 3), np.uint8), y=np.arange(8))
    data = open_data(f"generate:cifar:{tmp_path / 'a.npz'}", ["contrast"], [1])
    with pytest.raises(ValueError, match=r"labels in 0\.\.4 .*got 0\.\.7"):
        run_benchmark({"tiny": make_tiny()}, data, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_image_size_the_model_cannot_take(tmp_path):
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 32 * 32, 5))
    np.savez(tmp_path / "a.npz", x=np.zeros((8, 40, 40, 3), np.uint8), y=np.zeros(8, np.int64))
    data = open_data(f"generate:cifar:{tmp_path / 'a.npz'}", ["contrast"], [1])
    with pytest.raises(ValueError, match=r"\(40, 40, 3\)"):
        run_benchmark({"fixed": fixed.eval()}, data)


def test_bad_config(data):
    with pytest.raises(ValueError, match="lower --n"):
        run_benchmark({"t": make_tiny()}, data, BenchConfig(ns=(41,)))
    with pytest.raises(ValueError, match="--methods"):
        run_benchmark({"t": make_tiny()}, data, BenchConfig(methods=("magic",)))


def test_amp_and_channels_last_run(data):
    base = _accs(run_benchmark({"t": make_tiny()}, data, BenchConfig(ns=(8,))))
    cl = _accs(run_benchmark({"t": make_tiny()}, data, BenchConfig(ns=(8,), channels_last=True)))
    amp = run_benchmark({"t": make_tiny()}, data, BenchConfig(ns=(8,), amp=True))
    assert cl.keys() == base.keys() and all(abs(cl[k] - base[k]) <= 0.05 for k in base)
    assert len(amp) == len(base) and all(0 <= r["accuracy"] <= 1 for r in amp)


@pytest.mark.cuda
def test_cuda_with_workers_matches_cpu(data):
    cpu = _accs(run_benchmark({"t": make_tiny()}, data, BenchConfig(ns=(8,))))
    gpu = _accs(run_benchmark({"t": make_tiny()}, data, BenchConfig(ns=(8,), device="cuda", jobs=2)))
    assert gpu.keys() == cpu.keys() and all(abs(gpu[k] - cpu[k]) <= 0.05 for k in cpu)


def test_callers_model_untouched(tmp_path):
    from bnadapt.models import cifar_resnet

    model = cifar_resnet(20).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    np.savez(tmp_path / "c.npz", x=np.full((8, 32, 32, 3), 99, np.uint8), y=np.arange(8) % 10)
    data = open_data(f"generate:cifar:{tmp_path / 'c.npz'}", ["contrast"], [5])
    run_benchmark({"r20": model}, data, BenchConfig(ns=(4,), channels_last=True))
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
