"""Tidy result rows, the resumable ``results.jsonl`` journal, and the summaries every report is built from.

``results.jsonl`` holds one JSON object per line: a header (``{"header": {...}}``: command, versions, preprocessing,
device, options) when a run starts, then one row per evaluated cell and variant::

    {"model", "method", "n", "seed", "corruption", "severity", "correct", "total", "accuracy", "seconds", "adapt_on"}

Rows of a cell are appended, flushed and fsynced when the cell finishes, so a killed run loses at most the cell in
flight. Accuracies are fractions (0..1); only human-facing tables show percentages.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from ._io import write_text
from .corruptions import COMMON, EXTRA
from .data import CLEAN
from .metrics import ALEXNET, Baseline, mce

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


def _acquire_lock(path: Path) -> Path:
    """Create ``path`` holding our pid, or refuse while a live process holds it; a dead owner's lock is taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                owner = 0
            if owner > 0 and owner != os.getpid() and _pid_alive(owner):
                raise ValueError(
                    f"expected no other run writing to {path.parent}, got one: process {owner} holds {path.name}; "
                    "wait for it to finish or choose another --out"
                ) from None
            log.warning("removing a stale lock %s left by process %s, which is no longer running", path, owner or "?")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return path
    raise ValueError(f"expected to lock {path.parent}, but another process keeps taking {path.name}; retry")


def _mean(values: Iterable[float]) -> float | None:
    v = list(values)
    return sum(v) / len(v) if v else None


def _group_key(row: dict) -> tuple:
    return (row.get("model"), row["method"], row["n"], row.get("adapt_on"))


def cells_by_group(rows: list[dict]) -> dict[tuple, dict[tuple, float]]:
    """(model, method, n, adapt_on) -> (corruption, severity) -> accuracy averaged over seeds, in first-seen order.

    Example:
        >>> rows = [{"model": "m", "method": "replace", "n": 8, "seed": seed, "corruption": "fog", "severity": 3,
        ...          "accuracy": a} for seed, a in ((0, 0.5), (1, 0.7))]
        >>> cells_by_group(rows)
        {('m', 'replace', 8, None): {('fog', 3): 0.6}}
    """
    acc: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[_group_key(r)][(r["corruption"], r["severity"])].append(r["accuracy"])
    return {g: {c: sum(v) / len(v) for c, v in cells.items()} for g, cells in acc.items()}


def summarize(rows: list[dict], baseline: Baseline | None = None, imagenet: bool = False) -> list[dict]:
    """One summary object per (model, method, n[, adapt_on]), in first-seen order.

    Keys: ``method``, ``n``, ``seeds``, ``mean_acc`` (the 15 benchmark corruptions x the severities run, mean over
    seeds), ``mean_acc_std`` (standard deviation across seeds of that mean; 0 for one seed), ``mean_acc_extra`` (the
    4 held-out corruptions), ``per_severity`` (benchmark corruptions), ``per_corruption`` (all), ``clean_acc``,
    ``mce`` and ``relative_mce`` (fractions, like the accuracies; None without a baseline: ``baseline`` or AlexNet
    when ``imagenet``), plus ``model`` and ``cells``.

    Example:
        >>> rows = [{"model": "m", "method": "source", "n": 0, "seed": None, "corruption": "fog", "severity": s,
        ...          "accuracy": a} for s, a in ((1, 0.8), (5, 0.4))]
        >>> s = summarize(rows)[0]
        >>> round(s["mean_acc"], 3), s["per_severity"]
        (0.6, {'1': 0.8, '5': 0.4})
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[_group_key(r)].append(r)
    base = baseline if baseline is not None else (ALEXNET if imagenet else None)
    return [_summary(key, g, base) for key, g in groups.items()]


def _summary(key: tuple, rows: list[dict], baseline: Baseline | None) -> dict:
    model, method, n, adapt_on = key
    seeds = sorted({r["seed"] for r in rows}, key=lambda s: (s is None, s if s is not None else 0))
    acc: dict[tuple, list[float]] = defaultdict(list)  # (corruption, severity) -> accuracy per seed
    by_seed: dict[object, dict[tuple, float]] = defaultdict(dict)
    for r in rows:
        acc[(r["corruption"], r["severity"])].append(r["accuracy"])
        by_seed[r["seed"]][(r["corruption"], r["severity"])] = r["accuracy"]
    cell = {k: sum(v) / len(v) for k, v in acc.items()}  # mean over seeds

    def subset_mean(names: tuple[str, ...], values: dict[tuple, float]) -> float | None:
        return _mean(a for (c, _), a in values.items() if c in names)

    per_seed = [m for m in (subset_mean(COMMON, v) for v in by_seed.values()) if m is not None]
    severities = sorted({s for c, s in cell if c in COMMON})
    corruptions = [c for c in (*COMMON, *EXTRA) if any(k[0] == c for k in cell)]
    others = sorted({c for c, _ in cell if c not in COMMON and c not in EXTRA and c != CLEAN})
    clean = cell.get((CLEAN, 0))
    out = {
        "model": model,
        "method": method,
        "n": n,
        "seeds": seeds,
        "mean_acc": _mean(per_seed),
        "mean_acc_std": statistics.stdev(per_seed) if len(per_seed) > 1 else (0.0 if per_seed else None),
        "mean_acc_extra": subset_mean(EXTRA, cell),
        "per_severity": {str(s): _mean(a for (c, t), a in cell.items() if c in COMMON and t == s) for s in severities},
        "per_corruption": {c: _mean(a for (d, _), a in cell.items() if d == c) for c in [*corruptions, *others]},
        "clean_acc": clean,
        "mce": None,
        "relative_mce": None,
        "cells": len(cell),
    }
    if adapt_on is not None:
        out["adapt_on"] = adapt_on
    if baseline is not None:
        errors = {c: {s: 1.0 - a for (d, s), a in cell.items() if d == c} for c in COMMON}
        errors = {c: e for c, e in errors.items() if e}
        m, rm = mce(errors, baseline, None if clean is None else 1.0 - clean)
        out["mce"], out["relative_mce"] = m, rm
        out["baseline"] = baseline.name
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def write_summary(out: str | os.PathLike[str], summary: list[dict]) -> Path:
    """Write ``summary.json`` atomically into the folder ``out``; returns its path."""
    return write_text(Path(out) / SUMMARY, json.dumps(summary, indent=2) + "\n")
