"""Style-shift analyses built on the benchmark: which corruptions, which statistics and which layers carry the shift.

- ``transfer``: adapt (``replace``, n images) on corruption A, evaluate on corruption B, for every A and B at one
  severity, plus the unadapted source and adaptation on clean images: does one corruption's "style" fit another's?
- ``parts``: adapt only the BN means, only the variances, or both, per corruption and severity, against source.
- ``depth``: adapt only the first k or only the last k BN layers, for k up to all of them, against source.

Each analysis is a few :func:`bnadapt.benchmark.run_benchmark` runs, one per configuration, each an ordinary
resumable results folder under ``OUT/<analysis>/runs/<label>/`` (``bnadapt report`` reads it); the tables
(``<analysis>.md``, ``<analysis>.csv``) and the plot (``<analysis>.png``) are then made from those results alone.
Every run evaluates the same cells, so they are read (and corrupted on the fly) once per invocation and held in
memory when they fit.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
from torch import nn

from ._io import write_text
from .benchmark import BenchConfig, run_benchmark
from .bn import bn_layers
from .data import CLEAN, ArrayImages, BenchData, Cell
from .names import ANALYSES
from .plots import pyplot, save_figure
from .report import ABBR, csv_text, md_table, pct
from .results import RESULTS, cells_by_group, read_results

log = logging.getLogger(__name__)

__all__ = ["ANALYSES", "AnalysisResult", "default_ks", "run_analysis"]

MAX_IN_MEMORY = 2 << 30  # bytes of uint8 images held at once; larger data is read (and corrupted) by every run
_CHUNK = 256  # images per read while loading a cell into memory: bounds the corruption engine's working memory

# (cells done, cells in all runs, "run label cell label", accuracy per method of the cell just finished)
Progress = Callable[[int, int, str, dict[str, float]], None]


class AnalysisResult(NamedTuple):
    """The files an analysis wrote (tables, plot, provenance) and its main table as markdown."""

    files: list[Path]
    table: str


@dataclass(frozen=True)
class _Run:
    label: str  # folder name under runs/
    config: BenchConfig


def default_ks(layers: int) -> list[int]:
    """Depths k for ``depth``: the powers of two below the model's number of BN layers (all of them is run anyway).

    Example:
        >>> default_ks(19)
        [1, 2, 4, 8, 16]
    """
    return [2**i for i in range(layers.bit_length()) if 2**i < layers]


def run_analysis(
    analysis: str,
    models: Mapping[str, nn.Module],
    data: BenchData,
    config: BenchConfig | None = None,
    out: str | os.PathLike[str] = "analysis",
    ks: Sequence[int] | None = None,
    command: Sequence[str] | None = None,
    resume: bool = False,
    plots: bool = True,
    progress: Progress | None = None,
    max_bytes: int = MAX_IN_MEMORY,
) -> AnalysisResult:
    """Run one analysis (``transfer``, ``parts`` or ``depth``) into ``out/<analysis>/`` and write its table and plot.

    Args:
        analysis: one of :data:`ANALYSES`.
        models: ONE name -> model (as for :func:`bnadapt.benchmark.run_benchmark`).
        data: the cells (:func:`bnadapt.data.open_data`); ``transfer`` needs exactly one severity.
        config: n (one value), seeds, batch size, workers, device, precision; the analysis sets the methods,
            ``part``, ``first``/``last`` and ``adapt_on`` of each run itself.
        out: the folder whose ``<analysis>`` sub-folder receives everything (its parent must exist).
        ks: depths for ``depth`` (default :func:`default_ks` of the model's BN layer count).
        command: the command line recorded with the results; resume: skip the cells already finished.
        plots: write the PNG (skipped with a warning without matplotlib); progress: called after each cell.
        max_bytes: hold the cells in memory when their images take at most this many bytes.

    Example:
        >>> import tempfile
        >>> from bnadapt.data import open_data
        >>> from bnadapt.models import cifar_resnet
        >>> d = Path(tempfile.mkdtemp())
        >>> np.savez(d / "c.npz", x=np.full((8, 32, 32, 3), 99, np.uint8), y=np.arange(8) % 10)
        >>> data = open_data(f"generate:cifar:{d / 'c.npz'}", ["contrast", "fog"], [5])
        >>> res = run_analysis("transfer", {"r20": cifar_resnet(20)}, data, BenchConfig(ns=(4,)), d, plots=False)
        >>> sorted(p.name for p in res.files)
        ['analysis.json', 'transfer.csv', 'transfer.md']
    """
    config = config or BenchConfig()
    if analysis not in ANALYSES:
        raise ValueError(f"expected an analysis, one of {', '.join(ANALYSES)}; got {analysis!r}")
    if len(models) != 1:
        raise ValueError(f"expected one model to analyse, got {len(models)}; run one analysis per model")
    n_layers = len(bn_layers(next(iter(models.values()))))
    ks = _check(analysis, data, config, ks, n_layers)
    if data.limit is not None:  # recorded, so that a resume with another subset is refused rather than mixed
        config = replace(config, extra={**config.extra, "limit_per_cell": data.limit})
    runs = _plan(analysis, data, config, ks, n_layers)
    for run in runs:
        run.config.validate()
    root = _root(Path(out), analysis, resume)
    cells = _in_memory(data, max_bytes)
    results = _run_all(models, cells, runs, root, command, resume, progress)
    header = read_results(root / "runs" / runs[0].label)[0][-1]
    return _write_outputs(analysis, root, data, results, runs, n_layers, header, plots)


def _root(out: Path, analysis: str, resume: bool) -> Path:
    """The analysis folder ``out/<analysis>``, refused (before anything is read) when it cannot be written or when it
    holds finished runs and ``resume`` is off."""
    if not out.parent.is_dir():
        raise FileNotFoundError(f"expected an existing parent directory for --out {out}; create it first")
    root = out / analysis
    finished = [d.name for d in sorted((root / "runs").glob("*")) if (d / RESULTS).is_file()]
    if finished and not resume:  # the runs' journals would refuse too, but only after the cells are read
        raise ValueError(
            f"expected an empty --out, got {root} with results of runs {', '.join(finished)}; pass --resume to skip "
            "their finished cells, or choose another --out"
        )
    return root


def _run_all(
    models: Mapping[str, nn.Module],
    cells: BenchData,
    runs: list[_Run],
    root: Path,
    command: Sequence[str] | None,
    resume: bool,
    progress: Progress | None,
) -> dict[str, list[dict]]:
    """Run each configuration into ``root/runs/<label>``; returns each run's rows, by label."""
    created = [p for p in (root.parent, root, root / "runs") if not p.exists()]
    for p in created:
        p.mkdir()
    n_cells = len(cells.cells)
    results: dict[str, list[dict]] = {}
    try:
        for i, run in enumerate(runs):
            step = None
            if progress is not None:
                step = _step(progress, i * n_cells, len(runs) * n_cells, n_cells, run.label)
            out = root / "runs" / run.label
            rows = run_benchmark(models, cells, run.config, out=out, command=command, resume=resume, progress=step)
            # The folder may hold more (other seeds of an earlier run): the tables show what this call asked for.
            asked = {(n, s) for n in run.config.ns for s in run.config.seeds}
            results[run.label] = [r for r in rows if r["seed"] is None or (r["n"], r["seed"]) in asked]
    except BaseException:
        for p in reversed(created):  # only what this call made and left empty: a refused run leaves nothing behind
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise
    return results


def _check(analysis: str, data: BenchData, config: BenchConfig, ks: Sequence[int] | None, n_layers: int) -> list[int]:
    """Refuse what the analysis cannot run, before anything is read or written; returns the depths k to run."""
    if len(config.ns) != 1:
        raise ValueError(f"expected one --n for an analysis, got {list(config.ns)}; use bnadapt sweep for several")
    preset = [f for f in ("adapt_on", "first", "last") if getattr(config, f) is not None]
    preset += ["part"] if config.part != "both" else []
    if preset:
        raise ValueError(f"expected a config without {', '.join(preset)}, got them set; the analysis sets them itself")
    severities = sorted({s for c, s in data.cells if c != CLEAN})
    if not severities:
        raise ValueError(
            f"expected corrupted cells to analyse (generate:, cifar-c: or imagenet-c: --data), got only the clean set "
            f"of {data.spec}"
        )
    if analysis == "transfer" and len(severities) != 1:
        raise ValueError(
            f"expected one --severity for transfer (its matrix is at one severity), got {severities}; run one "
            "analysis per severity"
        )
    if analysis != "depth":
        if ks:
            raise ValueError(f"expected --ks only with the depth analysis, got --ks with {analysis}")
        return []
    if ks is None:
        return default_ks(n_layers)
    bad = [k for k in ks if not 1 <= k <= n_layers]
    if bad or not ks:
        raise ValueError(f"expected --ks within 1..{n_layers} (the model's BN layers), got {list(ks)}")
    return sorted(set(ks))


def _plan(analysis: str, data: BenchData, config: BenchConfig, ks: list[int], n_layers: int) -> list[_Run]:
    """The benchmark runs an analysis is made of: one results folder each."""
    adapted = replace(config, methods=("replace",))
    with_source = replace(config, methods=("source", "replace"))
    if analysis == "transfer":
        rows = [_Run(f"adapt-{str(c).replace(':', '-')}", replace(adapted, adapt_on=str(c))) for c in data.cells]
        return [_Run("source", replace(config, methods=("source",))), *rows]
    if analysis == "parts":
        return [
            _Run("both", with_source),
            _Run("mean", replace(adapted, part="mean")),
            _Run("var", replace(adapted, part="var")),
        ]
    runs = [_Run("all", with_source)]
    for k in ks:
        if k < n_layers:  # k = all layers is the "all" run
            runs += [_Run(f"first-{k}", replace(adapted, first=k)), _Run(f"last-{k}", replace(adapted, last=k))]
    return runs


def _step(progress: Progress, before: int, total: int, cells: int, label: str):
    """A run's progress callback, counted over all runs (a resumed run reports only the cells it still runs)."""

    def step(done: int, todo: int, cell: str, accs: dict[str, float]) -> None:
        progress(before + cells - todo + done, total, f"{label} {cell}", accs)

    return step


def _in_memory(data: BenchData, max_bytes: int) -> BenchData:
    """The same cells with their images read once into arrays (corrupted once, not once per run), if they fit."""
    sets = {c: data.cell(*c) for c in data.cells}
    probe = next(iter(sets.values())).get(np.arange(1))
    need = sum(len(s) for s in sets.values()) * probe[0].nbytes
    if need > max_bytes:
        log.info("cells take %.1f GiB (> %.1f): each run reads them itself", need / 2**30, max_bytes / 2**30)
        return data
    arrays = {}
    for cell, s in sets.items():
        parts = [s.get(np.arange(a, min(a + _CHUNK, len(s)))) for a in range(0, len(s), _CHUNK)]
        arrays[cell] = ArrayImages(np.concatenate(parts), s.labels, name=s.name)
    # Same spec, seed and cells: the runs' headers (and so their resume fingerprints) are those of the data itself.
    return BenchData(data.spec, list(data.cells), list(data.missing), lambda c, s: arrays[(c, s)], data.seed)


def _accs(rows: list[dict], method: str) -> dict[tuple, float]:
    """(corruption, severity) -> accuracy of ``method``, averaged over seeds."""
    return next((cells for (_, m, _, _), cells in cells_by_group(rows).items() if m == method), {})


def _mean(rows: list[dict], method: str, cells: Iterable[Cell]) -> tuple[float, float | None] | None:
    """Mean accuracy of ``method`` over ``cells`` and its std across seeds (None for one seed)."""
    want = set(cells)
    per_seed: dict[object, list[float]] = defaultdict(list)
    for r in rows:
        if r["method"] == method and (r["corruption"], r["severity"]) in want:
            per_seed[r["seed"]].append(r["accuracy"])
    means = [statistics.mean(v) for v in per_seed.values()]
    if not means:
        return None
    return statistics.mean(means), statistics.stdev(means) if len(means) > 1 else None


def _short(cell: Cell, one_severity: bool) -> str:
    name = ABBR.get(cell[0], cell[0])
    return name if one_severity or cell[0] == CLEAN else f"{name}{cell[1]}"


def _md(header: list[str], body: list[list], bold: set[tuple[int, int]] | None = None) -> str:
    """A markdown table; a cell is text, an accuracy (fraction), (mean, std across seeds or None) or None."""
    bold = bold or set()

    def fmt(i: int, j: int, v) -> str:
        text = pct(*v) if isinstance(v, tuple) else pct(v) if isinstance(v, float) or v is None else str(v)
        return f"**{text}**" if (i, j) in bold else text

    return md_table(header, [[fmt(i, j, v) for j, v in enumerate(r)] for i, r in enumerate(body)])


def _csv_table(header: list[str], body: list[list]) -> str:
    def fmt(v):
        v = v[0] if isinstance(v, tuple) else v
        return round(v, 6) if isinstance(v, float) else v

    return csv_text(header, [[fmt(v) for v in r] for r in body])


# --- the three analyses' tables and plots ---------------------------------------------------------------------------


class _Tables(NamedTuple):
    notes: str  # what the numbers are
    markdown: list[str]  # the main table first
    header: list[str]  # the CSV table (full names, fractions)
    body: list[list]
    plot: Callable  # (plt) -> figure


def _corrupted(cells: Iterable[Cell], severity: int | None = None) -> list[Cell]:
    return [c for c in cells if c[0] != CLEAN and severity in (None, c[1])]


def _transfer(data: BenchData, results: dict[str, list[dict]], runs: list[_Run], n_layers: int) -> _Tables:
    cols = list(data.cells)
    corr = _corrupted(cols)
    body, bold = [], set()
    for i, run in enumerate(runs):
        method = "source" if run.config.adapt_on is None else "replace"
        rows = results[run.label]
        label = "source (no adaptation)" if method == "source" else Cell.parse(run.config.adapt_on).corruption
        body.append([label, *(_accs(rows, method).get(c) for c in cols), _mean(rows, method, corr)])
        if method == "replace":
            bold.add((i, 1 + cols.index(Cell.parse(run.config.adapt_on))))
    notes = (
        f"Top-1 accuracy in %. Rows: the cell the n={runs[0].config.ns[0]} adaptation images are drawn from "
        f"(replace); columns: the cell evaluated; corruptions at severity {corr[0][1]}. mean: over the corruption "
        "columns (± std across seeds). Bold: adapted and evaluated on the same cell."
    )
    md = _md(["adapt on \\ evaluate on", *(_short(c, True) for c in cols), "mean"], body, bold)
    header = ["adapt_on", *(c[0] for c in cols), "mean"]

    def plot(plt):
        acc = np.array([[np.nan if v is None else 100 * v for v in r[1:-1]] for r in body])
        gain = acc - acc[0]
        fig, axes = plt.subplots(1, 2, figsize=(3 + 0.8 * len(cols), 1.5 + 0.3 * len(body)), squeeze=False)
        lim = np.nanmax(np.abs(gain)) or 1.0
        for ax, grid, title, kw in (
            (axes[0][0], acc, "accuracy (%)", {"cmap": "viridis", "vmin": 0, "vmax": 100}),
            (axes[0][1], gain, "gain over the source row (pp)", {"cmap": "RdBu", "vmin": -lim, "vmax": lim}),
        ):
            im = ax.imshow(grid, aspect="auto", **kw)
            ax.set_xticks(range(len(cols)), [_short(c, True) for c in cols], rotation=90, fontsize=7)
            first = ax is axes[0][0]
            labels = [ABBR.get(r[0], r[0]).split(" ")[0] for r in body] if first else []
            ax.set_yticks(range(len(body)), labels, fontsize=7)
            ax.set_xlabel("evaluated on")
            ax.set_ylabel("adapted on" if first else "")
            ax.set_title(title, fontsize=9)
            for (i, j), v in np.ndenumerate(grid):
                if v == v:
                    dark = v < 60 if kw["cmap"] == "viridis" else abs(v) > 0.6 * lim
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=5.5, color="white" if dark else "k")
            fig.colorbar(im, ax=ax, fraction=0.04)
        return fig

    return _Tables(notes, [md], header, body, plot)


