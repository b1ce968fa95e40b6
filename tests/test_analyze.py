"""`bnadapt analyze`: each analysis's tables and plot, agreement with plain `bench` runs, resume, refused input."""

from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest
import torch

from bnadapt.adapt import adapt
from bnadapt.analyze import default_ks, run_analysis
from bnadapt.benchmark import BenchConfig, run_benchmark
from bnadapt.cli import main
from bnadapt.data import open_data, to_float_nchw
from bnadapt.results import RESULTS, read_results
from conftest import make_tiny

CORR = ["gaussian_noise", "contrast"]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def npz(tmp_path):
    """24 random images labelled by the model itself, so the source is right on all clean images and every change
    of statistics moves some predictions (a random-init net's own statistics would predict one class throughout)."""
    x = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        y = _model()(to_float_nchw(x)).argmax(1).numpy()
    np.savez(tmp_path / "in.npz", x=x, y=y)
    return tmp_path / "in.npz"


def _model():
    x = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    return adapt(make_tiny(), x, method="replace")  # statistics that fit these images: varied predictions


def _data(npz, severities=(5,)):
    return open_data(f"generate:cifar:{npz}", CORR, list(severities))


def _run(analysis, npz, out, severities=(5,), **kw):
    config = BenchConfig(ns=(8,), seeds=(0, 1))
    return run_analysis(analysis, {"tiny": _model()}, _data(npz, severities), config, out, plots=HAS_MPL, **kw)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _bench(npz, severities=(5,), **config):
    """Plain run_benchmark rows -> {(method, corruption, severity): accuracy averaged over the seeds}."""
    rows = run_benchmark({"tiny": _model()}, _data(npz, severities), BenchConfig(ns=(8,), seeds=(0, 1), **config))
    acc: dict[tuple, list[float]] = {}
    for r in rows:
        acc.setdefault((r["method"], r["corruption"], r["severity"]), []).append(r["accuracy"])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def _written(root, analysis, table_head, res):
    """The table, csv, plot and record of ``analysis`` under ``root``; returns the csv rows."""
    assert res.table.startswith(table_head)
    md = (root / f"{analysis}.md").read_text()
    assert table_head in md and "n=8, seeds 0, 1" in md
    assert (root / f"{analysis}.png").is_file() == HAS_MPL and (f"({analysis}.png)" in md) == HAS_MPL
    record = json.loads((root / "analysis.json").read_text())
    assert record["bn_layers"] == 3 and set(record["runs"]) == {p.name for p in (root / "runs").iterdir()}
    return _csv(root / f"{analysis}.csv")


def test_transfer_writes_its_matrix_whose_diagonal_is_bench_adapt_on(tmp_path, npz):
    res = _run("transfer", npz, tmp_path / "o")
    head = "| adapt on \\ evaluate on | clean | gauss | contr | mean |"
    rows = _written(tmp_path / "o" / "transfer", "transfer", head, res)
    assert [r["adapt_on"] for r in rows] == ["source (no adaptation)", "clean", *CORR]
    table = {r["adapt_on"]: r for r in rows}
    for name in CORR:
        bench = _bench(npz, methods=("replace",), adapt_on=f"{name}:5")
        assert float(table[name][name]) == round(bench[("replace", name, 5)], 6)
        assert float(table[name]["clean"]) == round(bench[("replace", "clean", 0)], 6)  # the row, not just the diagonal
    source = _bench(npz, methods=("source",))
    expected = [round(source[("source", c, 5)], 6) for c in CORR]
    assert [float(table["source (no adaptation)"][c]) for c in CORR] == expected
    mean = sum(float(table["contrast"][c]) for c in CORR) / len(CORR)
    assert abs(float(table["contrast"]["mean"]) - mean) < 1e-5


def test_parts_both_and_depth_all_equal_replace(tmp_path, npz):
    sev = (3, 5)
    bench = _bench(npz, sev)
    head = "| corruption | severity | source | mean only | var only | both (replace) |"
    rows = _written(tmp_path / "o" / "parts", "parts", head, _run("parts", npz, tmp_path / "o", sev))
    assert [(r["corruption"], r["severity"]) for r in rows][-3:] == [("mean", "3"), ("mean", "5"), ("mean", "all")]
    parts = {(r["corruption"], int(r["severity"])): r for r in rows if r["corruption"] != "mean"}
    head = "| k (BN layers adapted) | first k | last k |"
    rows = _written(tmp_path / "o" / "depth", "depth", head, _run("depth", npz, tmp_path / "o", sev))
    assert [r["variant"] for r in rows] == ["source", "first-1", "first-2", "last-1", "last-2", "all"]  # 3 BN layers
    depth = {r["variant"]: r for r in rows}
    assert len(parts) == 5 == len(bench) // 2
    for cell in parts:
        assert float(parts[cell]["both (replace)"]) == round(bench[("replace", *cell)], 6)
        assert float(parts[cell]["source"]) == round(bench[("source", *cell)], 6)
        column = _cell_key(cell)
        assert float(depth["all"][column]) == round(bench[("replace", *cell)], 6)
        assert float(depth["source"][column]) == round(bench[("source", *cell)], 6)
    # mean-only, var-only and the first/last layers are different adaptations: on random data each moves a cell
    for other in ("mean only", "var only"):
        assert any(parts[c][other] != parts[c]["both (replace)"] for c in parts)
    assert depth["first-2"] != depth["last-2"]
    # ... and each is the bench run with that option, cell for cell
    others = [("mean only", dict(part="mean")), ("var only", dict(part="var"))]
    for table, column, option in [*((parts, c, o) for c, o in others), (depth, "last-1", dict(last=1))]:
        bench = _bench(npz, sev, methods=("replace",), **option)
        for cell in parts:
            value = table[cell][column] if table is parts else table[column][_cell_key(cell)]
            assert float(value) == round(bench[("replace", *cell)], 6)


