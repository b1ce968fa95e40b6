"""The benchmark report's figures: gain over source per cell (heatmap), accuracy vs severity, accuracy vs n.

Every figure is sized from what it shows (panels, corruptions, severities, methods) and laid out by matplotlib's
constrained layout, so titles, labels and legends never overlap; files are PNGs at :data:`DPI`. matplotlib is
imported only when a figure is made (:func:`pyplot`).
"""

from __future__ import annotations

import logging
import math
import statistics
import textwrap
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from ._io import atomic_path
from .corruptions import COMMON, EXTRA
from .data import CLEAN
from .results import source_of

log = logging.getLogger(__name__)

__all__ = ["DPI", "MAX_PANELS", "PLOTS", "Figures", "make_figures", "pyplot", "save_figure"]

DPI = 150
PLOTS = ("gain_heatmap.png", "acc_vs_severity.png", "acc_vs_n.png")
MAX_PANELS = 12  # heatmap panels (methods); more would make each too small to read
_COLUMNS = 4  # heatmap panels per row
_INSIDE = 4  # legend entries that fit inside a line plot's axes; more go beside them


class Figures(NamedTuple):
    """The figures to save, as (file name, figure), and one line per plot not drawn (or cut) saying why."""

    figures: list[tuple[str, Any]]
    notes: list[str]


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
    """Write ``fig`` as a PNG at :data:`DPI` to ``path`` atomically and close it; returns the path.

    Example:
        >>> plt = pyplot()  # doctest: +SKIP
        >>> save_figure(plt, plt.figure(), Path("runs/r20/plot.png"))  # doctest: +SKIP
        PosixPath('runs/r20/plot.png')
    """
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def make_figures(plt, groups: Mapping[tuple, dict[tuple, float]], names: Mapping[tuple, str], rows: list[dict]):
    """The report's figures from ``groups`` (:func:`bnadapt.results.cells_by_group`), their display ``names``
    and the rows (for the spread over seeds); returns :class:`Figures`.

    Example:
        >>> from bnadapt.results import cells_by_group
        >>> rows = [{"method": m, "n": n, "seed": None, "corruption": "fog", "severity": 5, "accuracy": a}
        ...         for m, n, a in (("source", 0, 0.4), ("replace", 8, 0.6))]
        >>> figs = make_figures(pyplot(), cells_by_group(rows), {}, rows)  # doctest: +SKIP
        >>> [name for name, _ in figs.figures], figs.notes  # doctest: +SKIP
        (['gain_heatmap.png', 'acc_vs_severity.png'], ['acc_vs_n.png: not drawn, no method was run at two or more n'])
    """
    figures, notes = [], []
    for name, draw in zip(PLOTS, (_heatmap, _by_severity, _by_n), strict=True):
        fig = draw(plt, groups, names, rows, notes)
        if isinstance(fig, str):
            notes.append(f"{name}: not drawn, {fig}")
        else:
            figures.append((name, fig))
    return Figures(figures, notes)


def _wrap(text: str, inches: float, size: float) -> str:
    """``text`` broken into lines that fit ``inches`` at font ``size`` (a character is about 0.55 em wide)."""
    width = max(8, int(inches * 72 / (0.55 * size)))
    return textwrap.fill(text, width, break_long_words=False, break_on_hyphens=False)


