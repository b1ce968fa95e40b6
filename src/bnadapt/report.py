"""Reports from ``results.jsonl`` alone: ``summary.json``, ``report.md`` (wide tables like the papers, accuracy in %),
CSV tables, and PNG plots (gain heatmap, accuracy vs severity, accuracy vs n).

Plots need matplotlib, imported only when plots are made; without it the tables are written and the plots skipped
with a one-line warning.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from ._io import atomic_path, write_text
from .corruptions import COMMON, EXTRA
from .data import CLEAN
from .metrics import Baseline
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
    "save_figure",
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


def _wide(summary: list[dict]) -> tuple[list[str], list[list[str]]]:
    present = {c for s in summary for c in s["per_corruption"]}
    corr = [c for c in (*COMMON, *EXTRA) if c in present]
    others = sorted(present - set(COMMON) - set(EXTRA))
    clean = any(s["clean_acc"] is not None for s in summary)
    mce = any(s["mce"] is not None for s in summary)
    many = len({s["model"] for s in summary}) > 1
    header = ["method", *(["clean"] if clean else []), *(ABBR.get(c, c) for c in [*corr, *others]), "mean"]
    header += ["extra"] if any(c in EXTRA for c in corr) else []
    header += ["mCE", "rel. mCE"] if mce else []
    body = []
    for s in summary:
        row = [_name(s, many), *([pct(s["clean_acc"])] if clean else [])]
        row += [pct(s["per_corruption"].get(c)) for c in [*corr, *others]]
        row.append(pct(s["mean_acc"], s["mean_acc_std"]))
        row += [pct(s["mean_acc_extra"])] if "extra" in header else []
        row += [pct(s["mce"]), pct(s["relative_mce"])] if mce else []
        body.append(row)
    return header, body


def markdown(summary: list[dict], headers: list[dict]) -> str:
    """The report as markdown: provenance, the wide per-corruption table, and the per-severity table."""
    many = len({s["model"] for s in summary}) > 1
    parts = ["# bnadapt benchmark report", ""]
    h = headers[-1] if headers else {}
    if h:
        cmd = " ".join(h.get("command") or []) or "(library call)"
        parts += [
            f"- command: `{cmd}`",
            f"- data: `{(h.get('data') or {}).get('spec')}`",
            f"- device: {h.get('device')}",
            f"- versions: {h.get('versions')}",
            f"- preprocessing: {h.get('preprocessing')}",
        ]
        if len(headers) > 1:
            parts.append(f"- runs appended to this folder: {len(headers)} (the first: {headers[0].get('time')})")
        parts.append("")
    parts += [
        "Top-1 accuracy in %. mean: the 15 benchmark corruptions x the severities run (± std across seeds); "
        "extra: the 4 held-out corruptions.",
        "",
        md_table(*_wide(summary)),
        "",
    ]
    sev = sorted({int(k) for s in summary for k in s["per_severity"]})
    if sev:
        body = [
            [_name(s, many), *(pct(s["per_severity"].get(str(k))) for k in sev), pct(s["mean_acc"])] for s in summary
        ]
        parts += [
            "## Per severity (15 benchmark corruptions)",
            "",
            md_table(["method", *(f"s{k}" for k in sev), "mean"], body),
            "",
        ]
    if any(s["mce"] is not None for s in summary):
        parts += [f"mCE normalised by {next(s['baseline'] for s in summary if s.get('baseline'))} errors.", ""]
    return "\n".join(parts)


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
        text = markdown(summary, headers) + _plot_section(out, summary, rows, plots)
        written.append(write_text(out / "report.md", text))
        written += [out / p for p in _PLOTS if (out / p).is_file() and plots]
    elif fmt == "csv":
        written += _write_csv(out, summary, rows)
    return written


_ROW_COLUMNS = (*KEY_FIELDS, "correct", "total", "accuracy", "seconds", "adapt_on")  # results.csv
_SUMMARY_COLUMNS = ("mean_acc", "mean_acc_std", "mean_acc_extra", "mce")  # table.csv, after the corruptions


def _write_csv(out: Path, summary: list[dict], rows: list[dict]) -> list[Path]:
    """``results.csv`` (the rows) and ``table.csv`` (one row per summary, one column per corruption present)."""
    keys = list(_ROW_COLUMNS)
    written = [write_text(out / "results.csv", csv_text(keys, [[r.get(k) for k in keys] for r in rows]))]
    clean = [CLEAN] if any(s["clean_acc"] is not None for s in summary) else []
    present = clean + [c for c in (*COMMON, *EXTRA) if any(c in s["per_corruption"] for s in summary)]
    header = ["model", "method", "n", *present, *_SUMMARY_COLUMNS]
    body = []
    for s in summary:
        accs = [s["clean_acc"] if c == CLEAN else s["per_corruption"].get(c) for c in present]
        body.append([s["model"], s["method"], s["n"], *accs, *(s[k] for k in _SUMMARY_COLUMNS)])
    written.append(write_text(out / "table.csv", csv_text(header, body)))
    return written


_PLOTS = ("gain_heatmap.png", "acc_vs_severity.png", "acc_vs_n.png")


def _plot_section(out: Path, summary: list[dict], rows: list[dict], plots: bool) -> str:
    made = write_plots(out, summary, rows) if plots else []
    if not made:
        return ""
    return "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in made) + "\n"


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (with a one-line warning) when it is not installed.

    Example:
        >>> plt = pyplot()  # doctest: +SKIP
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("plots skipped: matplotlib is not installed (pip install matplotlib); the tables are written")
        return None
    return plt


def save_figure(plt, fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically and close it; returns the path.

    Example:
        >>> plt = pyplot()  # doctest: +SKIP
        >>> save_figure(plt, plt.figure(), Path("runs/r20/plot.png"))  # doctest: +SKIP
        PosixPath('runs/r20/plot.png')
    """
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(out: str | os.PathLike[str], summary: list[dict], rows: list[dict]) -> list[Path]:
    """Write the PNG plots into ``out``; returns them (none, with a warning, when matplotlib is missing)."""
    plt = pyplot()
    if plt is None:
        return []
    out = Path(out)
    made = []
    groups = cells_by_group(rows)
    many = len({s["model"] for s in summary}) > 1
    names = {(s["model"], s["method"], s["n"], s.get("adapt_on")): _name(s, many) for s in summary}
    for fn in (_heatmap, _by_severity, _by_n):
        fig = fn(plt, groups, names, rows)
        if fig is not None:
            path = out / {"heatmap": _PLOTS[0], "by_severity": _PLOTS[1], "by_n": _PLOTS[2]}[fn.__name__.strip("_")]
            made.append(save_figure(plt, fig, path))
    return made


