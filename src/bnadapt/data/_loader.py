"""Streaming the images of benchmark cells in batches through DataLoader workers, to the evaluation device."""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ._sets import ImageSet

log = logging.getLogger(__name__)


class _Chunks(torch.utils.data.Dataset):
    """Item i = batch i of a list of cells: (cell position, indices, staged images, int64 labels); the batches of
    cell k are ``index[start[k] : start[k + 1]]``."""

    def __init__(self, sets: list[ImageSet], batch_size: int, on_device: bool) -> None:
        self.sets, self.on_device = sets, on_device
        self.index = [
            (k, a, min(a + batch_size, len(s))) for k, s in enumerate(sets) for a in range(0, len(s), batch_size)
        ]
        self.start = np.cumsum([0, *(-(-len(s) // batch_size) for s in sets)]).tolist()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, object, torch.Tensor]:
        k, a, b = self.index[i]
        idx = np.arange(a, b)
        staged = self.sets[k].stage(idx, self.on_device)
        return k, idx, staged, torch.from_numpy(np.array(self.sets[k].labels[a:b], np.int64))


class _InOrder(torch.utils.data.Sampler):
    """The batches of the cells in the order ``order`` names them, read only when the loader asks for more: a cell
    is chosen (e.g. taken from a queue shared by several processes) when the loader is ready to start loading it."""

    def __init__(self, chunks: _Chunks, order: Iterable[int]) -> None:
        self.chunks, self.order = chunks, order

    def __iter__(self) -> Iterator[int]:
        for k in self.order:
            yield from range(self.chunks.start[k], self.chunks.start[k + 1])


class Prefetch:
    """Completes each batch's :meth:`ImageSet.finish` (device decoding, on-the-fly corruption, the copy to the device)
    one batch ahead in a side thread, on a side CUDA stream on a GPU, so that batch k+1 is finished while the caller
    runs batch k's forward. Off a GPU the same thread runs (without a stream), so this path is tested on the CPU.

    Example:
        >>> from bnadapt.data import ArrayImages
        >>> s = ArrayImages(np.zeros((5, 8, 8, 3), np.uint8), np.arange(5))
        >>> staged = [(0, np.arange(4), s.stage(np.arange(4)), None), (0, np.arange(4, 5), s.stage([4]), None)]
        >>> [tuple(x.shape) for _, x, _ in Prefetch([s], torch.device("cpu"))(staged)]
        [(4, 8, 8, 3), (1, 8, 8, 3)]
    """

    def __init__(self, sets: list[ImageSet], device: torch.device, depth: int = 1) -> None:
        self.sets, self.device, self.depth = sets, device, depth
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _finish(self, item: tuple) -> tuple:
        k, idx, staged, y = item
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            x = self.sets[k].finish(staged, np.asarray(idx), self.device)
            done = torch.cuda.Event() if self.stream is not None else None
            if done is not None:
                done.record(self.stream)
        return k, x, y, done

    def _ready(self, k: int, x: torch.Tensor, y: torch.Tensor, done) -> tuple[int, torch.Tensor, torch.Tensor]:
        if done is not None:  # the caller's stream waits for the side stream's work, and keeps x's memory alive
            current = torch.cuda.current_stream(self.device)
            current.wait_event(done)
            x.record_stream(current)
        return k, x, y

    def __call__(self, items: Iterable[tuple]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        pending: deque = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="bnadapt-prefetch") as pool:
            try:
                for item in items:
                    pending.append(pool.submit(self._finish, item))
                    if len(pending) > self.depth:
                        yield self._ready(*pending.popleft().result())
                while pending:
                    yield self._ready(*pending.popleft().result())
            finally:
                for f in pending:
                    f.cancel()


def iter_batches_of(
    sets: list[ImageSet],
    batch_size: int,
    jobs: int = 0,
    pin_memory: bool = False,
    device: torch.device | str = "cpu",
    on_device: bool | None = None,
    order: Iterable[int] | None = None,
    prefetch: bool | None = None,
):
    """Yield ``(cell position, uint8 NHWC batch on device, labels)`` over every image of ``sets`` in order, loaded
    by ``jobs`` DataLoader workers (0: in this process), pinned for a fast copy to CUDA when asked.

    With ``on_device`` (default: when ``device`` is CUDA) JPEG files are decoded and on-the-fly corruptions with a
    torch path are applied on ``device`` rather than in the workers (see :meth:`ImageSet.stage`). ``order``: the
    cell positions to load, in this order, read lazily as loading proceeds (default: every cell in turn).
    ``prefetch`` (default: on CUDA) finishes the next batch while the caller works on this one (:class:`Prefetch`).

    Example:
        >>> from bnadapt.data import ArrayImages
        >>> s = ArrayImages(np.zeros((5, 32, 32, 3), np.uint8), np.arange(5))
        >>> [(k, tuple(x.shape)) for k, x, _ in iter_batches_of([s], 4)]
        [(0, (4, 32, 32, 3)), (0, (1, 32, 32, 3))]
    """
    device = torch.device(device)
    on_device = device.type == "cuda" if on_device is None else on_device
    prefetch = device.type == "cuda" if prefetch is None else prefetch
    chunks = _Chunks(sets, batch_size, on_device)
    loader = torch.utils.data.DataLoader(
        chunks,
        batch_size=None,
        sampler=_InOrder(chunks, range(len(sets)) if order is None else order),
        num_workers=jobs,
        pin_memory=pin_memory,
        prefetch_factor=2 if jobs else None,
    )

    def finished():
        if prefetch:
            yield from Prefetch(sets, device)(loader)
            return
        for k, idx, staged, y in loader:
            yield k, sets[k].finish(staged, np.asarray(idx), device), y

    try:
        yield from finished()
    except Exception as e:
        lines = str(e).strip().splitlines()
        if not jobs or len(lines) < 2 or not lines[0].startswith("Caught "):
            raise
        # A worker's error arrives as "Caught X in DataLoader worker process k." + its traceback: re-raise it with
        # its own message (the traceback's last line), so it names the file as it does without workers.
        try:
            plain = type(e)(lines[-1].partition(": ")[2] or lines[-1])
        except Exception:  # an exception type that needs other arguments: keep torch's wrapped error
            raise e from None
        raise plain from e
