"""Tidy result rows, the resumable ``results.jsonl`` journal, and the summaries every report is built from.

``results.jsonl`` holds one JSON object per line: a header (``{"header": {...}}``: command, versions, preprocessing,
device, options) when a run starts, then one row per evaluated cell and variant::

    {"model", "method", "n", "seed", "corruption", "severity", "correct", "correct5", "total", "accuracy", "top5",
     "seconds", "adapt_on"}

Rows of a cell are appended, flushed and fsynced when the cell finishes, so a killed run loses at most the cell in
flight. Accuracies are fractions (0..1); only human-facing tables show percentages. ``top5`` (and ``correct5``)
count the target among the ``min(5, classes)`` highest logits; rows written before they were recorded lack them and
read, summarise and report as they are (top-5 shown as n/a).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import socket
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

from ._io import write_text
from .corruptions import COMMON, EXTRA
from .data import CLEAN
from .metrics import ALEXNET, Baseline, mce, paired_bootstrap, seed_spread

T = TypeVar("T")

log = logging.getLogger(__name__)

__all__ = [
    "KEY_FIELDS",
    "RESULTS",
    "SUMMARY",
    "Journal",
    "OutOfSpaceError",
    "cells_by_group",
    "read_results",
    "row_key",
    "source_of",
    "summarize",
    "write_summary",
]

RESULTS = "results.jsonl"
LOCK = ".bnadapt.lock"
SUMMARY = "summary.json"
KEY_FIELDS = ("model", "method", "n", "seed", "corruption", "severity")
_ROW_FIELDS = ("method", "n", "seed", "corruption", "severity", "accuracy")  # what summaries read (model: optional)


class OutOfSpaceError(OSError):
    """The disk (or quota) filled up while writing results; what was written before is intact."""


def row_key(row: dict) -> tuple:
    """The identity of a row: (model, method, n, seed, corruption, severity), and its ``step`` in a stream that
    runs without a reset (a cell can come twice there); a resumed run skips known keys."""
    key = tuple(row[k] for k in KEY_FIELDS)
    return key if row.get("step") is None else (*key, row["step"])


def read_results(path: str | os.PathLike[str]) -> tuple[list[dict], list[dict]]:
    """Read ``results.jsonl`` (or the folder holding it): ``(headers, rows)``.

    An unparsable line (the tail of an interrupted write) is skipped with a warning; the rest is kept.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> row = '{"method": "source", "n": 0, "seed": null, "corruption": "fog", "severity": 1, "accuracy": 0.5}'
        >>> _ = (d / RESULTS).write_text('{"header": {"command": []}}\\n' + row + '\\n{"accur')
        >>> [len(part) for part in read_results(d)]
        [1, 1]
    """
    headers, rows, _, _, _ = _read(Path(path))
    return headers, rows


def _read(path: Path) -> tuple[list[dict], list[dict], int, bool, list[int]]:
    """(headers, rows, byte offset just after the last well-formed line, whether that line lacks its newline, and
    for each row the position of the header it follows)."""
    path = path / RESULTS if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"expected a results file at {path}, found none; run bnadapt bench --out first")
    headers: list[dict] = []
    rows: list[dict] = []
    data = path.read_bytes()
    parts = data.split(b"\n")
    pos, good, no_newline = 0, 0, False
    owners: list[int] = []
    for i, line in enumerate(parts):
        last = i == len(parts) - 1
        pos += len(line) + (0 if last else 1)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if not isinstance(obj, dict) or not (
            isinstance(obj.get("header"), dict) if "header" in obj else all(k in obj for k in _ROW_FIELDS)
        ):  # not JSON, or not a header or a row (e.g. a foreign line): summaries would fail on it
            where = "last line" if not data[pos:].strip() else f"line {i + 1}"
            log.warning("ignoring a corrupt %s of %s (an interrupted write?); the rest is kept", where, path)
            continue
        if "header" in obj:
            headers.append(obj["header"])
        else:
            rows.append(obj)
            owners.append(len(headers) - 1)
        good, no_newline = pos, last
    return headers, rows, good, no_newline, owners


class Journal:
    """Append-only ``DIR/results.jsonl`` with a header per run; :meth:`done` holds the keys already finished.

    Refuses a folder whose results came from a different command (other ``fingerprint``) unless ``force``, and one
    that already holds results of this command unless ``resume`` (or ``force``).

    Example:
        >>> import tempfile
        >>> j = Journal(tempfile.mkdtemp(), {"command": ["bench"], "fingerprint": {"data": "x"}})
        >>> j.append([{"model": "m", "method": "source", "n": 0, "seed": None, "corruption": "fog", "severity": 1,
        ...            "accuracy": 0.5}])
        >>> len(j.done)
        1
    """

    def __init__(self, out: str | os.PathLike[str], header: dict, resume: bool = False, force: bool = False) -> None:
        self.dir = Path(out)
        if not self.dir.parent.is_dir():
            raise FileNotFoundError(f"expected an existing parent directory for --out {self.dir}; create it first")
        self.dir.mkdir(exist_ok=True)
        self._lock = _acquire_lock(self.dir / LOCK)
        try:
            self._open(header, resume, force)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the folder's lock (the journal's files stay)."""
        if self._lock is not None:
            self._lock.unlink(missing_ok=True)
            self._lock = None

    def _open(self, header: dict, resume: bool, force: bool) -> None:
        self.path = self.dir / RESULTS
        self.done: set[tuple] = set()
        if self.path.is_file():
            headers, rows, good, no_newline, owners = _read(self.path)
            self._check(headers, rows, header, resume, force)
            # Only rows written under this command's fingerprint count as done (a --force mix reruns its own cells).
            ours = {i for i, h in enumerate(headers) if h.get("fingerprint") == header.get("fingerprint")}
            self.done = {
                row_key(r) for r, o in zip(rows, owners, strict=True) if o in ours and all(k in r for k in KEY_FIELDS)
            }
            self._repair(good, no_newline)
        self._write([{"header": header}])

    def _check(self, headers: list[dict], rows: list[dict], header: dict, resume: bool, force: bool) -> None:
        theirs = [h.get("fingerprint") for h in headers]
        if any(f != header.get("fingerprint") for f in theirs) and not force:
            cmd = " ".join(map(str, (headers[0].get("command") or ["?"]))) if headers else "?"
            raise ValueError(
                f"expected {self.dir} to hold results of the same command, got results of another one ({cmd}); "
                "choose another --out, or pass --force to mix them"
            )
        if rows and not resume and not force:
            raise ValueError(
                f"expected an empty --out, got {self.dir} with {len(rows)} results of this command; pass --resume to "
                "skip its finished cells, or choose another --out"
            )

    def _repair(self, good: int, no_newline: bool) -> None:
        """Cut a corrupt tail (its cell is not in ``done``, so it reruns) and end the file with a newline."""
        if no_newline:
            with open(self.path, "ab") as f:
                f.write(b"\n")
        elif good < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def _write(self, objs: Iterable[dict]) -> None:
        data = "".join(json.dumps(o, sort_keys=False, default=str) + "\n" for o in objs).encode()
        # Unbuffered, so a failed write leaves nothing queued that a later close() could still flush.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as e:
                # A half-written cell (disk full, quota) would read back as a corrupt line: cut it off so the file
                # keeps exactly the finished cells.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise OutOfSpaceError(
                        f"expected space to write {self.path}, got '{os.strerror(e.errno)}'; the finished cells "
                        "are kept: free some space and rerun with --resume"
                    ) from e
                raise
        finally:
            os.close(fd)

    def append(self, rows: list[dict]) -> None:
        """Append the rows of one finished cell in one write, flushed and fsynced."""
        if rows:
            self._write(rows)
            self.done.update(row_key(r) for r in rows)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _lock_owner(path: Path) -> dict:
    """The lock file's ``{pid, host, started}``; a file of an older version holds only a pid (this host's), and an
    unreadable or empty one (a writer killed between creating and filling it) reads as pid 0, no owner."""
    try:
        info = json.loads(path.read_text() or "0")
    except (OSError, ValueError):
        return {"pid": 0}
    if isinstance(info, int):
        return {"pid": info}
    if not isinstance(info, dict):
        return {"pid": 0}
    try:
        return {**info, "pid": int(info.get("pid") or 0)}
    except (TypeError, ValueError):
        return {**info, "pid": 0}