PART_COLUMNS = ("source", "mean only", "var only", "both (replace)")


def _parts(data: BenchData, results: dict[str, list[dict]], runs: list[_Run], n_layers: int) -> _Tables:
    sources = [
        (results["both"], "source"),
        (results["mean"], "replace"),
        (results["var"], "replace"),
        (results["both"], "replace"),
    ]
    accs = [_accs(rows, m) for rows, m in sources]
    body: list[list] = [[c[0], c[1], *(a.get(c) for a in accs)] for c in data.cells]
    severities = sorted({s for _, s in _corrupted(data.cells)})
    for s in [*severities, *(["all"] if len(severities) > 1 else [])]:
        cells = _corrupted(data.cells, None if s == "all" else s)
        body.append(["mean", s, *(_mean(rows, m, cells) for rows, m in sources)])
    notes = (
        f"Top-1 accuracy in %. Adaptation (replace, n={runs[0].config.ns[0]} images of the evaluated cell) of "
        "the BN means only, the variances only, or both; the other statistic keeps its source value. "
        "mean: over the corruptions (± std across seeds)."
    )
    header = ["corruption", "severity", *PART_COLUMNS]

    def plot(plt):
        fig, axes = plt.subplots(len(severities), 1, figsize=(11, 2.6 * len(severities)), squeeze=False)
        for ax, s in zip(axes[:, 0], severities, strict=True):
            rows = [r for r in body if r[1] == s]
            x = np.arange(len(rows))
            for j, name in enumerate(PART_COLUMNS):
                ys = [
                    100 * (v[0] if isinstance(v, tuple) else v) if v is not None else np.nan
                    for v in (r[2 + j] for r in rows)
                ]
                ax.bar(x + (j - 1.5) * 0.2, ys, 0.2, label=name)
            ax.set_xticks(x, [ABBR.get(r[0], r[0]) for r in rows], fontsize=7)
            ax.set_ylabel(f"accuracy (%), sev. {s}")
            ax.set_ylim(0, 100)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=7, ncol=4, loc="lower left", bbox_to_anchor=(0, 1.02), frameon=False)
        return fig

    return _Tables(notes, [_md(header, body)], header, body, plot)


