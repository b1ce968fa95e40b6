"""`bnadapt bench` / `sweep` end to end: output files, resume after a crash, determinism, one-line errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from bnadapt.cli import main
from bnadapt.corruptions.export import export_corrupted
from bnadapt.results import RESULTS, read_results


@pytest.fixture
def setup(tmp_path, resnet20_checkpoint):
    x = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(48) % 10)
    return tmp_path


def _bench(p, out, *extra, data=None):
    data = data or f"generate:cifar:{p / 'in.npz'}"
    return ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(p / "ck.pt"), "--data", data, "--out",
            str(p / out), "--corruptions", "gaussian_noise", "contrast", "--severities", "1,5", "--n", "16",
            "--no-progress", "--no-plots", *extra]  # fmt: skip


def _accs(path):
    return {tuple(r[k] for k in ("method", "n", "seed", "corruption", "severity")): r["accuracy"]
            for r in read_results(path)[1]}  # fmt: skip


def test_bench_writes_results_summary_report(setup, capsys):
    assert main(_bench(setup, "o", "--methods", "source,replace,prior", "--seeds", "0,1")) == 0
    out = capsys.readouterr().out
    assert "replace" in out and "results in" in out
    headers, rows = read_results(setup / "o")
    assert headers[0]["command"][:2] == ["bnadapt", "bench"] and headers[0]["preprocessing"]["cifar10_resnet20"]
    assert len(rows) == 5 * 5  # clean + 2x2 cells; source once + replace, prior x 2 seeds
    summary = json.loads((setup / "o" / "summary.json").read_text())
    assert [(s["method"], s["n"], s["seeds"]) for s in summary] == [("source", 0, [None]), ("replace", 16, [0, 1]),
                                                                    ("prior", 16, [0, 1])]  # fmt: skip
    assert 0 <= summary[1]["mean_acc"] <= 1 and summary[1]["clean_acc"] is not None and summary[1]["mce"] is None
    assert "| method | clean | gauss | contr | mean |" in (setup / "o" / "report.md").read_text()


def test_same_command_twice_and_batch_sizes_identical(setup):
    assert main(_bench(setup, "a", "-b", "16")) == 0
    assert main(_bench(setup, "b", "-b", "16")) == 0
    assert main(_bench(setup, "c", "-b", "64")) == 0
    assert _accs(setup / "a") == _accs(setup / "b") == _accs(setup / "c")


def test_limit_per_cell_recorded_and_resumable(setup):
    assert main(_bench(setup, "l", "--limit-per-cell", "20")) == 0
    headers, rows = read_results(setup / "l")
    assert {r["total"] for r in rows} == {20} and headers[0]["config"]["extra"]["limit_per_cell"] == 20
    assert main(_bench(setup, "l", "--limit-per-cell", "20", "--resume")) == 0
    assert main(_bench(setup, "l", "--resume")) == 2  # another subset: refused, not mixed
    assert len(read_results(setup / "l")[1]) == len(rows)


def test_resume_after_crash_gives_the_same_rows(setup, capsys):
    assert main(_bench(setup, "full", "--seeds", "0,1")) == 0
    assert main(_bench(setup, "crash", "--seeds", "0,1")) == 0
    path = setup / "crash" / RESULTS
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]) + lines[3][:25])  # header + 2 rows + half a row: killed mid-write
    assert main(_bench(setup, "crash", "--seeds", "0,1")) == 2  # without --resume: refused, file untouched
    assert "--resume" in capsys.readouterr().err
    assert main(_bench(setup, "crash", "--seeds", "0,1", "--resume")) == 0
    assert _accs(setup / "crash") == _accs(setup / "full")
    assert len(read_results(setup / "crash")[1]) == len(read_results(setup / "full")[1])


def test_sweep_and_adapt_on(setup):
    assert main(["sweep", *_bench(setup, "s", "--n", "2,8", "--seeds", "0-1")[1:]]) == 0
    assert {s["n"] for s in json.loads((setup / "s" / "summary.json").read_text())} == {0, 2, 8}
    assert main(_bench(setup, "t", "--adapt-on", "gaussian_noise:5")) == 0
    assert {r["adapt_on"] for r in read_results(setup / "t")[1]} == {"gaussian_noise:5"}


def _err(capsys):
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_bad_input_one_line_exit_2(setup, capsys):
    assert main(_bench(setup, "o")) == 0
    capsys.readouterr()
    assert main(_bench(setup, "o", "--prior", "4")) == 2  # another command into the same folder
    assert "another one" in _err(capsys)
    before = (setup / "o" / RESULTS).read_bytes()
    assert main(_bench(setup, "o", "--n", "100")) == 2
    assert "lower --n" in _err(capsys) and (setup / "o" / RESULTS).read_bytes() == before
    assert main(_bench(setup, "x", data="cifar:/nowhere")) == 2
    assert "expected --data" in _err(capsys)
    assert main(_bench(setup, "x", "--methods", "source,magic")) == 2
    assert "--methods" in _err(capsys)


def test_missing_corruptions_named_and_allow_partial(setup, capsys):
    export_corrupted(setup / "in.npz", setup / "c10c", corruptions=["contrast"], severities=[1, 5])
    args = _bench(setup, "p", data=f"cifar-c:{setup / 'c10c'}")
    assert main(args) == 2
    assert "gaussian_noise.npy" in _err(capsys)
    assert main([*args, "--allow-partial"]) == 0
    assert {r["corruption"] for r in read_results(setup / "p")[1]} == {"contrast"}


@pytest.mark.shared
def test_shared_resnet20_replace_beats_source(shared, tmp_path):
    with np.load(shared / "data" / "cifar10" / "test1000_lossless.npz") as z:
        np.savez(tmp_path / "c300.npz", x=z["x"][:300], y=z["y"][:300])
    args = ["bench", "--model", "cifar10_resnet20", "--data", f"generate:cifar:{tmp_path / 'c300.npz'}", "--out",
            str(tmp_path / "o"), "--corruptions", "gaussian_noise", "contrast", "--severities", "5", "--n", "32",
            "--no-progress", "--no-plots"]  # fmt: skip
    assert main(args) == 0
    acc = _accs(tmp_path / "o")
    assert acc[("source", 0, None, "clean", 0)] > 0.85
    assert acc[("replace", 32, 0, "gaussian_noise", 5)] > acc[("source", 0, None, "gaussian_noise", 5)] + 0.1


def test_progress_bar_shows_cells_and_accuracy(setup, capsys, monkeypatch):
    args = [a for a in _bench(setup, "o") if a != "--no-progress"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "5/5" in err and "contrast:5: source" in err and "%" in err
