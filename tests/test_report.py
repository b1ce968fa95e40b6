"""Reports regenerated from results.jsonl alone: markdown tables (top-1, top-5, difference to source), csv, json,
plots (their size, resolution and layout, or their clean absence)."""

from __future__ import annotations

import csv
import itertools
import json
import logging
import struct
import sys

import pytest

from bnadapt.cli import main
from bnadapt.report import write_report
from bnadapt.results import Journal, cells_by_group

HEADER = {"command": ["bnadapt", "bench"], "fingerprint": {}, "data": {"spec": "generate:cifar:x", "kind": "generate"}}


def _rows():
    out = []
    for c in ("gaussian_noise", "contrast", "spatter"):
        for s in (1, 5):
            out.append({"model": "m", "method": "source", "n": 0, "seed": None, "corruption": c, "severity": s,
                        "correct": 50, "correct5": 70, "total": 100, "accuracy": 0.5, "top5": 0.7, "seconds": 0.1,
                        "adapt_on": None})  # fmt: skip
            for n in (2, 8):
                for seed in (0, 1):
                    acc = 0.6 + 0.01 * n + 0.01 * seed
                    out.append({"model": "m", "method": "replace", "n": n, "seed": seed, "corruption": c,
                                "severity": s, "correct": round(100 * acc), "correct5": round(100 * acc) + 20,
                                "total": 100, "accuracy": acc, "top5": acc + 0.2, "seconds": 0.1,
                                "adapt_on": None})  # fmt: skip
    return out


def _old(rows):
    """The rows as a version before top-5 wrote them."""
    return [{k: v for k, v in r.items() if k not in ("top5", "correct5")} for r in rows]


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


def test_report_says_what_was_run(results):
    write_report(results, "md", plots=False)
    md = (results / "report.md").read_text()
    assert "15 benchmark corruptions x" not in md  # 2 of them were run, not 15
    assert (
        "mean: 2 of the 15 benchmark corruptions (gauss, contr) x 2 severities (1, 5), ± std across seeds; extra: "
        "1 of the 4 held-out corruptions (spatt)." in md
    )
    assert "## Per severity (2 of the 15 benchmark corruptions (gauss, contr))" in md


def test_top5_table_and_older_rows_shown_as_na(results, tmp_path):
    write_report(results, "md", plots=False)
    md = (results / "report.md").read_text()
    top5 = md.split("## Top-5 accuracy")[1]
    assert "| source | 70.0 | 70.0 | 70.0 | 70.0 | 70.0 |" in top5
    assert "| replace n=8 | 88.5 | 88.5 | 88.5 | 88.5 ± 0.7 | 88.5 |" in top5
    assert json.loads((results / "summary.json").read_text())[2]["top5"]["mean_acc"] == pytest.approx(0.885)
    Journal(tmp_path / "old", HEADER).append(_old(_rows()))
    write_report(tmp_path / "old", "csv")
    assert "| replace n=8 | 68.5 | 68.5 | 68.5 | 68.5 ± 0.7 | 68.5 |" in write_report_md(tmp_path / "old")
    assert "n/a: these rows were written before bnadapt recorded top-5" in write_report_md(tmp_path / "old")
    with open(tmp_path / "old" / "results.csv") as f:
        assert next(csv.DictReader(f))["top5"] == ""  # blank, as for any absent value
    Journal(tmp_path / "mixed", HEADER).append(_old(_rows()[:5]) + _rows()[5:])  # gauss 1 from an older version
    md = write_report_md(tmp_path / "mixed")
    assert "| source | n/a | 70.0 | 70.0 | n/a | 70.0 |" in md and "n/a: rows written before top-5" in md


def write_report_md(folder):
    write_report(folder, "md", plots=False)
    return (folder / "report.md").read_text()


def test_difference_to_source_with_its_interval_and_seed_spread(results):
    md = write_report_md(results)
    stats = md.split("## Difference to source and spread over seeds")[1]
    # replace n=8 beats source by 18.5 pp on every cell: a zero-width interval; its seeds' means are 68.0 and 69.0.
    assert "| replace n=8 | 68.5 | +18.5 | [+18.5, +18.5] | 4 | 2 | 0.7 | 68.0–69.0 |" in stats
    assert "| source | 50.0 | (reference) | - | - | - | - | - |" in stats
    assert "paired bootstrap over those cells (10000 resamples" in stats
    s = json.loads((results / "summary.json").read_text())[2]
    assert s["diff_to_source"] == pytest.approx(0.185) and s["diff_to_source_ci95"] == pytest.approx([0.185, 0.185])
    assert s["seed_std"] == pytest.approx(0.01 / 2**0.5)


