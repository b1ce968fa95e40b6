"""Reports regenerated from results.jsonl alone: markdown tables, csv, json, plots (or their clean absence)."""

from __future__ import annotations

import csv
import json
import logging
import sys

import pytest

from bnadapt.cli import main
from bnadapt.report import write_report
from bnadapt.results import Journal

HEADER = {"command": ["bnadapt", "bench"], "fingerprint": {}, "data": {"spec": "generate:cifar:x", "kind": "generate"}}


def _rows():
    out = []
    for c in ("gaussian_noise", "contrast", "spatter"):
        for s in (1, 5):
            out.append({"model": "m", "method": "source", "n": 0, "seed": None, "corruption": c, "severity": s,
                        "correct": 50, "total": 100, "accuracy": 0.5, "seconds": 0.1, "adapt_on": None})  # fmt: skip
            for n in (2, 8):
                for seed in (0, 1):
                    acc = 0.6 + 0.01 * n + 0.01 * seed
                    out.append({"model": "m", "method": "replace", "n": n, "seed": seed, "corruption": c,
                                "severity": s, "correct": round(100 * acc), "total": 100, "accuracy": acc,
                                "seconds": 0.1, "adapt_on": None})  # fmt: skip
    return out


@pytest.fixture
def results(tmp_path):
    Journal(tmp_path / "r", HEADER).append(_rows())
    return tmp_path / "r"


def test_markdown_tables(results, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with caplog.at_level(logging.WARNING):
        written = write_report(results, "md")
    assert [p.name for p in written] == ["summary.json", "report.md"]
    assert "pip install matplotlib" in caplog.text
    md = (results / "report.md").read_text()
    assert "| method | gauss | contr | spatt | mean | extra |" in md
    assert "| source | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 |" in md
    assert "| replace n=8 | 68.5 | 68.5 | 68.5 | 68.5 ± 0.7 | 68.5 |" in md  # ± the std across the 2 seeds
    assert "| method | s1 | s5 | mean |" in md and "`bnadapt bench`" in md
    summary = json.loads((results / "summary.json").read_text())
    assert [(s["method"], s["n"]) for s in summary] == [("source", 0), ("replace", 2), ("replace", 8)]


def test_csv_and_json(results):
    assert [p.name for p in write_report(results, "json")] == ["summary.json"]
    write_report(results, "csv")
    with open(results / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and float(rows[0]["accuracy"]) == 0.5
    with open(results / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["method"] == "source" and float(table[0]["gaussian_noise"]) == 0.5


def test_plots_when_matplotlib_is_there(results):
    pytest.importorskip("matplotlib")
    names = [p.name for p in write_report(results, "md")]
    assert {"gain_heatmap.png", "acc_vs_severity.png", "acc_vs_n.png"} <= set(names)
    assert (results / "acc_vs_n.png").read_bytes()[:4] == b"\x89PNG"


def test_report_cli(results, tmp_path, capsys):
    assert main(["report", str(results), "--format", "csv", "--no-plots"]) == 0
    assert "table.csv" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "found none" in err and len(err.strip().splitlines()) == 1


def test_clean_set_only(tmp_path):
    """npz:/folder: data is one clean cell: tables and summary, and no plot that would need corruptions."""
    pytest.importorskip("matplotlib")
    rows = [{"model": "m", "method": m, "n": n, "seed": sd, "corruption": "clean", "severity": 0, "correct": 80,
             "total": 100, "accuracy": 0.8, "seconds": 0.1, "adapt_on": None}
            for m, n, sd in (("source", 0, None), ("replace", 32, 0))]  # fmt: skip
    Journal(tmp_path / "r", HEADER).append(rows)
    written = write_report(tmp_path / "r", "md")
    assert [p.name for p in written] == ["summary.json", "report.md"]
    assert "| replace n=32 | 80.0 |" in (tmp_path / "r" / "report.md").read_text()
