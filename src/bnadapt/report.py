"""Reports from ``results.jsonl`` alone: ``summary.json``, ``report.md`` (wide tables like the papers, top-1 and
top-5 accuracy in %, each method's difference to source with its paired bootstrap interval and its spread over
seeds), CSV tables, and PNG plots (gain heatmap, accuracy vs severity, accuracy vs n; drawn by :mod:`bnadapt.plots`).

Plots need matplotlib, imported only when plots are made; without it the tables are written and the plots skipped
with a one-line warning.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import NamedTuple

from ._io import write_text
from .corruptions import COMMON, EXTRA
from .data import CLEAN
from .metrics import BOOTSTRAP_RESAMPLES, Baseline
from .plots import make_figures, pyplot, save_figure
from .results import KEY_FIELDS, cells_by_group, read_results, summarize, write_summary

log = logging.getLogger(__name__)

__all__ = [
    "ABBR",
    "FORMATS",
    "Loaded",
    "build_summary",
    "csv_text",
    "markdown",
    "md_table",
    "pct",
    "pyplot",
    "save_figure",  # re-exported from bnadapt.plots, where it lives
    "write_plots",
    "write_report",
]

FORMATS = ("md", "csv", "json")
ABBR = {
    "gaussian_noise": "gauss",
    "shot_noise": "shot",
    "impulse_noise": "impul",
    "defocus_blur": "defoc",
    "glass_blur": "glass",
    "motion_blur": "motn",
    "zoom_blur": "zoom",
    "snow": "snow",
    "frost": "frost",
    "fog": "fog",
    "brightness": "brit",
    "contrast": "contr",
    "elastic_transform": "elast",
    "pixelate": "pixel",
    "jpeg_compression": "jpeg",
    "speckle_noise": "speck",
    "gaussian_blur": "gblur",
    "spatter": "spatt",
    "saturate": "satur",
}


class Loaded(NamedTuple):
    """A results folder read once: its run headers, its summary and its rows."""

    headers: list[dict]
    summary: list[dict]
    rows: list[dict]


def build_summary(out: str | os.PathLike[str], baseline: Baseline | None = None) -> Loaded:
    """Read a results folder and summarise it; mCE uses ``baseline``, or AlexNet for ImageNet-C data (released or
    ``generate:imagenet:``)."""
    headers, rows = read_results(out)
    if not rows:
        raise ValueError(f"expected result rows in {Path(out)}, got none; the run finished no cell yet")
    # AlexNet's errors normalise ImageNet-C, released or generated with the ImageNet constants (generate:imagenet:).
    specs = [h.get("data") or {} for h in headers]
    imagenet = any(
        d.get("kind") == "imagenet-c" or str(d.get("spec", "")).startswith("generate:imagenet:") for d in specs
    )
    return Loaded(headers, summarize(rows, baseline, imagenet=imagenet), rows)


def _name(s: dict, many_models: bool) -> str:
    label = s["method"] if not s["n"] else f"{s['method']} n={s['n']}"
    if s.get("adapt_on"):
        label += f" (adapted on {s['adapt_on']})"
    return f"{s['model']} {label}" if many_models else label


def pct(v: float | None, std: float | None = None) -> str:
    """A fraction as a percentage with one decimal, ``± std`` when a (non-zero) std is given; ``-`` for None.

    Example:
        >>> pct(0.6854), pct(0.5, 0.007), pct(None)
        ('68.5', '50.0 ± 0.7', '-')
    """
    if v is None:
        return "-"
    return f"{100 * v:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def md_table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table of text cells: the first column left-aligned (labels), the others right-aligned (numbers).

    Example:
        >>> print(md_table(["method", "fog"], [["source", "50.0"]]))
        | method | fog |
        |---|---:|
        | source | 50.0 |
    """
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in body)])


_TOP1 = ("mean_acc", "mean_acc_std", "mean_acc_extra", "per_severity", "per_corruption", "clean_acc")