def _acquire_lock(path: Path) -> Path:
    """Create ``path`` holding our pid, host and start time, or refuse while another run holds it. A dead owner's
    lock on this host is taken over; a lock of another host (a shared folder) never is: only a person can tell
    whether that run is gone."""
    host = socket.gethostname()
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            pid, their_host = owner["pid"], owner.get("host") or host
            since = f", started {owner['started']}" if owner.get("started") else ""
            if their_host != host:
                raise ValueError(
                    f"expected no other run writing to {path.parent}, got one on host {their_host}: process {pid}"
                    f"{since} holds {path.name}; if that run is gone, delete {path} and rerun"
                ) from None
            if pid > 0 and pid != os.getpid() and _pid_alive(pid):
                raise ValueError(
                    f"expected no other run writing to {path.parent}, got one: process {pid}{since} holds "
                    f"{path.name}; wait for it to finish or choose another --out"
                ) from None
            log.warning("removing a stale lock %s left by process %s, which is no longer running", path, pid or "?")
            path.unlink(missing_ok=True)
            continue
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"pid": os.getpid(), "host": host, "started": started}) + "\n")
        return path
    raise ValueError(f"expected to lock {path.parent}, but another process keeps taking {path.name}; retry")


def _mean(values: Iterable[float | None]) -> float | None:
    """The mean; None when there is nothing to average or a value is missing (e.g. ``top5`` of an older row)."""
    v = list(values)
    return None if not v or any(x is None for x in v) else sum(v) / len(v)  # type: ignore[arg-type]