def _depth(data: BenchData, results: dict[str, list[dict]], runs: list[_Run], n_layers: int) -> _Tables:
    corr = _corrupted(data.cells)
    ks = sorted({r.config.first for r in runs if r.config.first is not None})
    variants = [("source", 0, results["all"], "source")]
    variants += [(f"{side}-{k}", k, results[f"{side}-{k}"], "replace") for side in ("first", "last") for k in ks]
    variants.append(("all", n_layers, results["all"], "replace"))
    cols = list(data.cells)
    one = len({s for _, s in corr}) == 1
    body = [[name, k, *(_accs(rows, m).get(c) for c in cols), _mean(rows, m, corr)] for name, k, rows, m in variants]
    header = ["variant", "k", *(str(c) for c in cols), "mean"]
    mean = {r[0]: r[-1] for r in body}
    summary = [["0 (source)", mean["source"], mean["source"]]]
    summary += [[str(k), mean[f"first-{k}"], mean[f"last-{k}"]] for k in ks]
    summary.append([f"all ({n_layers})", mean["all"], mean["all"]])
    notes = (
        f"Top-1 accuracy in %, mean over the corruption cells (± std across seeds): replace (n="
        f"{runs[0].config.ns[0]} images of the evaluated cell) applied to the first k or the last k of the "
        f"model's {n_layers} BN layers (in forward order); the others keep their source statistics."
    )
    detail = _md(["variant", "k", *(_short(c, one) for c in cols), "mean"], body)

    def plot(plt):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = range(len(summary))  # evenly spaced: the ks are (about) powers of two, and 0 is source
        for j, side in ((1, "first k"), (2, "last k")):
            ax.plot(xs, [100 * r[j][0] for r in summary], marker="o", label=f"{side} BN layers adapted")
        ax.set_xticks(xs, ["0\n(source)", *(str(k) for k in ks), f"all\n({n_layers})"])
        ax.set_xlabel("k: BN layers adapted (the others keep source statistics)")
        ax.set_ylabel("accuracy (%), mean over corruptions")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        return fig

    return _Tables(notes, [_md(["k (BN layers adapted)", "first k", "last k"], summary), detail], header, body, plot)