def _heatmap(plt, groups, names, rows):
    pairs = []
    for g, cells in groups.items():
        src = groups.get((g[0], "source", 0, g[3])) or groups.get((g[0], "source", 0, None))
        if g[1] != "source" and src:
            pairs.append((g, cells, src))
    pairs = pairs[:6]
    if not pairs:
        return None
    corr = [c for c in (*COMMON, *EXTRA) if any(k[0] == c for _, cells, _ in pairs for k in cells)]
    sev = sorted({k[1] for _, cells, _ in pairs for k in cells if k[0] != CLEAN})
    if not corr or not sev:  # e.g. a clean set only: nothing to map
        return None
    width = 1.5 + len(pairs) * (0.55 * len(sev) + 1.0)
    fig, axes = plt.subplots(1, len(pairs), figsize=(width, 0.3 * len(corr) + 1.5), squeeze=False)
    grids = [
        [
            [100 * (cells[(c, s)] - src[(c, s)]) if (c, s) in cells and (c, s) in src else float("nan") for s in sev]
            for c in corr
        ]
        for _, cells, src in pairs
    ]
    # One colour scale for every panel, so equal colours mean equal gains.
    lim = max((abs(v) for grid in grids for r in grid for v in r if v == v), default=1.0) or 1.0
    for i_ax, (ax, (g, _, _), grid) in enumerate(zip(axes[0], pairs, grids, strict=True)):
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(sev)), [str(s) for s in sev])
        ax.set_yticks(range(len(corr)), corr if i_ax == 0 else [], fontsize=7)
        ax.set_xlabel("severity")
        ax.set_title(f"{names.get(g, g[1])} − source (pp)", fontsize=8)
        for i, r in enumerate(grid):
            for j, v in enumerate(r):
                if v == v:
                    color = "white" if abs(v) > 0.6 * lim else "black"
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.04, label="accuracy gain (pp)")
    return fig


def _by_severity(plt, groups, names, rows):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    drawn = False
    for g, cells in groups.items():
        sev = sorted({s for c, s in cells if c in COMMON})
        if not sev:
            continue
        ys = [100 * statistics.mean(a for (c, s2), a in cells.items() if c in COMMON and s2 == s) for s in sev]
        xs = list(sev)
        if (CLEAN, 0) in cells:
            xs, ys = [0, *xs], [100 * cells[(CLEAN, 0)], *ys]
        ax.plot(xs, ys, marker="o", label=names.get(g, g[1]))
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("accuracy (%), benchmark corruptions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def _by_n(plt, groups, names, rows):
    per_seed: dict[tuple, dict[int, dict[object, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in rows:
        if r["corruption"] in COMMON:
            per_seed[(r.get("model"), r["method"], r.get("adapt_on"))][r["n"]][r["seed"]].append(r["accuracy"])
    sweeps = {k: v for k, v in per_seed.items() if len([n for n in v if n]) > 1}
    if not sweeps:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for (_model, method, _adapt_on), by_n in sweeps.items():
        ns = sorted(n for n in by_n if n)
        means = [[100 * statistics.mean(v) for v in by_n[n].values()] for n in ns]
        ax.plot(ns, [statistics.mean(m) for m in means], marker="o", label=method)
        ax.fill_between(ns, [min(m) for m in means], [max(m) for m in means], alpha=0.25)
    for (model, method, adapt_on), by_n in per_seed.items():
        if (model, method, adapt_on) not in sweeps and 0 in by_n:
            unadapted = 100 * statistics.mean(a for v in by_n[0].values() for a in v)
            ax.axhline(unadapted, ls="--", lw=1, label=method, color="gray")
    ax.set_xscale("log", base=2)
    ticks = sorted({n for by_n in sweeps.values() for n in by_n if n})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.set_xlabel("adaptation images n (log scale)")
    ax.set_ylabel("accuracy (%), benchmark corruptions")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="band: min-max over seeds", title_fontsize=7)
    return fig
