"""The evaluation protocols (issue 15): stream orders, continual / gradual / mixed settings, per-cell draws, n = 0
and batches of one for online methods, and prior's default being Schneider et al.'s estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bnadapt import adapt
from bnadapt.adapt import method_options, sample_indices
from bnadapt.benchmark import BenchConfig, run_benchmark
from bnadapt.cli import main
from bnadapt.data import ArrayImages, Cell, open_data, to_float_nchw
from bnadapt.models import cifar_resnet
from bnadapt.streams import check_order, draw_seed, mixed_order, plan_streams, stream_order
from conftest import make_tiny

CORR = ["gaussian_noise", "contrast"]


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    f = tmp_path / "in.npz"
    np.savez(f, x=x, y=np.repeat(np.arange(5), 8))  # class-sorted, as released sets and class folders are
    return f


@pytest.fixture
def data(npz):
    return open_data(f"generate:cifar:{npz}", CORR, [1, 5])


def _by_key(rows):
    return {(r["method"], r["n"], r["seed"], r["corruption"], r["severity"], r.get("step")): r for r in rows}


def _cell(row):
    return row["corruption"], row["severity"]


def _switches(labels: np.ndarray) -> int:
    return int((np.diff(labels) != 0).sum())


def test_stream_orders():
    labels = np.repeat(np.arange(10), 100)
    for order in ("shuffled", "sorted", "dirichlet:0.1", "dirichlet:10"):
        perm = stream_order(labels, order, seed=3)
        assert sorted(perm.tolist()) == list(range(1000))
        assert np.array_equal(perm, stream_order(labels, order, seed=3))  # seeded
    assert stream_order(labels, "sorted", 0).tolist() == list(range(1000))
    shuffled = _switches(labels[stream_order(labels, "shuffled", 0)])
    correlated = _switches(labels[stream_order(labels, "dirichlet:0.1", 0)])
    mild = _switches(labels[stream_order(labels, "dirichlet:100", 0)])
    assert correlated < 0.2 * shuffled  # long runs of one class
    assert correlated < mild  # a large ALPHA approaches class-balanced slots
    for bad in ("random", "dirichlet:", "dirichlet:-1", "dirichlet:nan", "dirichlet:x"):
        with pytest.raises(ValueError, match="expected --order"):
            check_order(bad)


def test_unsorted_positions_read_the_images_asked_for():
    """A shuffled batch whose first and last positions span exactly its length is not a run (it once read a slice)."""
    x = np.arange(20, dtype=np.uint8)[:, None, None, None].repeat(2, 1).repeat(2, 2).repeat(3, 3)
    images = ArrayImages(x, np.zeros(20, np.int64))
    for asked in ([0, 2, 1, 3], [5, 7, 6, 8, 9], [4], [2, 3, 4], [3, 0, 2, 1]):
        assert images.get(np.array(asked))[:, 0, 0, 0].tolist() == asked


def test_plan_streams():
    cells = [Cell("clean", 0)] + [Cell(c, s) for c in CORR for s in (1, 3, 5)]
    assert plan_streams(cells, "reset") == [[c] for c in cells]
    continual = plan_streams(cells, "continual")
    assert continual[0] == [Cell("clean", 0)]
    assert continual[1:] == [[Cell(c, s) for c in CORR] for s in (1, 3, 5)]
    gradual = plan_streams(cells, "gradual")
    assert [str(c) for c in gradual[1]] == [f"{c}:{s}" for c in CORR for s in (1, 3, 5, 3, 1)]
    assert plan_streams(cells, "mixed") == [[Cell("clean", 0)], cells[1:]]
    with pytest.raises(ValueError, match="expected --setting"):
        plan_streams(cells, "episodic")


def test_draws_are_independent_per_cell_and_recorded(data):
    tiny = make_tiny()
    rows = run_benchmark({"t": tiny}, data, BenchConfig(methods=("replace",), ns=(16,), seeds=(0,)))
    seeds = {(r["corruption"], r["severity"]): r["draw_seed"] for r in rows}
    assert len(set(seeds.values())) == len(seeds)  # one draw per cell, not one per seed for every cell
    cell = data.cell("contrast", 5)
    assert seeds[("contrast", 5)] == draw_seed(0, Cell("contrast", 5))
    # The row can be reproduced alone from its recorded draw.
    x = cell.get(np.arange(len(cell)))
    manual = adapt(tiny, x[sample_indices(len(cell), 16, seeds[("contrast", 5)])], method="replace", batch_size=16)
    with torch.no_grad():
        pred = manual(to_float_nchw(x)).argmax(1).numpy()
    row = next(r for r in rows if (r["corruption"], r["severity"]) == ("contrast", 5))
    assert row["accuracy"] == float(np.mean(pred == cell.labels))
    assert row["order"] == "shuffled" and row["setting"] == "reset"


def test_order_changes_online_methods_only(data):
    tiny = make_tiny()
    cfg = dict(methods=("source", "replace", "test-batch"), ns=(8,), batch_size=8)
    shuffled = _by_key(run_benchmark({"t": tiny}, data, BenchConfig(**cfg)))
    ordered = _by_key(run_benchmark({"t": tiny}, data, BenchConfig(order="sorted", **cfg)))
    for key, row in shuffled.items():
        if key[0] != "test-batch":
            assert row["correct"] == ordered[key]["correct"]  # offline results do not depend on the order
    # Batches of 8 from a class-sorted set are single-class in sorted order: test-batch's statistics change.
    assert any(row["correct"] != ordered[key]["correct"] for key, row in shuffled.items() if key[0] == "test-batch")
    assert {r["order"] for r in ordered.values()} == {"sorted"}


def test_continual_carries_state_and_mixed_keeps_cells(data):
    tiny = make_tiny()
    cfg = dict(methods=("source", "ema", "replace"), ns=(8,), batch_size=8)
    reset = _by_key(run_benchmark({"t": tiny}, data, BenchConfig(**cfg)))
    continual = run_benchmark({"t": tiny}, data, BenchConfig(setting="continual", **cfg))
    assert {r["setting"] for r in continual} == {"continual"}
    # Per severity, one stream through the corruptions: each row has its step in the stream.
    steps = {(r["corruption"], r["severity"]): r["step"] for r in continual if r["method"] == "source"}
    assert steps == {("clean", 0): 0, ("gaussian_noise", 1): 0, ("contrast", 1): 1, ("gaussian_noise", 5): 0,
                     ("contrast", 5): 1}  # fmt: skip
    for r in continual:
        if r["method"] == "source":  # stateless: the same counts as in reset
            assert r["correct"] == reset[("source", 0, None, r["corruption"], r["severity"], None)]["correct"]
    # replace adapted once, on the stream's first images (gaussian_noise's): its contrast rows are not reset's.
    second = [r for r in continual if r["method"] == "replace" and r["step"] == 1]
    assert any(r["correct"] != reset[("replace", 8, 0, *_cell(r), None)]["correct"] for r in second)
    mixed = run_benchmark({"t": tiny}, data, BenchConfig(setting="mixed", **cfg))
    assert sorted((r["corruption"], r["severity"]) for r in mixed if r["method"] == "source") == sorted(
        (c.corruption, c.severity) for c in data.cells
    )
    for r in mixed:
        assert r["total"] == 40  # every image counted once, in its own cell's row
        if r["method"] == "source":
            assert r["correct"] == reset[("source", 0, None, r["corruption"], r["severity"], None)]["correct"]


def test_mixed_follows_the_order():
    labels = [np.repeat(np.arange(10), 50), np.repeat(np.arange(10), 50)[::-1].copy()]
    streams = {}
    for order in ("shuffled", "sorted", "dirichlet:0.1"):
        origin, local = mixed_order(labels, order, seed=4)
        assert sorted(zip(origin.tolist(), local.tolist(), strict=True)) == [(k, i) for k in (0, 1) for i in range(500)]
        assert 300 < _switches(origin) < 700  # the two cells stay interleaved whatever the order
        streams[order] = np.array([labels[k][i] for k, i in zip(origin, local, strict=True)])
    for k in (0, 1):  # sorted: each cell's images in the data's own order
        origin, local = mixed_order(labels, "sorted", seed=4)
        assert local[origin == k].tolist() == list(range(500))
    assert _switches(streams["dirichlet:0.1"]) < 0.2 * _switches(streams["shuffled"])  # label runs across cells
    same = mixed_order(labels, "shuffled", 4)  # the stream of earlier versions: one seeded permutation of the union
    perm = np.random.default_rng(4).permutation(1000)
    assert np.array_equal(same[0], (perm >= 500).astype(np.int64)) and np.array_equal(same[1], perm % 500)


def test_refresh_adapts_again_on_the_latest_images(data):
    tiny = make_tiny()
    cfg = dict(methods=("source", "replace", "ema"), ns=(8,), batch_size=8, setting="continual")
    once = _by_key(run_benchmark({"t": tiny}, data, BenchConfig(**cfg)))
    again = _by_key(run_benchmark({"t": tiny}, data, BenchConfig(refresh=8, **cfg)))
    assert once.keys() == again.keys()
    for key, row in again.items():
        if key[0] != "replace":  # online and image-free methods ignore --refresh
            assert row["correct"] == once[key]["correct"] and "refresh" not in row
    replaced = [(row, once[key]) for key, row in again.items() if key[0] == "replace"]
    assert all(row["refresh"] == 8 for row, _ in replaced)
    # The first cell of a stream starts from the same first 8 images; later cells see statistics of their own images.
    later = [(row, old) for row, old in replaced if row["step"] > 0]
    assert any(row["correct"] != old["correct"] for row, old in later)
    # Adapting again on a window of the cell itself, the continual rows come close to reset's.
    reset = _by_key(run_benchmark({"t": tiny}, data, BenchConfig(methods=("replace",), ns=(8,), batch_size=8)))

    def gap(rows):
        return sum(abs(r["accuracy"] - reset[("replace", 8, 0, *_cell(r), None)]["accuracy"]) for r in rows)

    assert gap([row for row, _ in later]) < gap([old for _, old in later])
    with pytest.raises(ValueError, match="--refresh K >= 1 with --setting continual"):
        run_benchmark({"t": tiny}, data, BenchConfig(methods=("replace",), refresh=8))


def test_gradual_visits_cells_twice_and_resumes(data, tmp_path):
    tiny = make_tiny()
    cfg = BenchConfig(methods=("source", "test-batch"), setting="gradual", batch_size=8)
    rows = run_benchmark({"t": tiny}, data, cfg, out=tmp_path / "r")
    corrupted = [r for r in rows if r["method"] == "source" and r["corruption"] != "clean"]
    assert [(r["corruption"], r["severity"]) for r in sorted(corrupted, key=lambda r: r["step"])] == [
        (c, s) for c in CORR for s in (1, 5, 1)
    ]
    again = run_benchmark({"t": tiny}, data, cfg, out=tmp_path / "r", resume=True)
    assert len(again) == len(rows)  # nothing written twice


def test_n_zero_and_batches_of_one(data):
    net = cifar_resnet(8)  # every BN layer is 2-D: a batch of one image still gives H x W values per channel
    small = open_data(f"generate:cifar:{data.spec.path}", ["contrast"], [5], limit=6)
    cfg = BenchConfig(methods=("test-batch", "ema", "tent", "replace"), ns=(0, 4), batch_size=1)
    rows = run_benchmark({"t": net}, small, cfg)
    got = {(r["method"], r["n"]) for r in rows}
    assert got == {("test-batch", 0), ("ema", 0), ("ema", 4), ("tent", 0), ("tent", 4), ("replace", 4)}
    assert all(r["total"] == 6 for r in rows)
    with pytest.raises(ValueError, match="--n 0"):
        run_benchmark({"t": net}, small, BenchConfig(methods=("replace",), ns=(0,)))
    # A flat BN layer gets one value per channel from a batch of one: refused in one line, before anything runs.
    assert run_benchmark({"t": make_tiny()}, small, BenchConfig(methods=("test-batch",), batch_size=4))  # 6 = 4 + 2
    with pytest.raises(ValueError, match="at least 2 images for online methods.*'bn3'"):
        run_benchmark({"t": make_tiny()}, small, BenchConfig(methods=("test-batch",), batch_size=5))  # 6 = 5 + 1


def test_prior_is_schneider_by_default():
    assert method_options("prior")["order"] == "sequential"
    net = make_tiny()
    x = torch.rand(16, 3, 32, 32)
    default = adapt(net, x, method="prior")
    theirs = adapt(net, x, method="prior", options={"order": "sequential"})
    ours = adapt(net, x, method="prior", options={"order": "independent"})
    d, t, o = (list(m.state_dict().values()) for m in (default, theirs, ours))
    assert all(torch.equal(a, b) for a, b in zip(d, t, strict=True))
    assert any(not torch.equal(a, c) for a, c in zip(d, o, strict=True))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--order", "random"], "expected --order"),
        (["--setting", "continual", "--adapt-on", "fog:1"], "--adapt-on with --setting reset"),
        (["--methods", "replace", "--n", "0"], "--n 0"),
        (["--refresh", "32"], "--refresh K >= 1 with --setting continual"),
        (["--setting", "mixed", "--refresh", "0"], "--refresh"),
    ],
)
def test_cli_refuses_bad_protocols(npz, tmp_path, resnet20_checkpoint, capsys, flags, message):
    data = f"generate:cifar:{npz}"
    base = ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(resnet20_checkpoint), "--data", data,
            "--out", str(tmp_path / "o"), "--corruptions", "fog", "--severities", "1"]  # fmt: skip
    try:
        code = main([*base, *flags])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.jsonl").exists()
