"""The robustness benchmark protocol: for every model x method x n x seed x (corruption, severity) cell, draw n
adaptation images from the cell (seeded), adapt a fresh copy of the model, and evaluate every image of the cell.

Each cell's images are read once: every variant (method, n, seed) of a model is evaluated on the same batch as it
streams past, so on-the-fly corruption and JPEG decoding are paid once per cell. Methods that need no images
(``source``, ``test-batch``) run once per cell, not once per seed. Adaptation forwards the n images as ONE batch, as
the authors' code does, so ``-b`` (the evaluation batch) never changes an offline method's result.

Finished cells go to ``results.jsonl`` at once (see :mod:`bnadapt.results`); a rerun with ``resume`` skips them.
"""

from __future__ import annotations

import copy
import logging
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np
import torch
from torch import nn

from ._version import __version__
from .adapt import (
    bn_free_methods,
    is_online,
    method_names,
    method_options,
    method_spec,
    method_uses_images,
    option_default,
    parse_options,
    resolve_aliases,
)
from .bn import bn_layers, check_batch_for_layers, select_layers
from .data import BenchData, Cell, ImageSet
from .distributed import Dist, check_shardable
from .results import Journal, read_results
from .runner import Evaluator, Run, Variant, run_streams
from .schedule import item_cost
from .streams import SETTINGS, check_order, plan_streams

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
    order: str = "shuffled"  # how each cell's images stream: shuffled, sorted or dirichlet:ALPHA (bnadapt.streams)
    setting: str = "reset"  # which cells share a stream without a reset: reset, continual, gradual or mixed
    refresh: int = 0  # outside reset: offline methods adapt again every `refresh` images on the latest n (0: never)

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in method_names()]
        if unknown or not self.methods:
            raise ValueError(f"expected --methods from {', '.join(method_names())}, got {unknown or 'none'}")
        if not self.ns or any(n < 0 for n in self.ns):
            raise ValueError(f"expected sample sizes --n >= 0, got {list(self.ns)}")
        offline = [m for m in self.methods if method_uses_images(m) and not is_online(m)]
        if offline and not any(self.ns):
            raise ValueError(
                f"expected --n >= 1 for {', '.join(offline)}, which adapt on n images; --n 0 (no images) is for "
                "online methods only"
            )
        check_order(self.order)
        if self.setting not in SETTINGS:
            raise ValueError(f"expected --setting to be one of {', '.join(SETTINGS)}, got {self.setting!r}")
        if self.refresh < 0 or self.refresh and self.setting == "reset":
            raise ValueError(
                f"expected --refresh K >= 1 with --setting continual, gradual or mixed (got --refresh {self.refresh} "
                f"with --setting {self.setting}); in reset every cell is adapted from the source model anyway"
            )
        if self.setting != "reset" and self.adapt_on is not None:
            raise ValueError(f"expected --adapt-on with --setting reset only, got --setting {self.setting}")
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


def variants(config: BenchConfig) -> list[Variant]:
    """Every (method, n, seed) to evaluate per cell; image-free methods (and online ones at n = 0) once, as
    (method, 0, None), unless they draw random numbers of their own (``dua``): then once per seed; offline methods
    skip n = 0.

    Example:
        >>> variants(BenchConfig(methods=("source", "replace"), ns=(8, 32), seeds=(0, 1)))
        [('source', 0, None), ('replace', 8, 0), ('replace', 8, 1), ('replace', 32, 0), ('replace', 32, 1)]
        >>> variants(BenchConfig(methods=("tent", "dua"), ns=(0, 8), seeds=(0, 1)))
        [('tent', 0, None), ('tent', 8, 0), ('tent', 8, 1), ('dua', 0, 0), ('dua', 0, 1), ('dua', 8, 0), ('dua', 8, 1)]
    """
    out: list[Variant] = []
    for m in config.methods:
        if not method_uses_images(m):
            out.append((m, 0, None))
            continue
        for n in config.ns:
            if n > 0:
                out += [(m, n, s) for s in config.seeds]
            elif is_online(m):
                out += [(m, 0, s) for s in config.seeds] if method_spec(m).random else [(m, 0, None)]
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
        # How streams and draws are made (issue 15): rows of earlier versions (one draw per seed for every cell,
        # class-sorted folders) are not resumed into these.
        "order": config.order,
        "setting": config.setting,
        "draws": "per-cell",
        **config.extra,
    }
    # Only when set, so that results of earlier versions stay resumable.
    fingerprint.update({k: v for k, v in (("first", config.first), ("last", config.last)) if v is not None})
    if config.refresh:
        fingerprint["refresh"] = config.refresh
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


def _prepare(model: nn.Module, config: BenchConfig, device: torch.device) -> nn.Module:
    # A copy: moving, eval() and channels-last must not change the caller's model.
    model = copy.deepcopy(model).to(device).eval()
    return model.to(memory_format=torch.channels_last) if config.channels_last else model


