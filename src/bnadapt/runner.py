"""The benchmark's inner loop: stream each planned stream's images once past every variant of a model, adapting and
evaluating as the protocol (:mod:`bnadapt.streams`) says, and turn the counts into result rows.

A stream is one cell (setting ``reset``) or several cells played without a reset. Every variant (method, n, seed)
of a model sees the same batches, so decoding and on-the-fly corruption are paid once per cell. Each variant's model
is adapted at the start of its stream: in ``reset`` from n images drawn at random from the cell (seeded per seed and
cell, :func:`bnadapt.streams.draw_seed`); in the other settings from the stream's first n images, as a deployed model
adapts on the first images it meets.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .adapt import adapt, is_online, method_uses_images, sample_indices
from .data import BenchData, Cell, ImageSet, IndexedImages, iter_batches_of
from .methods import reset
from .metrics import Accuracy
from .results import row_key
from .streams import draw_seed, mixed_order, stream_order

log = logging.getLogger(__name__)

__all__ = ["Evaluator", "Run", "Variant", "run_streams", "stream_label"]

Variant = tuple[str, int, "int | None"]  # (method, n, seed); n = 0 and seed None for methods that use no images


class Evaluator:
    """Moves uint8 NHWC batches to the device as [0, 1] NCHW floats and runs a model on them in inference mode.

    Example:
        >>> ev = Evaluator(torch.device("cpu"), False, False)
        >>> ev.inputs(torch.zeros(2, 4, 4, 3, dtype=torch.uint8)).shape
        torch.Size([2, 3, 4, 4])
    """

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


@dataclass(frozen=True)
class Run:
    """What every stream of a run shares: the data, the settings, the evaluator, the adaptation cell, the shard, and
    the rows already finished (a resumed stream writes only the rows it lacks)."""

    data: BenchData
    config: object  # benchmark.BenchConfig
    ev: Evaluator
    adapt_cell: Cell | None
    shard: object = None  # distributed._Shard: this rank's part of each cell and sample, with --shard-cells
    done: set = field(default_factory=set)


class _Mixed(ImageSet):
    """Several cells' images interleaved into one stream: position i is image ``local[i]`` of cell ``origin[i]``."""

    def __init__(self, sets: list[ImageSet], origin: np.ndarray, local: np.ndarray) -> None:
        self.sets, self.origin, self.local = sets, origin, local
        self.labels = np.array([sets[o].labels[i] for o, i in zip(origin, local, strict=True)], np.int64)
        self.name = "mixed"

    def get(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        parts = {}
        for k in np.unique(self.origin[indices]):
            at = np.flatnonzero(self.origin[indices] == k)
            parts[int(k)] = (at, self.sets[int(k)].get(self.local[indices[at]]))
        first = next(iter(parts.values()))[1]
        out = np.empty((len(indices), *first.shape[1:]), first.dtype)
        for at, images in parts.values():
            out[at] = images
        return out


@dataclass
class _Segment:
    """One piece of a stream as it is loaded: ``images`` in stream order and, per position, the index of the
    stream's cell it belongs to (``origin``; None: all of ``cell``)."""

    plan_item: int
    step: int
    cell: Cell | None
    images: ImageSet
    origin: np.ndarray | None = None


def _ordered(images: ImageSet, cell: Cell, run: Run) -> ImageSet:
    order = stream_order(images.labels, run.config.order, draw_seed(0, cell, "order"))
    return IndexedImages(images, order)


def _segments(p: int, stream: list[Cell], run: Run) -> list[_Segment]:
    sets = [run.data.cell(*c) for c in stream]
    if run.config.setting != "mixed" or len(stream) == 1 and stream[0].corruption == "clean":
        return [_Segment(p, k, c, _ordered(s, c, run)) for k, (c, s) in enumerate(zip(stream, sets, strict=True))]
    origin, local = mixed_order([s.labels for s in sets], run.config.order, draw_seed(0, "mixed", "order"))
    return [_Segment(p, 0, None, _Mixed(sets, origin, local), origin)]


def stream_label(stream: list[Cell]) -> str:
    """How progress and logs name a stream: its cell, or its first and last cells and their count.

    Example:
        >>> stream_label([Cell("fog", 5)]), stream_label([Cell("fog", 5), Cell("snow", 5), Cell("frost", 5)])
        ('fog:5', 'fog:5..frost:5 (3 cells)')
    """
    return str(stream[0]) if len(stream) == 1 else f"{stream[0]}..{stream[-1]} ({len(stream)} cells)"


def _adapted(model, variant: Variant, source: ImageSet, cell: Cell, run: Run, samples: dict):
    """A fresh adapted copy of ``model`` for one variant, the seconds it took and the seed of its draw (with a
    shard: from this rank's part of the sample, its statistics combined with the other ranks')."""
    method, n, seed = variant
    device = run.ev.device
    t0 = time.perf_counter()
    images, reducer, drawn = None, None, None
    options = run.config.options_for(method)
    if method_uses_images(method) and n > 0:
        if run.config.setting == "reset":
            drawn = draw_seed(seed, cell)
            indices = sample_indices(len(source), n, drawn)
        else:  # the stream's first n images, in the order they arrive
            indices = np.arange(n, dtype=np.int64)
        if run.shard is not None:
            indices, reducer = run.shard.adaptation(method, options, indices)
        # Loaded as the evaluation loads them (decoded and corrupted on the GPU there), so the sample is the same bytes;
        # methods drawing the same images share the load (``samples``: this stream's loaded samples).
        key = (id(source), tuple(indices.tolist()))
        if key not in samples:
            samples[key] = run.ev.inputs(source.load(indices, device, run.ev.on_device))
        images = samples[key]
    out = _adapt_on(model, variant, images, run, reducer)
    return out, time.perf_counter() - t0, drawn


def _adapt_on(model: nn.Module, variant: Variant, images, run: Run, reducer=None) -> nn.Module:
    """``model`` adapted by one variant on ``images`` (already on the device), as the run's settings say."""
    method, n, seed = variant
    # One batch of n images, as the authors' protocol: the evaluation batch size never changes the statistics.
    return adapt(
        model,
        images,
        method=method,
        seed=seed,
        part=run.config.part,
        first=run.config.first,
        last=run.config.last,
        batch_size=max(1, n),
        device=run.ev.device,
        options=run.config.options_for(method),
        reducer=reducer,
    )


class _Window:
    """The latest ``n`` images of a stream, for an offline method that adapts again every ``every`` images
    (``--refresh``). The stream's first n images were its first adaptation, so the count starts at -n.

    Example:
        >>> w = _Window(2, 3)  # first adapted on images 0 and 1; again every 3 images, on the latest 2
        >>> [None if (x := w.push(torch.tensor([[float(k)]]))) is None else x.flatten().tolist() for k in range(9)]
        [None, None, None, None, [3.0, 4.0], None, None, [6.0, 7.0], None]
    """

    def __init__(self, n: int, every: int) -> None:
        self.n, self.every, self.since = n, every, -n
        self.parts: list[torch.Tensor] = []

    def push(self, x: torch.Tensor) -> torch.Tensor | None:
        """Add a batch; return the latest n images when ``every`` images have come since the last adaptation."""
        self.parts.append(x)
        self.since += len(x)
        kept, total = [], 0
        for part in reversed(self.parts):
            if total >= self.n:
                break
            kept.append(part)
            total += len(part)
        self.parts = kept[::-1]
        if self.since < self.every:
            return None
        self.since = 0
        return torch.cat(self.parts)[-self.n :]


@dataclass
class _State:
    """One variant's adapted model in a stream, its counts per cell of the stream, its seconds and its draw."""

    variant: Variant
    model: nn.Module
    seconds: float
    drawn: int | None
    counts: dict = field(default_factory=dict)  # stream cell index -> Accuracy
    window: _Window | None = None  # with --refresh: what the variant adapts on next


def _start(model, stream: list[Cell], first: _Segment, need: list[Variant], run: Run, adapted_once) -> list[_State]:
    """Each variant's adapted model at the start of a stream."""
    state = []
    samples: dict = {}
    if run.config.setting == "reset":
        source, cell = first.images.base, stream[0]  # the cell as opened for the stream, before its ordering
    else:
        source, cell = first.images, stream[0]
    for variant in need:
        if run.adapt_cell is None:
            m, secs, drawn = _adapted(model, variant, source, cell, run, samples)
        else:
            if variant not in adapted_once:
                cell_set = run.data.cell(*run.adapt_cell)
                adapted_once[variant] = _adapted(model, variant, cell_set, run.adapt_cell, run, {})
            m, secs, drawn = adapted_once[variant]
            adapted_once[variant] = (m, 0.0, drawn)  # the adaptation's time is counted in its first cell only
            # Online methods keep changing while they run: each cell starts from the state adapt() returned.
            if is_online(variant[0]):
                reset(m)
        method, n, _ = variant
        refresh = run.config.refresh and method_uses_images(method) and not is_online(method) and n > 0
        state.append(_State(variant, m, secs, drawn, window=_Window(n, run.config.refresh) if refresh else None))
    return state


def _rows(name: str, stream: list[Cell], state: list[_State], run: Run) -> list[dict]:
    config = run.config
    out = []
    for s in state:
        method, n, seed = s.variant
        total = sum(acc.total for acc in s.counts.values()) or 1
        for k, acc in sorted(s.counts.items()):
            cell = stream[k]
            row = {"model": name, "method": method, "n": n, "seed": seed, "corruption": cell[0], "severity": cell[1]}
            row.update(correct=acc.correct, correct5=acc.correct5, total=acc.total, accuracy=acc.compute())
            row.update(top5=acc.compute_top5())
            row.update(seconds=round(s.seconds * acc.total / total, 4), adapt_on=config.adapt_on)
            row.update(order=config.order, setting=config.setting, draw_seed=s.drawn)
            if config.setting != "reset":
                row["step"] = k
            if s.window is not None:
                row["refresh"] = config.refresh
            out.append(row)
    if run.done:
        out = [r for r in out if row_key(r) not in run.done]
    return out


def run_streams(
    name: str, model: nn.Module, plan: list, run: Run, adapted_once: dict, take: Callable[[], int | None] | None = None
) -> Iterator[tuple]:
    """Yield (stream label, rows) for each planned (stream, variants) of one model, loading every segment's batches
    once (with a shard: this rank's block of each cell's images).

    ``take`` gives the position in ``plan`` of the next stream to run, or None to stop (default: each in turn); it is
    asked when the loader is ready to start loading that stream, e.g. from a queue shared by several processes.
    """
    if not plan:
        return
    ev, config = run.ev, run.config
    segments = [seg for p, (stream, _) in enumerate(plan) for seg in _segments(p, stream, run)]
    shown = [seg.images if run.shard is None else run.shard.evaluated(seg.images) for seg in segments]
    of_item: dict[int, list[int]] = {}
    for k, seg in enumerate(segments):
        of_item.setdefault(seg.plan_item, []).append(k)
    take = take or iter(range(len(plan))).__next__

    def claimed() -> Iterator[int]:
        while (p := _next_or_none(take)) is not None:
            yield from of_item[p]

    pin = ev.device.type == "cuda"
    current, offset = -1, 0
    state: list[_State] = []
    batches = iter_batches_of(shown, config.batch_size, config.jobs, pin, ev.device, ev.on_device, claimed())
    for k, xb, yb in batches:
        seg = segments[k]
        if k != current:
            if current >= 0 and segments[current].plan_item != seg.plan_item:
                stream = plan[segments[current].plan_item][0]
                yield stream_label(stream), _rows(name, stream, state, run)
            if current < 0 or segments[current].plan_item != seg.plan_item:
                stream, need = plan[seg.plan_item]
                state = _start(model, stream, seg, need, run, adapted_once)
            current, offset = k, 0
        x = ev.inputs(xb)
        y = yb.to(ev.device, non_blocking=True)
        origin = None if seg.origin is None else torch.from_numpy(seg.origin[offset : offset + len(yb)])
        offset += len(yb)
        for s in state:
            t0 = time.perf_counter()
            if s.window is not None and (latest := s.window.push(x)) is not None:
                s.model = _adapt_on(model, s.variant, latest, run)
            logits = ev(s.model, x)
            _count(s.counts, logits, y, seg.step if origin is None else origin)
            s.seconds += time.perf_counter() - t0
    if current >= 0:
        stream = plan[segments[current].plan_item][0]
        yield stream_label(stream), _rows(name, stream, state, run)
    fallbacks = sum(s.cpu_fallbacks() for s in shown)
    if fallbacks:
        log.warning("%d image file(s) could not be decoded on %s and were decoded on the CPU", fallbacks, ev.device)


def _next_or_none(take: Callable[[], int | None]) -> int | None:
    try:
        return take()
    except StopIteration:  # a plain iterator's __next__
        return None


def _count(counts: dict, logits: torch.Tensor, y: torch.Tensor, where: int | torch.Tensor) -> None:
    """Add a batch's hits to the counts of its cell (``where``: the stream's cell index, or one per image)."""
    if isinstance(where, int):
        counts.setdefault(where, Accuracy()).update(logits, y)
        return
    where = where.to(y.device)
    for k in torch.unique(where).tolist():
        mask = where == k
        counts.setdefault(k, Accuracy()).update(logits[mask], y[mask])