def test_csv_and_json(results):
    assert [p.name for p in write_report(results, "json")] == ["summary.json"]
    write_report(results, "csv")
    with open(results / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and float(rows[0]["accuracy"]) == 0.5
    with open(results / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert table[0]["method"] == "source" and float(table[0]["gaussian_noise"]) == 0.5


def _png_size_and_dpi(path):
    """(width, height) in pixels and the resolution in dots per inch that the PNG's pHYs chunk records."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    at = data.index(b"pHYs")
    ppm_x, _, unit = struct.unpack(">IIB", data[at + 4 : at + 13])
    assert unit == 1  # pixels per metre
    return (width, height), ppm_x * 0.0254


def test_plots_when_matplotlib_is_there(results):
    pytest.importorskip("matplotlib")
    names = [p.name for p in write_report(results, "md")]
    assert {"gain_heatmap.png", "acc_vs_severity.png", "acc_vs_n.png"} <= set(names)
    for name in ("gain_heatmap.png", "acc_vs_severity.png", "acc_vs_n.png"):
        (w, h), dpi = _png_size_and_dpi(results / name)
        assert dpi == pytest.approx(150, abs=0.5) and w >= 400 and h >= 250


def _figures(rows):
    from bnadapt.plots import make_figures, pyplot

    plt = pyplot()
    names = {g: f"{g[1]} n={g[2]}" if g[2] else g[1] for g in cells_by_group(rows)}
    figs = make_figures(plt, cells_by_group(rows), names, rows)
    return plt, dict(figs.figures), figs.notes


def _cell_rows(methods, corruptions, severities):
    return [{"model": "m", "method": m, "n": n, "seed": None if not n else 0, "corruption": c, "severity": s,
             "accuracy": 0.3 + 0.1 * i + 0.01 * s, "adapt_on": None}
            for i, (m, n) in enumerate(methods) for c in corruptions for s in severities]  # fmt: skip


def test_one_severity_is_drawn_as_bars_on_a_0_to_100_axis():
    pytest.importorskip("matplotlib")
    rows = _cell_rows([("source", 0), ("replace", 16), ("prior", 16)], ["fog"], [5])
    plt, figs, notes = _figures(rows)
    ax = figs["acc_vs_severity.png"].axes[0]
    assert ax.get_xlim() == (0, 100)  # not 4.8-5.2 around a single point
    assert [t.get_text() for t in ax.get_yticklabels()] == ["source", "replace n=16", "prior n=16"]
    assert "severity 5" in ax.get_xlabel()
    assert notes == ["acc_vs_n.png: not drawn, no method was run at two or more n"]
    plt.close("all")


def test_heatmap_titles_do_not_overlap_and_the_figure_grows_with_its_panels():
    pytest.importorskip("matplotlib")
    methods = [("source", 0), *((m, 64) for m in ("replace", "prior", "test-batch", "sequential-long-name"))]
    corruptions, severities = ["gaussian_noise", "fog", "jpeg_compression"], [1, 2, 3, 4, 5]
    plt, figs, _ = _figures(_cell_rows(methods, corruptions, severities))
    fig = figs["gain_heatmap.png"]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = [ax.title.get_window_extent(renderer) for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert len(boxes) == 4
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    narrow = _figures(_cell_rows(methods[:2], corruptions, severities))[1]["gain_heatmap.png"]
    assert fig.get_size_inches()[0] > 2 * narrow.get_size_inches()[0]
    plt.close("all")


def test_report_lists_the_plots_it_did_not_draw(tmp_path):
    pytest.importorskip("matplotlib")
    rows = _cell_rows([("source", 0), ("replace", 16)], ["fog"], [5])
    Journal(tmp_path / "r", HEADER).append(rows)
    write_report(tmp_path / "r", "md")
    md = (tmp_path / "r" / "report.md").read_text()
    assert "![gain_heatmap](gain_heatmap.png)" in md and "![acc_vs_severity](acc_vs_severity.png)" in md
    assert "- acc_vs_n.png: not drawn, no method was run at two or more n" in md


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
