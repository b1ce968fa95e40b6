"""The robustness benchmark protocol: for every model x method x n x seed x (corruption, severity) cell, draw n
adaptation images from the cell (seeded), adapt a fresh copy of the model, and evaluate every image of the cell.

Each cell's images are read once: every variant (method, n, seed) of a model is evaluated on the same batch as it
streams past, so on-the-fly corruption and JPEG decoding are paid once per cell. Methods that need no images
(``source``, ``test-batch``) run once per cell, not once per seed. Adaptation forwards the n images as ONE batch, as
the authors' code does, so ``-b`` (the evaluation batch) never changes an offline method's result.

Finished cells go to ``results.jsonl`` at once (see :mod:`bnadapt.results`); a rerun with ``resume`` skips them.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .adapt import (
    adapt,
    is_online,
    method_names,
    method_options,
    method_uses_images,
    option_default,
    parse_options,
    resolve_aliases,
    sample_indices,
)
from .bn import bn_layers, select_layers
from .data import BenchData, Cell, ImageSet, iter_batches_of
from .distributed import Dist, check_shardable
from .methods import reset
from .metrics import Accuracy
from .results import Journal, read_results

log = logging.getLogger(__name__)

__all__ = ["BenchConfig", "Variant", "parse_cell", "run_benchmark", "variants"]

# (done cells, total cells, cell label, accuracy per method of the cell just finished)
Progress = Callable[[int, int, str, dict[str, float]], None]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What to run: methods, sample sizes ``ns``, adaptation ``seeds``, and how (batch, workers, device, precision).

    ``adapt_on``: ``"corruption:severity"`` (or ``"clean"``) to adapt on that one cell and evaluate on every cell.
    ``part``/``first``/``last`` are passed to :func:`bnadapt.adapt`; ``options`` are the methods' own options (each
    method gets those it declares); ``prior`` and ``momentum`` are aliases of the options of that name (None: the
    method's default).

    Example:
        >>> BenchConfig(methods=("prior",), prior=8).options_for("prior")
        {'prior': 8.0}
    """

    methods: tuple[str, ...] = ("source", "replace")
    ns: tuple[int, ...] = (32,)
    seeds: tuple[int, ...] = (0,)
    batch_size: int = 256
    jobs: int = 0
    device: str = "cpu"
    amp: bool | str = False  # False, "bf16", "fp16", or True: bf16 on CPU, fp16 on CUDA
    channels_last: bool = False
    prior: float | None = None
    momentum: float | None = None
    part: str = "both"
    adapt_on: str | None = None
    extra: dict = field(default_factory=dict)  # recorded in the header (e.g. the --clean set)
    first: int | None = None
    last: int | None = None
    options: dict = field(default_factory=dict)
    decode: str = "auto"  # where JPEG files are decoded and generate:'s corruptions run: auto (the device) or cpu

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown or not self.methods:
            raise ValueError(f"expected --methods from {', '.join(method_names())}, got {unknown or 'none'}")
        if not self.ns or any(n < 1 for n in self.ns):
            raise ValueError(f"expected sample sizes --n >= 1, got {list(self.ns)}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"expected non-negative --seeds, got {list(self.seeds)}")
        if self.decode not in ("auto", "cpu"):
            raise ValueError(f"expected decode 'auto' or 'cpu', got {self.decode!r}")
        if self.amp not in (False, True, "bf16", "fp16"):
            raise ValueError(f"expected --amp bf16 or fp16, got {self.amp!r}")
        if self.batch_size < 1 or self.jobs < 0:
            raise ValueError(f"expected -b >= 1 and -j >= 0, got -b {self.batch_size} -j {self.jobs}")
        if self.prior is not None and not self.prior >= 0:  # also refuses NaN
            raise ValueError(f"expected a prior strength --prior >= 0, got {self.prior}")
        if self.adapt_on is not None:
            parse_cell(self.adapt_on)
        if self.first is not None and self.last is not None:
            raise ValueError(f"expected --first or --last, not both; got --first {self.first} --last {self.last}")
        if any(k is not None and k < 1 for k in (self.first, self.last)):
            raise ValueError(f"expected --first/--last K >= 1, got {self.first or self.last}")
        parse_options(self.methods, self.options)
        for m in self.methods:
            self.options_for(m)

    def options_for(self, method: str) -> dict:
        """The options ``method`` gets: those of ``options`` it declares, with the ``prior`` alias filled in."""
        declared = method_options(method)
        given = {k: v for k, v in self.options.items() if k in declared}
        return resolve_aliases(method, given, prior=self.prior, momentum=self.momentum)


Variant = tuple[str, int, "int | None"]  # (method, n, seed); n = 0 and seed None for methods that use no images


def variants(config: BenchConfig) -> list[Variant]:
    """Every (method, n, seed) to evaluate per cell; image-free methods once, as (method, 0, None).

    Example:
        >>> variants(BenchConfig(methods=("source", "replace"), ns=(8, 32), seeds=(0, 1)))
        [('source', 0, None), ('replace', 8, 0), ('replace', 8, 1), ('replace', 32, 0), ('replace', 32, 1)]
    """
    out: list[Variant] = []
    for m in config.methods:
        if method_uses_images(m):
            out += [(m, n, s) for n in config.ns for s in config.seeds]
        else:
            out.append((m, 0, None))
    return list(dict.fromkeys(out))


def parse_cell(text: str) -> Cell:
    """``"gaussian_noise:5"`` -> ("gaussian_noise", 5); ``"clean"`` -> ("clean", 0) (kept for :meth:`Cell.parse`).

    Example:
        >>> parse_cell("fog:3")
        Cell(corruption='fog', severity=3)
    """
    return Cell.parse(text)


def _versions() -> dict[str, str]:
    return {
        "bnadapt": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _header(models: Mapping[str, nn.Module], data: BenchData, config: BenchConfig, command, device) -> dict:
    prep = {name: getattr(m, "preprocessing", None) for name, m in models.items()}
    options = parse_options(config.methods, config.options)
    if config.momentum is not None and any("momentum" in method_options(m) for m in config.methods):
        options["momentum"] = float(config.momentum)
    # --prior was a setting of its own before it became prior's option: it stays a top-level entry (default
    # included), however it was given, so that results of earlier versions stay resumable.
    prior = options.pop("prior", option_default("prior") if config.prior is None else config.prior)
    fingerprint = {
        "models": prep,
        "data": str(data.spec),
        "corrupt_seed": data.seed,
        "prior": prior,
        "part": config.part,
        "adapt_on": config.adapt_on,
        "amp": config.amp,
        **config.extra,
    }
    # Only when set, so that results of earlier versions stay resumable.
    fingerprint.update({k: v for k, v in (("first", config.first), ("last", config.last)) if v is not None})
    if options:
        fingerprint["options"] = dict(sorted(options.items()))
    return {
        "command": list(command) if command is not None else None,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "device": _device_name(device),
        "preprocessing": prep,
        "data": {"spec": str(data.spec), "kind": data.spec.kind, "corrupt_seed": data.seed, "missing": data.missing},
        "config": asdict(config),
        "fingerprint": fingerprint,
    }


class _Evaluator:
    """Moves uint8 NHWC batches to the device as [0, 1] NCHW floats and runs a model on them in inference mode."""

    def __init__(self, device: torch.device, amp: bool | str, channels_last: bool, decode: str = "auto") -> None:
        self.device, self.amp, self.channels_last = device, bool(amp), channels_last
        # JPEG decoding and generate:'s corruptions run on the GPU when there is one, unless asked to stay on the CPU.
        self.on_device = device.type == "cuda" and decode == "auto"
        if amp is True:
            amp = "bf16" if device.type == "cpu" else "fp16"
        self.dtype = torch.bfloat16 if amp == "bf16" else torch.float16

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        # uint8 NHWC viewed as NCHW already has channels-last strides; copying it to NCHW-contiguous cost ~15% of
        # ResNet-20's throughput on CPU (benchmarks/bench_harness.py), so the layout is kept as it comes.
        x = x.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.amp else contextlib.nullcontext()
        with torch.inference_mode(), amp:
            return model(x)


def _prepare(model: nn.Module, config: BenchConfig, device: torch.device) -> nn.Module:
    # A copy: moving, eval() and channels-last must not change the caller's model.
    model = copy.deepcopy(model).to(device).eval()
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def _preflight(name: str, model: nn.Module, sets: Sequence[ImageSet], ev: _Evaluator) -> None:
    """Fail before anything is written: the model must run on these images and know every label."""
    probe = sets[0].get(np.arange(min(2, len(sets[0]))))
    try:
        classes = ev(model, ev.inputs(torch.from_numpy(probe))).shape[-1]
    except RuntimeError as e:
        raise ValueError(
            f"expected images model {name} can take, got {tuple(probe.shape[1:])} (H, W, C) images from "
            f"{sets[0].name} that it could not run on: {str(e).splitlines()[0]}"
        ) from None
    for s in sets:
        lo, hi = int(s.labels.min()), int(s.labels.max())
        if lo < 0 or hi >= classes:
            raise ValueError(
                f"expected labels in 0..{classes - 1} for model {name} ({classes} classes), got {lo}..{hi} in "
                f"{s.name}; check that --data matches the model's classes"
            )


def _setup(models: Mapping[str, nn.Module], data: BenchData, config: BenchConfig, dist: Dist):
    """Validate, prepare the models and check them on the data: (device, models, evaluator, adapt cell, variants)."""
    config.validate()
    if dist.shard_cells:
        check_shardable(config.methods)
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise ValueError(f"expected a torch --device such as cpu, cuda or cuda:1, got {config.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"expected a usable --device, got {config.device!r} but CUDA is not available; use cpu")
    todo_variants = variants(config)
    models = {name: _prepare(m, config, device) for name, m in models.items()}
    ev = _Evaluator(device, config.amp, config.channels_last, config.decode)
    adapt_cell = parse_cell(config.adapt_on) if config.adapt_on else None
    shard = dist.shard()
    for name, model in models.items():
        select_layers([n for n, _ in bn_layers(model)], None, config.first, config.last)  # --first/--last fit it
        sets = [data.cell(*c) for c in data.cells]
        if adapt_cell is not None:
            sets.append(data.cell(*adapt_cell))
        _preflight(name, model, sets, ev)
        smallest = min(len(s) for s in (sets[-1:] if adapt_cell else sets))
        if max((v[1] for v in todo_variants), default=0) > smallest:
            raise ValueError(
                f"expected --n <= the images of every cell ({smallest}), got n={max(config.ns)}; lower --n"
            )
        for s in sets if shard is not None else ():
            shard.evaluated(s)
    return device, models, ev, adapt_cell, todo_variants


def run_benchmark(
    models: Mapping[str, nn.Module],
    data: BenchData,
    config: BenchConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    command: Sequence[str] | None = None,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    dist: Dist | None = None,
) -> list[dict]:
    """Run the protocol and return every result row (with ``out``: also those of earlier runs read back).

    Args:
        models: name -> model taking [0, 1] float NCHW images (e.g. from :func:`bnadapt.load_model`).
        data: the cells (:func:`bnadapt.data.open_data`).
        config: methods, n, seeds, batch size, workers, device, precision.
        out: folder for ``results.jsonl`` (appended per cell); None keeps the rows in memory only.
        command: the command line to record in the header.
        resume: skip cells already in ``out``; force: write into a folder of another command.
        progress: called after each cell with (done, total, cell label, accuracy per method).
        dist: this process's part of a multi-process run (:func:`bnadapt.distributed.init_from_env`): rank 0 writes
            ``out`` and returns the rows, the other ranks return [].

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from bnadapt.data import open_data
        >>> from bnadapt.models import cifar_resnet
        >>> f = Path(tempfile.mkdtemp()) / "c.npz"
        >>> np.savez(f, x=np.full((8, 32, 32, 3), 99, np.uint8), y=np.arange(8) % 10)
        >>> data = open_data(f"generate:cifar:{f}", ["contrast"], [5])
        >>> rows = run_benchmark({"r20": cifar_resnet(20)}, data, BenchConfig(ns=(4,)))
        >>> [(r["method"], r["corruption"], r["total"]) for r in rows]
        [('source', 'clean', 8), ('replace', 'clean', 8), ('source', 'contrast', 8), ('replace', 'contrast', 8)]
    """
    config = config or BenchConfig()
    dist = dist or Dist()
    try:  # every check that can fail runs before the journal is touched, on every rank
        device, models, ev, adapt_cell, todo_variants = _setup(models, data, config, dist)
        header = {**_header(models, data, config, command, device), **dist.header()}
    except Exception as e:
        dist.gathered(e, None)
        raise
    settings = {
        "models": list(models),
        "cells": list(data.cells),
        "fingerprint": header["fingerprint"],
        "config": {k: v for k, v in asdict(config).items() if k not in ("device", "jobs")},
        "shard_cells": dist.shard_cells,
        "resume": resume,
        "force": force,
    }
    dist.gathered(None, settings)

    def open_journal() -> Journal | None:
        return Journal(out, header, resume=resume, force=force) if out is not None else None

    journal, done = dist.on_rank0(open_journal, lambda j: j.done if j is not None else set())
    plan = _plan(models, data.cells, todo_variants, done)
    try:
        rows: list[dict] = []
        cells = _cells(models, dist.mine(plan), _Run(data, config, ev, adapt_cell, dist.shard()))
        for finished, (name, cell, cell_rows) in enumerate(dist.exchange(cells, len(plan)), start=1):
            if journal is not None:
                journal.append(cell_rows)
            rows.extend(cell_rows)
            if progress is not None:
                progress(finished, len(plan), f"{name} {cell}", _accuracies(cell_rows, several_n=len(config.ns) > 1))
    finally:
        if journal is not None:
            journal.close()
    if journal is not None:
        return read_results(journal.path)[1]
    return rows


def _plan(models: Mapping[str, nn.Module], cells: list[Cell], todo: list[Variant], done: set) -> list:
    """(model name, cell, variants still to run) for every cell with something left (``done``: finished rows)."""
    plan = []
    for name in models:
        for cell in cells:
            need = [v for v in todo if (name, *v, *cell) not in done]
            if need:
                plan.append((name, cell, need))
    total = len(models) * len(cells)
    if done and len(plan) < total:
        log.info("resuming: %d of %d cells already finished", total - len(plan), total)
    return plan


def _accuracies(cell_rows: list[dict], several_n: bool) -> dict[str, float]:
    """Accuracy per method of one cell's rows, keyed ``method`` (``method@n`` when several n run), for progress."""
    return {r["method"] + (f"@{r['n']}" if several_n and r["n"] else ""): r["accuracy"] for r in cell_rows}


@dataclass(frozen=True)
class _Run:
    """What every cell of a run shares: the data, the settings, the evaluator, the adaptation cell and the shard."""

    data: BenchData
    config: BenchConfig
    ev: _Evaluator
    adapt_cell: Cell | None
    shard: object = None  # distributed._Shard: this rank's part of each cell and sample, with --shard-cells


def _adapted(model, variant: Variant, source: ImageSet, run: _Run, samples: dict | None = None):
    """A fresh adapted copy of ``model`` for one variant, and the seconds it took (with a shard: from this rank's
    part of the sample, its statistics combined with the other ranks')."""
    method, n, seed = variant
    device = run.ev.device
    t0 = time.perf_counter()
    images = None
    options = run.config.options_for(method)
    reducer = None
    if method_uses_images(method):
        indices = sample_indices(len(source), n, seed)
        if run.shard is not None:
            indices, reducer = run.shard.adaptation(method, options, indices)
        # Loaded as the evaluation loads them (decoded and corrupted on the GPU there), so the sample is the same bytes;
        # methods drawing with the same seed share the load (``samples``: this cell's loaded samples).
        samples = {} if samples is None else samples
        key = (id(source), tuple(indices.tolist()))
        if key not in samples:
            samples[key] = run.ev.inputs(source.load(indices, device, run.ev.on_device))
        images = samples[key]
    # One batch of n images, as the authors' protocol: the evaluation batch size never changes the statistics.
    out = adapt(
        model,
        images,
        method=method,
        seed=seed,
        part=run.config.part,
        first=run.config.first,
        last=run.config.last,
        batch_size=max(1, n),
        device=device,
        options=options,
        reducer=reducer,
    )
    return out, time.perf_counter() - t0


def _cells(models: Mapping[str, nn.Module], plan, run: _Run):
    """Yield (model name, cell, rows) for each planned (model, cell, variants) item, model by model."""
    for name, model in models.items():
        mine = [(cell, need) for m, cell, need in plan if m == name]
        adapted_once: dict[Variant, tuple[nn.Module, float]] = {}
        for cell, cell_rows in _run_model(name, model, mine, run, adapted_once):
            yield name, cell, cell_rows


def _cell_models(model, k: int, variants_: list[Variant], sets: list[ImageSet], run: _Run, adapted_once) -> list:
    """Per variant of cell ``k``: [variant, adapted model, Accuracy, seconds so far]."""
    state = []
    samples: dict = {}
    for variant in variants_:
        if run.adapt_cell is None:
            m, secs = _adapted(model, variant, sets[k], run, samples)
        else:
            if variant not in adapted_once:
                adapted_once[variant] = _adapted(model, variant, run.data.cell(*run.adapt_cell), run)
            m, secs = adapted_once[variant]
            adapted_once[variant] = (m, 0.0)  # the adaptation's time is counted in its first cell only
            # Online methods keep changing while they run: each cell starts from the state adapt() returned.
            if is_online(variant[0]):
                reset(m)
        state.append([variant, m, Accuracy(), secs])
    return state


def _rows(name: str, cell: Cell, state: list, adapt_on: str | None) -> list[dict]:
    out = []
    for (method, n, seed), _, acc, secs in state:
        row = {"model": name, "method": method, "n": n, "seed": seed, "corruption": cell[0], "severity": cell[1]}
        row.update(correct=acc.correct, correct5=acc.correct5, total=acc.total, accuracy=acc.compute())
        row.update(top5=acc.compute_top5(), seconds=round(secs, 4))
        out.append({**row, "adapt_on": adapt_on})
    return out


def _run_model(name, model, plan, run: _Run, adapted_once):
    """Yield (cell, rows) for each planned cell of one model, streaming each cell's batches once (with a shard:
    this rank's block of each cell's images)."""
    if not plan:
        return
    ev, config = run.ev, run.config
    sets = [run.data.cell(*cell) for cell, _ in plan]
    shown = sets if run.shard is None else [run.shard.evaluated(s) for s in sets]
    pin = ev.device.type == "cuda"
    current = -1
    state: list[list] = []  # per variant: [variant, model, Accuracy, seconds]
    for k, xb, yb in iter_batches_of(shown, config.batch_size, config.jobs, pin, ev.device, ev.on_device):
        if k != current:
            if current >= 0:
                yield plan[current][0], _rows(name, plan[current][0], state, config.adapt_on)
            current = k
            state = _cell_models(model, k, plan[k][1], sets, run, adapted_once)
        x = ev.inputs(xb)
        y = yb.to(ev.device, non_blocking=True)
        for entry in state:
            t0 = time.perf_counter()
            entry[2].update(ev(entry[1], x), y)
            entry[3] += time.perf_counter() - t0
    if current >= 0:
        yield plan[current][0], _rows(name, plan[current][0], state, config.adapt_on)
    fallbacks = sum(s.cpu_fallbacks() for s in sets)
    if fallbacks:
        log.warning("%d image file(s) could not be decoded on %s and were decoded on the CPU", fallbacks, ev.device)