def _group_key(row: dict) -> tuple:
    return (row.get("model"), row["method"], row["n"], row.get("adapt_on"))


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[_group_key(r)].append(r)
    return groups


def _by_cell(rows: list[dict], field: str) -> tuple[dict[tuple, float | None], dict[object, dict[tuple, float | None]]]:
    """(cell -> ``field`` averaged over seeds, seed -> cell -> ``field``); None where a row lacks the field (rows of
    versions before top-5 have no ``top5``)."""
    acc: dict[tuple, list[float | None]] = defaultdict(list)
    by_seed: dict[object, dict[tuple, float | None]] = defaultdict(dict)
    for r in rows:
        key = (r["corruption"], r["severity"])
        acc[key].append(r.get(field))
        by_seed[r["seed"]][key] = r.get(field)
    return {k: _mean(v) for k, v in acc.items()}, by_seed


def cells_by_group(rows: list[dict]) -> dict[tuple, dict[tuple, float]]:
    """(model, method, n, adapt_on) -> (corruption, severity) -> accuracy averaged over seeds, in first-seen order.

    Example:
        >>> rows = [{"model": "m", "method": "replace", "n": 8, "seed": seed, "corruption": "fog", "severity": 3,
        ...          "accuracy": a} for seed, a in ((0, 0.5), (1, 0.7))]
        >>> cells_by_group(rows)
        {('m', 'replace', 8, None): {('fog', 3): 0.6}}
    """
    return {g: _by_cell(rs, "accuracy")[0] for g, rs in _groups(rows).items()}  # type: ignore[misc]


def source_of(group: tuple, groups: Mapping[tuple, T]) -> T | None:
    """What ``groups`` holds for the source rows a (model, method, n, adapt_on) group is compared with: the same
    model's source of the same ``adapt_on``, else its plain source; None for source itself or a model without one.

    Example:
        >>> groups = {("m", "source", 0, None): "S", ("m", "replace", 8, None): "R"}
        >>> source_of(("m", "replace", 8, None), groups), source_of(("m", "source", 0, None), groups)
        ('S', None)
    """
    model, method, _, adapt_on = group
    if method == "source":
        return None
    found = groups.get((model, "source", 0, adapt_on))
    return found if found is not None else groups.get((model, "source", 0, None))


def summarize(rows: list[dict], baseline: Baseline | None = None, imagenet: bool = False) -> list[dict]:
    """One summary object per (model, method, n[, adapt_on]), in first-seen order.

    Keys (accuracies are fractions):

    - ``model``, ``method``, ``n``, ``seeds``, ``cells`` (cells evaluated);
    - ``mean_acc``: top-1 over the benchmark corruptions run (of the 15) x the severities run, mean over seeds;
      ``mean_acc_std``: its standard deviation across seeds (0 for one seed); ``mean_acc_extra``: the held-out
      corruptions run (of the 4); ``per_severity`` (benchmark corruptions), ``per_corruption`` (all), ``clean_acc``;
    - ``seed_std``, ``seed_min``, ``seed_max``: the spread over seeds of each seed's ``mean_acc`` (std with ddof=1);
      None with one seed;
    - ``top5``: the same accuracy keys for top-5 (``min(5, classes)``); a value is None where a row lacks ``top5``
      (rows written before top-5 was recorded), and ``top5`` is None when none of the group's rows has it;
    - ``diff_to_source``: the mean over the benchmark-corruption cells of (this accuracy, mean over seeds) minus
      source's on the same cell; ``diff_to_source_ci95``: [lo, hi], the paired bootstrap 95% interval of that mean
      (cells resampled with replacement, :data:`~bnadapt.metrics.BOOTSTRAP_RESAMPLES` times, seed 0; it reflects
      which cells were run, not seed noise: see ``seed_std``); ``diff_cells``: the cells paired; when no difference
      can be formed these are None/0 and ``diff_to_source_note`` says why (None otherwise);
    - ``mce``, ``relative_mce``: None without a baseline (``baseline``, or AlexNet when ``imagenet``).

    Example:
        >>> rows = [{"model": "m", "method": "source", "n": 0, "seed": None, "corruption": "fog", "severity": s,
        ...          "accuracy": a} for s, a in ((1, 0.8), (5, 0.4))]
        >>> s = summarize(rows)[0]
        >>> round(s["mean_acc"], 3), s["per_severity"], s["top5"]
        (0.6, {'1': 0.8, '5': 0.4}, None)
    """
    groups = _groups(rows)
    base = baseline if baseline is not None else (ALEXNET if imagenet else None)
    top1 = {key: _by_cell(g, "accuracy") for key, g in groups.items()}
    out = []
    for key, g in groups.items():
        src = source_of(key, top1)
        out.append(_summary(key, g, top1[key], base, None if src is None else src[0]))
    return out


