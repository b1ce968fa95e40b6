"""The prepared cache: a clean image folder decoded and resized once into a memory-mapped uint8 .npy, which every
cell of a ``generate:`` run then reads instead of decoding each JPEG again (ImageNet-C's resize 256 + crop 224 was
55-60% of the CPU cost per image when every one of the 76 cells did it).

One file per input: ``<cache>/prepared/prepared-<key>.npy``, where the key is a hash of the file list (paths, sizes,
modification times), the positions kept, the preparation and the decoder's versions, so a changed, added or removed
file makes a new cache. It is written under a temporary name and renamed when complete (a killed build leaves no half
cache under the final name), and built under a file lock, so that the ranks of a torchrun launch build it once.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_path
from ._images import load_npy
from ._sets import ArrayImages, FileImages, ImageSet

log = logging.getLogger(__name__)

_FORMAT = 1  # bump when what a cache file holds changes, so that older files are not read
_CHUNK = 64  # images per decoding task while building


def cache_dir() -> Path:
    """Where bnadapt keeps what it can rebuild: ``$BNADAPT_CACHE``, else ``$XDG_CACHE_HOME/bnadapt``, else
    ``~/.cache/bnadapt``.

    Example:
        >>> cache_dir().name
        'bnadapt'
    """
    if os.environ.get("BNADAPT_CACHE"):
        return Path(os.environ["BNADAPT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bnadapt"


class CachedImages(ImageSet):
    """The images of a :class:`FileImages` at ``positions`` (sorted), read from a prepared .npy memory map; other
    positions are not held. ``labels`` and length are the folder's, so indices mean what they meant there.

    Pickled by path: a DataLoader worker opens the map again rather than receiving a copy of it.
    """

    def __init__(self, path: Path, positions: np.ndarray, labels: np.ndarray, name: str) -> None:
        self.path, self.positions, self.labels, self.name = Path(path), positions, labels, name
        self._dense = len(positions) == len(labels)  # every position held: index i is row i
        self._open()

    def _open(self) -> None:
        x = load_npy(self.path)
        if x.dtype != np.uint8 or x.ndim != 4 or len(x) != len(self.positions):
            raise ValueError(
                f"expected {len(self.positions)} uint8 (N, H, W, C) images in the prepared cache {self.path}, got "
                f"{x.dtype} {x.shape}; delete the file to rebuild it"
            )
        self._rows = ArrayImages(x, self.labels[self.positions], name=self.name)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_rows"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def get(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        if self._dense:
            return self._rows.get(indices)
        rows = np.searchsorted(self.positions, indices)
        held = rows < len(self.positions)
        if not held.all() or not (self.positions[rows] == indices).all():
            raise ValueError(f"expected positions held in the prepared cache {self.path}, got {indices.tolist()}")
        return self._rows.get(rows)


def prepared_images(
    base: FileImages, folder: str | os.PathLike[str], positions: np.ndarray | None = None, jobs: int = 0
) -> CachedImages:
    """``base``'s images at ``positions`` (default: all), decoded and prepared once into ``folder``/prepared, or read
    from there when an earlier run left them for exactly these files; built by ``jobs`` DataLoader workers.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> d = Path(tempfile.mkdtemp())
        >>> (d / "3").mkdir()
        >>> Image.new("RGB", (300, 260)).save(d / "3" / "a.png")
        >>> from bnadapt.data import open_clean
        >>> s = prepared_images(open_clean(d, "resize256-crop224"), d / "cache")
        >>> s.get(np.array([0])).shape, s.path.parent.name
        ((1, 224, 224, 3), 'prepared')
    """
    positions = np.arange(len(base), dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
    if len(positions) and ((np.diff(positions) <= 0).any() or positions[0] < 0 or positions[-1] >= len(base)):
        raise ValueError(f"expected sorted distinct positions in 0..{len(base) - 1}, got {positions.tolist()[:8]}")
    root = Path(folder) / "prepared"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"expected a writable cache folder at {root}, got {e}; pass another --cache-dir") from e
    path = root / f"prepared-{_key(base, positions)}.npy"
    with _locked(path.with_suffix(".lock")):
        if path.is_file():
            try:
                return CachedImages(path, positions, base.labels, base.name)
            except ValueError as e:  # unreadable: a disk error, or a file put there by hand
                log.warning("rebuilding the prepared cache %s: %s", path, e)
        _remove_leftovers(path)
        log.info("preparing %d images of %s once, into %s", len(positions), base.name, path)
        _build(base, positions, path, jobs)
    return CachedImages(path, positions, base.labels, base.name)


def _key(base: FileImages, positions: np.ndarray) -> str:
    """A hash of everything the prepared bytes depend on: files (path, size, mtime), positions, preparation, decoder."""
    import PIL
    import torchvision

    h = hashlib.sha256()
    h.update(repr((_FORMAT, str(base.prepare), PIL.__version__, torchvision.__version__, len(base))).encode())
    h.update(positions.tobytes())
    for i in positions.tolist():
        f = base.files[i]
        st = f.stat()
        h.update(f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (the other ranks wait here while one builds); no lock where fcntl is not."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builds are then only wasted work, each renamed whole
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(path: Path) -> None:
    """Temporary files of builds of this cache that were killed (holding the lock, no one else is building it)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()


class _Decode(torch.utils.data.Dataset):
    """Item j: the prepared images of chunk j of the positions."""

    def __init__(self, base: ImageSet, positions: np.ndarray) -> None:
        self.base, self.positions = base, positions

    def __len__(self) -> int:
        return -(-len(self.positions) // _CHUNK)

    def __getitem__(self, j: int) -> np.ndarray:
        return self.base.get(self.positions[j * _CHUNK : (j + 1) * _CHUNK])


def _as_is(chunk: np.ndarray) -> np.ndarray:
    return chunk


def _build(base: FileImages, positions: np.ndarray, path: Path, jobs: int) -> None:
    loader = torch.utils.data.DataLoader(_Decode(base, positions), batch_size=None, num_workers=jobs, collate_fn=_as_is)
    with atomic_path(path) as tmp:
        out = None
        for j, chunk in enumerate(loader):
            if out is None:  # the first chunk gives the prepared size; FileImages checks that every image has it
                shape = (len(positions), *chunk.shape[1:])
                out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            if chunk.shape[1:] != out.shape[1:]:
                raise ValueError(
                    f"expected every prepared image of {base.name} to be {out.shape[2]}x{out.shape[1]}, got "
                    f"{chunk.shape[2]}x{chunk.shape[1]} near position {positions[j * _CHUNK]}"
                )
            out[j * _CHUNK : j * _CHUNK + len(chunk)] = chunk
        if out is None:
            raise ValueError(f"expected at least one image to prepare in {base.name}, got none")
        out.flush()
        del out
        with open(tmp, "rb+") as f:  # on disk before the rename makes it the cache
            os.fsync(f.fileno())