def _top5_view(s: dict) -> dict:
    """``s`` with its top-5 numbers in the top-1 keys (all None where its rows predate top-5), to tabulate alike."""
    top5 = s["top5"] or {}
    return {**s, **{k: top5.get(k) for k in _TOP1}, "per_corruption": top5.get("per_corruption") or {}, "mce": None}


def _wide(summary: list[dict], missing: str = "-", columns_of: list[dict] | None = None) -> tuple[list[str], list]:
    """The wide table (one row per method, one column per corruption); ``columns_of``: the summaries whose
    corruptions make the columns (default ``summary``); ``missing``: the text of an absent value."""
    columns_of = columns_of or summary
    present = {c for s in columns_of for c in s["per_corruption"]}
    corr = [c for c in (*COMMON, *EXTRA) if c in present]
    others = sorted(present - set(COMMON) - set(EXTRA))
    clean = any(s["clean_acc"] is not None for s in columns_of)
    mce = any(s["mce"] is not None for s in summary)
    many = len({s["model"] for s in summary}) > 1
    header = ["method", *(["clean"] if clean else []), *(ABBR.get(c, c) for c in [*corr, *others]), "mean"]
    header += ["extra"] if any(c in EXTRA for c in corr) else []
    header += ["mCE", "rel. mCE"] if mce else []

    def p(v: float | None, std: float | None = None) -> str:
        return missing if v is None else pct(v, std)

    body = []
    for s in summary:
        row = [_name(s, many), *([p(s["clean_acc"])] if clean else [])]
        row += [p(s["per_corruption"].get(c)) for c in [*corr, *others]]
        row.append(p(s["mean_acc"], s["mean_acc_std"]))
        row += [p(s["mean_acc_extra"])] if "extra" in header else []
        row += [p(s["mce"]), p(s["relative_mce"])] if mce else []
        body.append(row)
    return header, body


def _names(names: list[str]) -> str:
    return ", ".join(ABBR.get(c, c) for c in names)


def _scope(summary: list[dict]) -> tuple[str, str, str]:
    """What ``mean``, ``extra`` and the per-severity table average over, as run: (benchmark corruptions and
    severities, held-out corruptions, benchmark corruptions)."""
    present = {c for s in summary for c in s["per_corruption"]}
    common = [c for c in COMMON if c in present]
    extra = [c for c in EXTRA if c in present]
    sev = sorted({int(k) for s in summary for k in s["per_severity"]})
    if len(common) == len(COMMON):
        corr = f"the {len(COMMON)} benchmark corruptions"
    else:
        corr = f"{len(common)} of the {len(COMMON)} benchmark corruptions ({_names(common)})"
    sevs = f"{len(sev)} {'severity' if len(sev) == 1 else 'severities'} ({', '.join(map(str, sev))})"
    held = f"{len(extra)} of the {len(EXTRA)} held-out corruptions ({_names(extra)})" if extra else ""
    held = f"the {len(EXTRA)} held-out corruptions" if len(extra) == len(EXTRA) else held
    return (f"{corr} x {sevs}" if common else "no benchmark corruption was run"), held, corr


def _provenance(headers: list[dict]) -> list[str]:
    h = headers[-1] if headers else {}
    if not h:
        return []
    cmd = " ".join(h.get("command") or []) or "(library call)"
    parts = [
        f"- command: `{cmd}`",
        f"- data: `{(h.get('data') or {}).get('spec')}`",
        f"- device: {h.get('device')}",
        f"- versions: {h.get('versions')}",
        f"- preprocessing: {h.get('preprocessing')}",
    ]
    if len(headers) > 1:
        parts.append(f"- runs appended to this folder: {len(headers)} (the first: {headers[0].get('time')})")
    return [*parts, ""]