def _accuracies(by_cell: tuple[dict, dict]) -> dict:
    """The accuracy keys of a summary (``mean_acc`` ... ``clean_acc``, seed spread) from :func:`_by_cell`."""
    cell, by_seed = by_cell

    def subset_mean(names: tuple[str, ...], values: dict[tuple, float | None]) -> float | None:
        return _mean(a for (c, _), a in values.items() if c in names)

    per_seed = [subset_mean(COMMON, v) for v in by_seed.values() if any(c in COMMON for c, _ in v)]
    std, lo, hi = seed_spread(per_seed) if None not in per_seed else (None, None, None)
    severities = sorted({s for c, s in cell if c in COMMON})
    corruptions = [c for c in (*COMMON, *EXTRA) if any(k[0] == c for k in cell)]
    others = sorted({c for c, _ in cell if c not in COMMON and c not in EXTRA and c != CLEAN})
    mean = _mean(per_seed)
    return {
        "mean_acc": mean,
        "mean_acc_std": std if std is not None else (0.0 if mean is not None and len(per_seed) == 1 else None),
        "seed_std": std,
        "seed_min": lo,
        "seed_max": hi,
        "mean_acc_extra": subset_mean(EXTRA, cell),
        "per_severity": {str(s): _mean(a for (c, t), a in cell.items() if c in COMMON and t == s) for s in severities},
        "per_corruption": {c: _mean(a for (d, _), a in cell.items() if d == c) for c in [*corruptions, *others]},
        "clean_acc": cell.get((CLEAN, 0)),
    }


def _summary(key: tuple, rows: list[dict], top1: tuple[dict, dict], baseline: Baseline | None, source) -> dict:
    model, method, n, adapt_on = key
    seeds = sorted({r["seed"] for r in rows}, key=lambda s: (s is None, s if s is not None else 0))
    cell = top1[0]
    top5 = _accuracies(_by_cell(rows, "top5")) if any("top5" in r for r in rows) else None
    out = {
        "model": model,
        "method": method,
        "n": n,
        "seeds": seeds,
        **_accuracies(top1),
        "top5": top5,
        "mce": None,
        "relative_mce": None,
        "cells": len(cell),
        **_versus_source(key, cell, source),
    }
    if adapt_on is not None:
        out["adapt_on"] = adapt_on
    if baseline is not None:
        clean = out["clean_acc"]
        errors = {c: {s: 1.0 - a for (d, s), a in cell.items() if d == c} for c in COMMON}
        errors = {c: e for c, e in errors.items() if e}
        m, rm = mce(errors, baseline, None if clean is None else 1.0 - clean)
        out["mce"], out["relative_mce"] = m, rm
        out["baseline"] = baseline.name
    return _no_nan(out)


def _versus_source(key: tuple, cell: dict[tuple, float], source: dict[tuple, float] | None) -> dict:
    """``diff_to_source``, its paired bootstrap ``diff_to_source_ci95``, ``diff_cells`` and, when none can be
    formed, ``diff_to_source_note`` saying why."""
    model, method = key[0], key[1]
    paired = [c for c in cell if c[0] in COMMON and source is not None and c in source]
    out: dict = {"diff_to_source": None, "diff_to_source_ci95": None, "diff_cells": len(paired)}
    if method == "source":
        note = "source is the reference the other methods are compared with"
    elif source is None:
        note = f"no source rows of model {model} to pair with (add source to --methods)"
    elif not paired:
        note = "no benchmark-corruption cell evaluated by both this method and source"
    else:
        mean, lo, hi = paired_bootstrap([cell[c] - source[c] for c in paired])
        out.update(diff_to_source=mean, diff_to_source_ci95=[lo, hi])
        note = None
    return {**out, "diff_to_source_note": note}


def _no_nan(v):
    """NaN (an empty cell's accuracy) as None, at any depth: JSON has no NaN."""
    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _no_nan(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_no_nan(x) for x in v]
    return v


def write_summary(out: str | os.PathLike[str], summary: list[dict]) -> Path:
    """Write ``summary.json`` atomically into the folder ``out``; returns its path."""
    return write_text(Path(out) / SUMMARY, json.dumps(summary, indent=2) + "\n")
