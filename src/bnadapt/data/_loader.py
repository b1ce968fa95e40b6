"""Streaming the images of benchmark cells in batches through DataLoader workers, to the evaluation device."""

from __future__ import annotations

import logging

import numpy as np
import torch

from ._sets import ImageSet

log = logging.getLogger(__name__)


class _Chunks(torch.utils.data.Dataset):
    """Item k = batch k of a list of cells: (cell position, indices, staged images, int64 labels)."""

    def __init__(self, sets: list[ImageSet], batch_size: int, on_device: bool) -> None:
        self.sets, self.on_device = sets, on_device
        self.index = [
            (k, a, min(a + batch_size, len(s))) for k, s in enumerate(sets) for a in range(0, len(s), batch_size)
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, object, torch.Tensor]:
        k, a, b = self.index[i]
        idx = np.arange(a, b)
        staged = self.sets[k].stage(idx, self.on_device)
        return k, idx, staged, torch.from_numpy(np.array(self.sets[k].labels[a:b], np.int64))


def iter_batches_of(
    sets: list[ImageSet],
    batch_size: int,
    jobs: int = 0,
    pin_memory: bool = False,
    device: torch.device | str = "cpu",
    on_device: bool | None = None,
):
    """Yield ``(cell position, uint8 NHWC batch on device, labels)`` over every image of ``sets`` in order, loaded
    by ``jobs`` DataLoader workers (0: in this process), pinned for a fast copy to CUDA when asked.

    With ``on_device`` (default: when ``device`` is CUDA) JPEG files are decoded and on-the-fly corruptions with a
    torch path are applied on ``device`` rather than in the workers (see :meth:`ImageSet.stage`).

    Example:
        >>> from bnadapt.data import ArrayImages
        >>> s = ArrayImages(np.zeros((5, 32, 32, 3), np.uint8), np.arange(5))
        >>> [(k, tuple(x.shape)) for k, x, _ in iter_batches_of([s], 4)]
        [(0, (4, 32, 32, 3)), (0, (1, 32, 32, 3))]
    """
    device = torch.device(device)
    on_device = device.type == "cuda" if on_device is None else on_device
    chunks = _Chunks(sets, batch_size, on_device)
    loader = torch.utils.data.DataLoader(
        chunks,
        batch_size=None,
        shuffle=False,
        num_workers=jobs,
        pin_memory=pin_memory,
        prefetch_factor=2 if jobs else None,
    )

    def finished():
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