def _preflight(name: str, model: nn.Module, sets: Sequence[ImageSet], ev: Evaluator) -> None:
    """Fail before anything is written: the model must run on these images and know every label."""
    probe = sets[0].get(np.arange(min(2, len(sets[0]))))
    try:
        classes = ev(model, ev.inputs(torch.from_numpy(probe))).shape[-1]
    except (RuntimeError, AssertionError) as e:  # timm's models assert their input size
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


def _check_online_batches(model: nn.Module, layers: list[str], sets: Sequence[ImageSet], batch: int) -> None:
    """Online methods normalise each evaluation batch with its own statistics: a batch of one image gives a flat
    (BatchNorm1d) layer a single value per channel, so refuse that before anything runs."""
    smallest = min(min(batch, len(s) % batch or batch) for s in sets)
    try:
        check_batch_for_layers(model, smallest, layers)
    except ValueError as e:
        raise ValueError(
            f"expected evaluation batches of at least 2 images for online methods, got batches of {smallest} "
            f"(-b {batch}); {str(e).split(': ', 1)[-1].split(';')[0]}: use a larger -b, or one that leaves no "
            "last batch of 1"
        ) from None


def _check_bn_free(name: str, model: nn.Module, methods: Sequence[str]) -> None:
    """A model without BatchNorm layers (a LayerNorm ViT) runs only the methods that need no BN statistics."""
    if bn_layers(model):
        return
    free = bn_free_methods()
    refused = [m for m in methods if m not in free]
    if refused:
        raise ValueError(
            f"expected --methods that run without BatchNorm for model {name}, which has no BN layers, got "
            f"{', '.join(refused)} (they adapt BN statistics); use {' or '.join(free)} for it, or bench it apart"
        )


def _setup(models: Mapping[str, nn.Module], data: BenchData, config: BenchConfig, dist: Dist):
    """Validate, prepare the models and check them on the data: (device, models, evaluator, adapt cell, variants)."""
    config.validate()
    if dist.shard_cells:
        check_shardable(config.methods)
        if config.setting != "reset":
            raise ValueError(f"expected --setting reset with --shard-cells, got {config.setting}; drop --shard-cells")
    try:
        device = torch.device(config.device)
    except RuntimeError:
        raise ValueError(f"expected a torch --device such as cpu, cuda or cuda:1, got {config.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"expected a usable --device, got {config.device!r} but CUDA is not available; use cpu")
    todo_variants = variants(config)
    models = {name: _prepare(m, config, device) for name, m in models.items()}
    ev = Evaluator(device, config.amp, config.channels_last, config.decode)
    adapt_cell = parse_cell(config.adapt_on) if config.adapt_on else None
    shard = dist.shard()
    for name, model in models.items():
        _check_bn_free(name, model, config.methods)
        layers = select_layers([n for n, _ in bn_layers(model)], None, config.first, config.last)
        sets = [data.cell(*c) for c in data.cells]
        if any(is_online(m) for m in config.methods):
            _check_online_batches(model, layers, sets, config.batch_size)
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
    plan = _plan(models, plan_streams(data.cells, config.setting), todo_variants, done, config.setting != "reset")
    try:
        rows: list[dict] = []
        run = Run(data, config, ev, adapt_cell, dist.shard(), set(done or ()))
        cells = _streams(models, plan, run, dist)
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


def _plan(models: Mapping[str, nn.Module], streams: list[list[Cell]], todo: list[Variant], done: set, steps: bool):
    """(model name, stream, variants still to run) for every stream with something left (``done``: the keys of
    finished rows; a stream of several cells runs again whole, as its state carries over, but writes only what is
    missing; ``steps``: rows are keyed by their step in the stream too)."""
    plan = []
    for name in models:
        for stream in streams:
            keys = [(*cell, step) if steps else (*cell,) for step, cell in enumerate(stream)]
            need = [v for v in todo if any((name, *v, *k) not in done for k in keys)]
            if need:
                plan.append((name, stream, need))
    total = len(models) * len(streams)
    if done and len(plan) < total:
        log.info("resuming: %d of %d streams already finished", total - len(plan), total)
    return plan


def _accuracies(cell_rows: list[dict], several_n: bool) -> dict[str, float]:
    """Accuracy per method of one cell's rows, keyed ``method`` (``method@n`` when several n run), for progress."""
    return {r["method"] + (f"@{r['n']}" if several_n and r["n"] else ""): r["accuracy"] for r in cell_rows}


def _streams(models: Mapping[str, nn.Module], plan, run: Run, dist: Dist):
    """Yield (model name, stream label, rows) for each (model, stream, variants) item this rank takes from the
    model's queue (:meth:`Dist.queue`), model by model."""
    generated = run.data.spec.kind == "generate"
    for name, model in models.items():
        mine = [(stream, need) for m, stream, need in plan if m == name]
        costs = [item_cost(s, [len(run.data.cell(*c)) for c in s], len(need), generated) for s, need in mine]
        take = dist.queue(costs)
        adapted_once: dict = {}
        for label, rows in run_streams(name, model, mine, run, adapted_once, take):
            yield name, label, rows