def _cell_key(cell):
    return cell[0] if cell[0] == "clean" else f"{cell[0]}:{cell[1]}"


def test_resume_skips_finished_cells_and_completes_a_cut_run(tmp_path, npz):
    calls = []
    first = _run("depth", npz, tmp_path / "o", ks=[1], progress=lambda *a: calls.append(a))
    assert len(calls) == 3 * 3 and calls[-1][:2] == (9, 9)  # 3 runs (all, first-1, last-1) x 3 cells
    table = (tmp_path / "o" / "depth" / "depth.csv").read_text()
    with pytest.raises(ValueError, match="--resume"):
        _run("depth", npz, tmp_path / "o", ks=[1])
    calls.clear()
    assert _run("depth", npz, tmp_path / "o", ks=[1], resume=True, progress=lambda *a: calls.append(a)) == first
    assert calls == []  # every cell was finished: nothing is evaluated again
    path = tmp_path / "o" / "depth" / "runs" / "last-1" / RESULTS
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))  # killed after its first cell: header + that cell's rows (2 seeds)
    # max_bytes=0: the cells do not fit in memory, so the runs read (and corrupt) them themselves: same numbers.
    _run("depth", npz, tmp_path / "o", ks=[1], resume=True, progress=lambda *a: calls.append(a), max_bytes=0)
    assert len(calls) == 2 and calls[-1][:2] == (9, 9)  # only the 2 missing cells ran
    assert (tmp_path / "o" / "depth" / "depth.csv").read_text() == table


def test_tables_show_the_seeds_asked_for(tmp_path, npz):
    config = BenchConfig(ns=(8,), seeds=(0,))
    run_analysis("parts", {"tiny": _model()}, _data(npz), config, tmp_path / "one", plots=False)
    _run("parts", npz, tmp_path / "o")  # seeds 0 and 1
    res = run_analysis("parts", {"tiny": _model()}, _data(npz), config, tmp_path / "o", resume=True, plots=False)
    assert (tmp_path / "o/parts/parts.csv").read_text() == (tmp_path / "one/parts/parts.csv").read_text()
    assert "seeds 0\n" in (tmp_path / "o/parts/parts.md").read_text() and res.table


def test_default_ks():
    assert default_ks(19) == [1, 2, 4, 8, 16] and default_ks(3) == [1, 2] and default_ks(1) == []


# --- the command line ----------------------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path, resnet20_checkpoint):
    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(16) % 10)
    return tmp_path


def _argv(p, analysis="transfer", *extra):
    return ["analyze", analysis, "--model", "cifar10_resnet20", "--checkpoint", str(p / "ck.pt"), "--data",
            f"generate:cifar:{p / 'in.npz'}", "--corruptions", "contrast", "--n", "4", "--out", str(p / "o"),
            "--no-progress", "--no-plots", *extra]  # fmt: skip


def test_cli_runs_records_the_command_and_resumes(cli, capsys):
    assert main(_argv(cli)) == 0
    out = capsys.readouterr().out
    assert "| adapt on \\ evaluate on | clean | contr | mean |" in out and "transfer.md" in out
    root = cli / "o" / "transfer"
    assert json.loads((root / "analysis.json").read_text())["command"][:3] == ["bnadapt", "analyze", "transfer"]
    assert "- command: `bnadapt analyze transfer --model cifar10_resnet20" in (root / "transfer.md").read_text()
    rows = sum(len(read_results(d)[1]) for d in (root / "runs").iterdir())
    assert main(_argv(cli)) == 2 and "--resume" in capsys.readouterr().err
    assert main(_argv(cli, "transfer", "--resume")) == 0
    assert sum(len(read_results(d)[1]) for d in (root / "runs").iterdir()) == rows


@pytest.mark.parametrize(
    "analysis, extra, match",
    [
        ("transfer", ["--severities", "3,5"], "expected one --severity for transfer"),
        ("parts", ["--ks", "1,2"], "expected --ks only with the depth analysis"),
        ("depth", ["--ks", "1,40"], "expected --ks within 1..19"),
        ("depth", ["--ks", "x"], "expected integers"),
        ("depth", ["--n", "0"], "expected a positive integer"),
        ("depth", ["--n", "99"], "expected --n <= the images of every cell"),
        ("depth", ["--corruptions", "nope"], "expected corruption names"),
        ("parts", ["--data", "npz:{p}/in.npz"], "expected corrupted cells to analyse"),
        ("sideways", [], "invalid choice"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(cli, capsys, analysis, extra, match):
    try:
        code = main(_argv(cli, analysis, *(e.format(p=cli) for e in extra)))
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1
    assert not (cli / "o").exists()  # refused before any output was written


def test_cli_two_models_refused(cli, capsys):
    argv = _argv(cli)
    argv.insert(argv.index("cifar10_resnet20") + 1, "cifar10_resnet56")
    assert main(argv) == 2 and "expected one --model for analyze" in capsys.readouterr().err