def markdown(summary: list[dict], headers: list[dict]) -> str:
    """The report as markdown: provenance, the wide top-1 and top-5 tables, the per-severity table, and each
    method's difference to source (paired bootstrap 95% interval over cells) and spread over seeds."""
    many = len({s["model"] for s in summary}) > 1
    mean_over, held, corr = _scope(summary)
    parts = ["# bnadapt benchmark report", "", *_provenance(headers)]
    parts += [
        f"Top-1 accuracy in %. mean: {mean_over}, ± std across seeds" + (f"; extra: {held}." if held else "."),
        "",
        md_table(*_wide(summary)),
        "",
        *_top5_section(summary, held),
    ]
    sev = sorted({int(k) for s in summary for k in s["per_severity"]})
    if sev:
        body = [
            [_name(s, many), *(pct(s["per_severity"].get(str(k))) for k in sev), pct(s["mean_acc"])] for s in summary
        ]
        parts += [f"## Per severity ({corr})", "", md_table(["method", *(f"s{k}" for k in sev), "mean"], body), ""]
    parts += _stats_section(summary, many)
    if any(s["mce"] is not None for s in summary):
        parts += [f"mCE normalised by {next(s['baseline'] for s in summary if s.get('baseline'))} errors.", ""]
    return "\n".join(parts)


def _top5_section(summary: list[dict], held: str) -> list[str]:
    title = ["## Top-5 accuracy", ""]
    if all(s["top5"] is None for s in summary):
        return [*title, "n/a: these rows were written before bnadapt recorded top-5; a new run records it.", ""]
    header, body = _wide([_top5_view(s) for s in summary], "n/a", summary)
    note = (
        "Top-5 accuracy in %: the label among the model's 5 highest scores (with fewer than 5 classes, every "
        "label is, and top-5 is 100). Same columns as above"
        + ("; n/a: rows written before top-5 was recorded." if any("n/a" in r for r in body) else ".")
    )
    return [*title, note, "", md_table(header, body), ""]


def _pp(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}"


def _stats_section(summary: list[dict], many: bool) -> list[str]:
    """Difference to source with its paired bootstrap 95% interval, and the spread over seeds, per method."""
    body, notes = [], []
    for s in summary:
        ci = s["diff_to_source_ci95"]
        diff = "(reference)" if s["method"] == "source" else _pp(s["diff_to_source"])
        spread = "-" if s["seed_std"] is None else f"{pct(s['seed_min'])}–{pct(s['seed_max'])}"
        seeds = len([t for t in s["seeds"] if t is not None])
        interval = "-" if ci is None else f"[{_pp(ci[0])}, {_pp(ci[1])}]"
        row = [_name(s, many), pct(s["mean_acc"]), diff, interval, str(s["diff_cells"] or "-"), str(seeds or "-")]
        body.append([*row, pct(s["seed_std"]), spread])
        if s["diff_to_source_note"] and s["method"] != "source":
            notes.append(f"- {_name(s, many)}: {s['diff_to_source_note']}.")
    if all(s["method"] == "source" for s in summary):
        return []
    header = ["method", "mean", "Δ to source (pp)", "95% CI (pp)", "cells", "seeds", "seed std", "seed min–max"]
    text = (
        "Top-1, benchmark corruptions. Δ: the mean over the cells (corruption x severity) of the method's accuracy, "
        "averaged over its seeds, minus source's on the same cell; 95% CI: paired bootstrap over those cells "
        f"({BOOTSTRAP_RESAMPLES} resamples with replacement, seed 0), the uncertainty from which cells were run. "
        "seed std: standard deviation (ddof=1) across seeds of the method's mean; min–max beside it (- with one seed)."
    )
    notes += [""] if notes else []
    return ["## Difference to source and spread over seeds", "", text, "", md_table(header, body), "", *notes]