def _write_outputs(
    analysis: str,
    root: Path,
    data: BenchData,
    results: dict[str, list[dict]],
    runs: list[_Run],
    n_layers: int,
    header: dict,
    plots: bool,
) -> AnalysisResult:
    """Write ``<analysis>.md``, ``.csv``, ``.png`` and ``analysis.json`` from the runs' results."""
    tables = {"transfer": _transfer, "parts": _parts, "depth": _depth}[analysis](data, results, runs, n_layers)
    files = []
    plt = pyplot() if plots else None
    if plt is not None:
        files.append(save_figure(plt, tables.plot(plt), root / f"{analysis}.png"))
    config = runs[0].config
    model = next(iter(header.get("preprocessing") or {"?": None}))
    cmd = " ".join(header.get("command") or []) or "(library call)"
    limit = f", {data.limit} images per cell" if data.limit else ""
    lines = [
        f"# bnadapt analyze {analysis}",
        "",
        f"- command: `{cmd}`",
        f"- model: {model} ({n_layers} BN layers)",
        f"- data: `{data.spec}` (corruption seed {data.seed}{limit})",
        f"- adaptation: n={config.ns[0]}, seeds {', '.join(map(str, config.seeds))}",
        f"- device: {header.get('device')}",
        f"- versions: {header.get('versions')}",
        "- results: `runs/<label>/results.jsonl`, one `bnadapt bench` folder per configuration",
        "",
        tables.notes,
        "",
        *(t + "\n" for t in tables.markdown),
    ]
    lines += [f"![{analysis}]({analysis}.png)", ""] if plt is not None else []
    files.insert(0, write_text(root / f"{analysis}.md", "\n".join(lines)))
    files.insert(1, write_text(root / f"{analysis}.csv", _csv_table(tables.header, tables.body)))
    record = _record(analysis, data, runs, n_layers, header, model)
    files.append(write_text(root / "analysis.json", json.dumps(record, indent=2) + "\n"))
    return AnalysisResult(files, tables.markdown[0])


def _record(analysis: str, data: BenchData, runs: list[_Run], n_layers: int, header: dict, model: str) -> dict:
    """The provenance in ``analysis.json``: the data, the runs' configurations, and the first run's environment."""
    return {
        "analysis": analysis,
        "command": header.get("command"),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "bn_layers": n_layers,
        "data": {
            "spec": str(data.spec),
            "corrupt_seed": data.seed,
            "limit_per_cell": data.limit,
            "cells": [str(c) for c in data.cells],
        },
        "device": header.get("device"),
        "versions": header.get("versions"),
        "runs": {r.label: {k: v for k, v in asdict(r.config).items() if k in _RUN_FIELDS} for r in runs},
    }


_RUN_FIELDS = ("methods", "ns", "seeds", "part", "first", "last", "adapt_on")