def _heatmap(plt, groups, names, rows, notes):
    pairs = [(g, cells, src) for g, cells in groups.items() if (src := source_of(g, groups))]
    if not pairs:
        return "no method to compare with source (add source to the methods)"
    corr = [c for c in (*COMMON, *EXTRA) if any(k[0] == c for _, cells, _ in pairs for k in cells)]
    sev = sorted({k[1] for _, cells, _ in pairs for k in cells if k[0] != CLEAN})
    if not corr or not sev:  # e.g. a clean set only: nothing to map
        return "no corrupted cells"
    if len(pairs) > MAX_PANELS:
        notes.append(f"gain_heatmap.png: the first {MAX_PANELS} of {len(pairs)} methods (the tables show all)")
        pairs = pairs[:MAX_PANELS]
    ncols = min(len(pairs), _COLUMNS)
    nrows = math.ceil(len(pairs) / ncols)
    panel_w, panel_h = 0.9 + 0.42 * len(sev), 0.9 + 0.24 * len(corr)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(2.4 + ncols * panel_w, nrows * panel_h), squeeze=False, layout="constrained"
    )
    grids = [
        [
            [100 * (cells[(c, s)] - src[(c, s)]) if (c, s) in cells and (c, s) in src else float("nan") for s in sev]
            for c in corr
        ]
        for _, cells, src in pairs
    ]
    # One colour scale for every panel, so equal colours mean equal gains.
    lim = max((abs(v) for grid in grids for r in grid for v in r if v == v), default=1.0) or 1.0
    digits = 0 if lim >= 10 else 1
    n_common = sum(c in COMMON for c in corr)
    used = axes.ravel()[: len(pairs)]
    for ax in axes.ravel()[len(pairs) :]:
        ax.set_visible(False)
    for i_ax, (ax, (g, _, _), grid) in enumerate(zip(used, pairs, grids, strict=True)):
        im = ax.imshow(grid, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(sev)), [str(s) for s in sev], fontsize=7)
        ax.set_yticks(range(len(corr)), corr if i_ax % ncols == 0 else [], fontsize=7)
        ax.set_xlabel("severity", fontsize=7)
        ax.set_title(_wrap(f"{names.get(g, g[1])} − source (pp)", panel_w, 8), fontsize=8)
        if 0 < n_common < len(corr):  # the benchmark corruptions above the line, the held-out ones below
            ax.axhline(n_common - 0.5, color="black", lw=1.5)
        for i, r in enumerate(grid):
            for j, v in enumerate(r):
                if v == v:
                    color = "white" if abs(v) > 0.6 * lim else "black"
                    ax.text(j, i, f"{v:.{digits}f}", ha="center", va="center", fontsize=6, color=color)
    bar = fig.colorbar(im, ax=used.tolist(), shrink=min(1.0, 3.0 / (nrows * panel_h)))
    bar.set_label("accuracy gain (pp)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return fig


def _by_severity(plt, groups, names, rows, notes):
    series = []
    for g, cells in groups.items():
        sev = sorted({s for c, s in cells if c in COMMON})
        if not sev:
            continue
        points = {s: 100 * statistics.mean(a for (c, t), a in cells.items() if c in COMMON and t == s) for s in sev}
        if (CLEAN, 0) in cells:
            points = {0: 100 * cells[(CLEAN, 0)], **points}
        series.append((g, names.get(g, g[1]), points))
    if not series:
        return "no benchmark-corruption cells"
    xs = sorted({x for *_, points in series for x in points})
    if len(xs) == 1:  # one severity and no clean cell: a line through one point per method says nothing
        return _bars(plt, [(label, points[xs[0]]) for _, label, points in series], f"severity {xs[0]}")
    fig, ax = plt.subplots(figsize=_line_size([label for _, label, _ in series]), layout="constrained")
    models = list(dict.fromkeys(g[0] for g, _, _ in series))
    for i, (g, label, points) in enumerate(series):
        # Severities are ordinal and clean is not severity 0 of a scale: evenly spaced categories.
        style = _style(i, g[1], models.index(g[0]))
        ax.plot([xs.index(x) for x in points], list(points.values()), label=label, **style)
    ax.set_xticks(range(len(xs)), ["clean" if x == 0 else str(x) for x in xs])
    ax.set_xlim(-0.3, len(xs) - 0.7)
    ax.set_xlabel("severity")
    ax.set_ylabel("accuracy (%), benchmark corruptions")
    ax.grid(alpha=0.3)
    _legend(ax, len(series))
    return fig


def _bars(plt, bars: list[tuple[str, float]], where: str):
    """Accuracy per method as horizontal bars (the one-severity form of the severity plot)."""
    fig, ax = plt.subplots(figsize=(6.4, 1.2 + 0.3 * len(bars)), layout="constrained")
    ys = range(len(bars))
    ax.barh(ys, [v for _, v in bars], color=[f"C{i % 10}" for i in ys])
    for y, (_, v) in zip(ys, bars, strict=True):
        inside = v > 88  # a label past the bar's end would leave the axes
        x, ha, color = (v - 1, "right", "white") if inside else (v + 1, "left", "black")
        ax.text(x, y, f"{v:.1f}", va="center", ha=ha, fontsize=7, color=color)
    ax.set_yticks(ys, [label for label, _ in bars], fontsize=8)
    ax.invert_yaxis()  # the first method on top, as in the tables
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"accuracy (%), benchmark corruptions at {where}")
    ax.grid(axis="x", alpha=0.3)
    return fig