def csv_text(header: list[str], body: list[list]) -> str:
    """CSV text (``\\n`` line ends) of a header row and body rows; None is written as an empty field.

    Example:
        >>> csv_text(["method", "fog"], [["source", 0.5], ["replace", None]])
        'method,fog\\nsource,0.5\\nreplace,\\n'
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(body)
    return buf.getvalue()


def write_report(
    out: str | os.PathLike[str],
    fmt: str = "md",
    baseline: Baseline | None = None,
    plots: bool = True,
    loaded: Loaded | None = None,
) -> list[Path]:
    """Regenerate the reports of a results folder from its ``results.jsonl``; returns the files written.

    ``json``: ``summary.json``; ``md``: also ``report.md`` and the PNG plots; ``csv``: also ``results.csv`` (tidy
    rows) and ``table.csv`` (one row per method, one column per corruption; fractions). ``loaded``: the folder as
    :func:`build_summary` already read it (with the same ``baseline``), so it is not read again.

    Example:
        >>> write_report("runs/r20", "md")  # doctest: +SKIP
        [PosixPath('runs/r20/summary.json'), PosixPath('runs/r20/report.md'), ...]
    """
    if fmt not in FORMATS:
        raise ValueError(f"expected --format to be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    headers, summary, rows = loaded or build_summary(out, baseline)
    written = [write_summary(out, summary)]
    if fmt == "md":
        section, made = _plot_section(out, summary, rows, plots)
        written.append(write_text(out / "report.md", markdown(summary, headers) + section))
        written += made
    elif fmt == "csv":
        written += _write_csv(out, summary, rows)
    return written


_ROW_COLUMNS = (*KEY_FIELDS, "correct", "correct5", "total", "accuracy", "top5", "seconds", "adapt_on")  # results.csv
# table.csv, after the corruptions
_SUMMARY_COLUMNS = ("mean_acc", "mean_acc_std", "mean_acc_extra", "mce", "seed_std", "diff_to_source")


def _write_csv(out: Path, summary: list[dict], rows: list[dict]) -> list[Path]:
    """``results.csv`` (the rows) and ``table.csv`` (one row per summary, one column per corruption present)."""
    keys = list(_ROW_COLUMNS)
    written = [write_text(out / "results.csv", csv_text(keys, [[r.get(k) for k in keys] for r in rows]))]
    clean = [CLEAN] if any(s["clean_acc"] is not None for s in summary) else []
    present = clean + [c for c in (*COMMON, *EXTRA) if any(c in s["per_corruption"] for s in summary)]
    header = ["model", "method", "n", *present, *_SUMMARY_COLUMNS, "diff_ci95_lo", "diff_ci95_hi", "mean_top5"]
    body = []
    for s in summary:
        accs = [s["clean_acc"] if c == CLEAN else s["per_corruption"].get(c) for c in present]
        ci = s["diff_to_source_ci95"] or [None, None]
        top5 = (s["top5"] or {}).get("mean_acc")
        body.append([s["model"], s["method"], s["n"], *accs, *(s[k] for k in _SUMMARY_COLUMNS), *ci, top5])
    written.append(write_text(out / "table.csv", csv_text(header, body)))
    return written


def _plot_section(out: Path, summary: list[dict], rows: list[dict], plots: bool) -> tuple[str, list[Path]]:
    """The report's plot section (the plots, and a line for each plot not drawn) and the PNGs written."""
    if not plots:
        return "", []
    made, notes = _write_plots(out, summary, rows)
    if not made and not notes:
        return "", []
    lines = ["", "## Plots", "", *(f"![{p.stem}]({p.name})" for p in made)]
    lines += ["", *(f"- {note}" for note in notes)] if notes else []
    return "\n".join(lines) + "\n", made


def write_plots(out: str | os.PathLike[str], summary: list[dict], rows: list[dict]) -> list[Path]:
    """Write the PNG plots into ``out``; returns them (none, with a warning, when matplotlib is missing).

    Example:
        >>> write_plots("runs/r20", *build_summary("runs/r20")[1:])  # doctest: +SKIP
        [PosixPath('runs/r20/gain_heatmap.png'), PosixPath('runs/r20/acc_vs_severity.png')]
    """
    return _write_plots(Path(out), summary, rows)[0]


def _write_plots(out: Path, summary: list[dict], rows: list[dict]) -> tuple[list[Path], list[str]]:
    plt = pyplot()
    if plt is None:
        return [], []
    many = len({s["model"] for s in summary}) > 1
    names = {(s["model"], s["method"], s["n"], s.get("adapt_on")): _name(s, many) for s in summary}
    figures, notes = make_figures(plt, cells_by_group(rows), names, rows)
    return [save_figure(plt, fig, out / name) for name, fig in figures], notes