def _style(i: int, method: str, model: int = 0) -> dict:
    """Line style of the i-th series: source black and dashed, the others a colour each (dashed, then dotted, once
    the 10 colours are used up), and a marker per model, so no two series look alike."""
    marker = "osD^v<>ph*"[model % 10]
    if method == "source":
        return {"color": "black", "ls": "--", "marker": marker}
    return {"color": f"C{i % 10}", "ls": ("-", "--", ":")[(i // 10) % 3], "marker": marker}


def _line_size(labels: list[str]) -> tuple[float, float]:
    """The size of a line plot whose legend holds ``labels``: wider by the legend when it goes beside the axes."""
    beside = 0.6 + 0.055 * max(map(len, labels)) if len(labels) > _INSIDE else 0.0
    return 5.6 + beside, 3.8


def _legend(ax, entries: int, **kw) -> None:
    """A legend inside the axes when short, beside them when it would cover the lines."""
    if entries <= _INSIDE:
        ax.legend(fontsize=7, **kw)
    else:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kw)


def _by_n(plt, groups, names, rows, notes):
    per_seed: dict[tuple, dict[int, dict[object, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in rows:
        if r["corruption"] in COMMON:
            per_seed[(r.get("model"), r["method"], r.get("adapt_on"))][r["n"]][r["seed"]].append(r["accuracy"])
    sweeps = {k: v for k, v in per_seed.items() if len([n for n in v if n]) > 1}
    if not sweeps:
        return "no method was run at two or more n"
    many = len({k[0] for k in per_seed}) > 1

    def label(model, method, adapt_on) -> str:
        text = f"{model} {method}" if many else method
        return text + (f" (adapted on {adapt_on})" if adapt_on else "")

    flat = [(k, v) for k, v in per_seed.items() if k not in sweeps and 0 in v]
    fig, ax = plt.subplots(figsize=_line_size([label(*k) for k in [*sweeps, *dict(flat)]]), layout="constrained")
    models = list(dict.fromkeys(k[0] for k in per_seed))
    for i, (key, by_n) in enumerate(sweeps.items()):
        ns = sorted(n for n in by_n if n)
        means = [[100 * statistics.mean(v) for v in by_n[n].values()] for n in ns]
        style = _style(i, key[1], models.index(key[0]))
        ax.plot(ns, [statistics.mean(m) for m in means], label=label(*key), **style)
        ax.fill_between(ns, [min(m) for m in means], [max(m) for m in means], alpha=0.25, color=style["color"])
    for i, (key, by_n) in enumerate(flat, start=len(sweeps)):
        unadapted = 100 * statistics.mean(a for v in by_n[0].values() for a in v)
        style = {**_style(i, key[1], models.index(key[0])), "ls": "--", "marker": None}
        ax.axhline(unadapted, lw=1, label=label(*key), **style)
    ax.set_xscale("log", base=2)
    ticks = sorted({n for by_n in sweeps.values() for n in by_n if n})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.set_xlabel("adaptation images n (log scale)")
    ax.set_ylabel("accuracy (%), benchmark corruptions")
    ax.grid(alpha=0.3)
    _legend(ax, len(sweeps) + len(flat), title="band: min-max over seeds", title_fontsize=7)
    return fig
