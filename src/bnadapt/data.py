"""Reading images from disk and turning them into the tensors models take.

On disk and between modules images are uint8 NHWC (RGB or grey); models take float32 NCHW in [0, 1].
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "as_uint8_nhwc",
    "to_float_nchw",
    "read_images",
    "follow_outside_links",
    "list_image_files",
    "ArrayImages",
    "BenchData",
    "CorruptedImages",
    "DataSpec",
    "FileImages",
    "ImageSet",
    "iter_batches_of",
    "open_clean",
    "open_data",
    "parse_data_spec",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def as_uint8_nhwc(images, what: str = "images") -> np.ndarray:
    """Check that ``images`` are uint8 (N, H, W, C) or (H, W, C) with C in (1, 3) and return them as an NHWC array.

    Example:
        >>> as_uint8_nhwc(np.zeros((32, 32, 3), np.uint8)).shape
        (1, 32, 32, 3)
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    x = np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"expected uint8 {what} (values 0..255, channels last), got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            f"expected {what} of shape (N, H, W, C) or (H, W, C) with C = 1 or 3 channels last, got shape {x.shape}"
        )
    return x


def to_float_nchw(images) -> torch.Tensor:
    """Convert images to the float32 NCHW [0, 1] tensor every bnadapt model takes.

    uint8 input (numpy or torch) must be channels-last, (N, H, W, C) or (H, W, C), and is divided by 255. Floating
    input must already be NCHW; it is checked for NaN/inf and passed through as float32.

    Example:
        >>> to_float_nchw(np.full((2, 4, 4, 3), 255, np.uint8)).shape
        torch.Size([2, 3, 4, 4])
    """
    if isinstance(images, np.ndarray) and images.dtype.kind == "f":
        images = torch.from_numpy(images)
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim != 4:
            raise ValueError(f"expected float images as (N, C, H, W), got shape {tuple(images.shape)}")
        if not torch.isfinite(images).all():
            raise ValueError("expected finite float images, got NaN or inf values; clean the input first")
        return images.float()
    x = as_uint8_nhwc(images)
    # Memory-mapped or read-only arrays are copied once here rather than shared with a tensor.
    x = np.ascontiguousarray(x) if x.flags.writeable else np.array(x)
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)


_OUTSIDE_LINKS: ContextVar[bool] = ContextVar("bnadapt_outside_links", default=False)


@contextmanager
def follow_outside_links(allow: bool = True) -> Iterator[None]:
    """Within this block, folder readers follow symlinks that point outside the input folder (``--follow-links``).

    Example:
        >>> with follow_outside_links():
        ...     files = list_image_files(Path("."))
    """
    token = _OUTSIDE_LINKS.set(allow)
    try:
        yield
    finally:
        _OUTSIDE_LINKS.reset(token)


def list_image_files(root: Path, allow_outside_links: bool | None = None) -> list[Path]:
    """Image files under ``root`` (recursive, sorted); symlinks pointing outside ``root`` are skipped with a warning
    unless ``allow_outside_links`` (default: as set by :func:`follow_outside_links`, else no)."""
    if allow_outside_links is None:
        allow_outside_links = _OUTSIDE_LINKS.get()
    root = root.resolve()
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        here = Path(dirpath)
        if not allow_outside_links and not here.resolve().is_relative_to(root):
            log.warning("skipping %s: it links outside the input folder %s (--follow-links to read it)", here, root)
            dirnames.clear()
            continue
        for name in sorted(filenames):
            p = here / name
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not allow_outside_links and not p.resolve().is_relative_to(root):
                log.warning("skipping %s: it links outside the input folder %s (--follow-links to read it)", p, root)
                continue
            files.append(p)
    return files


def _decode(path: Path, channels: int = 3) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB" if channels == 3 else "L")).reshape(im.height, im.width, channels)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"expected a readable image file, got an unreadable one: {path} ({e})") from e


def read_images(path: str | os.PathLike[str], limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Read images and optional labels from an .npz (``x`` and ``y``), an .npy, or an image folder.

    In a folder, images directly inside sub-folders get labels from the sub-folder names (their sorted position,
    ImageFolder style, or the names themselves when all are integers, as `bnadapt corrupt` writes them);
    otherwise labels are None. All images must have the same size.

    Returns:
        ``(x, y)``: uint8 (N, H, W, C) images and int64 labels or None.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "a.npz"
        >>> np.savez(f, x=np.zeros((3, 8, 8, 3), np.uint8), y=np.arange(3))
        >>> [a.shape for a in read_images(f)]
        [(3, 8, 8, 3), (3,)]
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"expected an image folder, .npz or .npy at {path}, found nothing there")
    if path.is_dir():
        return _read_folder(path, limit)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        x, y = _load_npy(path), None
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                x = z["x"] if "x" in keys else (z[keys[0]] if len(keys) == 1 else None)
                y = z["y"] if "y" in keys else None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise ValueError(f"expected a readable numpy file, got a damaged one: {path} ({_numpy_reason(e)})") from e
        if x is None:
            raise ValueError(f"expected an .npz with an 'x' array (and optional 'y'), got keys {keys} in {path}")
    else:
        raise ValueError(f"expected an image folder, .npz or .npy, got {path.name}")
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"expected at least one image in {path}, got an array of shape {x.shape}")
    if limit is not None:
        x = x[:limit]
        y = None if y is None else y[:limit]
    x = as_uint8_nhwc(np.asarray(x), what=f"images in {path.name}")
    if y is not None:
        y = np.asarray(y)
        if y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise ValueError(
                f"expected integer labels 'y' of shape ({len(x)},) in {path.name}, got {y.dtype} {y.shape}"
            )
        y = y.astype(np.int64)
    return x, y


def _numpy_reason(e: Exception) -> str:
    """Why numpy could not load a file, without its advice to unpickle (object arrays are never loaded here)."""
    if "pickle" in str(e) or "object" in str(e).lower():
        return "it holds Python objects (pickled data), which bnadapt never loads"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _load_npy(path: Path) -> np.ndarray:
    """An .npy file memory-mapped read-only, never unpickled; a damaged file is a ValueError naming it."""
    try:
        x = np.load(path, allow_pickle=False, mmap_mode="r")
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ValueError(f"expected a readable numpy file, got a damaged one: {path} ({_numpy_reason(e)})") from e
    if not isinstance(x, np.ndarray):  # np.load opens an .npz archive whatever its name
        x.close()
        raise ValueError(f"expected one array in the .npy file {path}, got an .npz archive; name it .npz")
    if x.ndim == 0:
        raise ValueError(f"expected an array in the numpy file {path}, got a single value")
    return x


def _read_folder(root: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    files = list_image_files(root)
    if not files:
        raise ValueError(f"expected image files ({', '.join(IMAGE_SUFFIXES)}) in {root}, found none")
    files = files[:limit] if limit is not None else files
    rels = [f.relative_to(root.resolve()) for f in files]
    by_class = all(len(r.parts) == 2 for r in rels)
    label = _class_labels(sorted({r.parts[0] for r in rels})) if by_class else {}
    y = np.array([label[r.parts[0]] for r in rels], np.int64) if by_class else None
    # FileImages decodes and checks that every image has the same size, as the benchmark's readers do.
    images = FileImages(files, np.zeros(len(files), np.int64), name=str(root))
    return images.get(np.arange(len(files))), y


# --- Benchmark data: cells of (corruption, severity), readers for the released layouts, on-the-fly corruption ---

CLEAN = "clean"  # the corruption name of the clean cell; its severity is 0
DATA_KINDS = ("cifar-c", "imagenet-c", "folder", "npz", "generate")
Cell = tuple[str, int]


class ImageSet:
    """One benchmark cell: uint8 (H, W, C) images with int64 ``labels``, read by index on demand.

    Subclasses implement :meth:`get`; a dataset's images are never all loaded at once unless it is that small.
    """

    labels: np.ndarray
    name: str = "images"

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, indices: np.ndarray) -> np.ndarray:
        """The images at ``indices`` (sorted dataset positions) as one uint8 (k, H, W, C) array."""
        raise NotImplementedError


class ArrayImages(ImageSet):
    """Images held in an array, or a memory-mapped block of one (only the rows asked for are read).

    Example:
        >>> s = ArrayImages(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4))
        >>> s.get(np.array([1, 2])).shape
        (2, 32, 32, 3)
    """

    def __init__(self, x: np.ndarray, labels: np.ndarray, name: str = "images") -> None:
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"expected uint8 (N, H, W, C) images in {name}, got {x.dtype} {x.shape}")
        if len(labels) != len(x):
            raise ValueError(f"expected {len(x)} labels for the {len(x)} images of {name}, got {len(labels)}")
        self.x, self.labels, self.name = x, np.asarray(labels, np.int64), name

    def get(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, np.int64)
        if len(indices) and indices[-1] - indices[0] + 1 == len(indices):  # a run: one slice read from the map
            return np.array(self.x[indices[0] : indices[-1] + 1])
        return np.array(self.x[indices])


class FileImages(ImageSet):
    """Images in files, decoded when asked for; every image of a cell must have the same size."""

    def __init__(self, files: list[Path], labels: np.ndarray, name: str = "images") -> None:
        self.files, self.labels, self.name = list(files), np.asarray(labels, np.int64), name

    def get(self, indices: np.ndarray) -> np.ndarray:
        images = [_decode(self.files[int(i)]) for i in indices]
        for i, im in zip(indices, images, strict=True):
            if im.shape != images[0].shape:
                raise ValueError(
                    f"expected all images of {self.name} to be {images[0].shape[1]}x{images[0].shape[0]}, got "
                    f"{im.shape[1]}x{im.shape[0]} in {self.files[int(i)]}; resize them to one size first"
                )
        return np.stack(images)


class CorruptedImages(ImageSet):
    """A clean set corrupted on the fly by :func:`bnadapt.corrupt`; each image is keyed by its own index, so any
    batching (and any worker) gives the same bytes."""

    def __init__(self, base: ImageSet, corruption: str, severity: int, profile: str, seed: int) -> None:
        self.base, self.corruption, self.severity, self.profile, self.seed = base, corruption, severity, profile, seed
        self.labels, self.name = base.labels, f"{corruption}:{severity}"

    def get(self, indices: np.ndarray) -> np.ndarray:
        from .corruptions import corrupt

        indices = np.asarray(indices, np.int64)
        x = self.base.get(indices)
        return corrupt(x, self.corruption, self.severity, self.profile, self.seed, indices=indices.tolist())


class IndexedImages(ImageSet):
    """The images of ``base`` at the sorted positions ``index`` (a subset that keeps the dataset's order).

    Example:
        >>> s = IndexedImages(ArrayImages(np.zeros((10, 32, 32, 3), np.uint8), np.arange(10)), np.array([0, 5]))
        >>> len(s), s.labels.tolist()
        (2, [0, 5])
    """

    def __init__(self, base: ImageSet, index: np.ndarray) -> None:
        self.base, self.index = base, np.asarray(index, np.int64)
        self.labels, self.name = base.labels[self.index], base.name

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.base.get(self.index[np.asarray(indices, np.int64)])


def spread_indices(total: int, limit: int) -> np.ndarray:
    """``limit`` positions spread evenly over ``range(total)`` (all of them when ``limit >= total``).

    Evenly spread, not the first ``limit``: released sets are often sorted by class.

    Example:
        >>> spread_indices(10, 4).tolist()
        [0, 2, 5, 7]
    """
    if limit >= total:
        return np.arange(total, dtype=np.int64)
    return (np.arange(limit, dtype=np.int64) * total) // limit


def _class_labels(names: list[str]) -> dict[str, int]:
    """Class folder name -> label: the integer itself when every name is one (folders written from labels), else
    the position in sorted order (ImageNet wnids)."""
    if names and all(n.isdigit() for n in names):
        return {n: int(n) for n in names}
    return {n: i for i, n in enumerate(sorted(names))}


def _class_folder(root: Path) -> FileImages:
    files = list_image_files(root)
    if not files:
        raise ValueError(f"expected image files in class sub-folders of {root}, found none")
    rels = [f.relative_to(root.resolve()) for f in files]
    if not all(len(r.parts) == 2 for r in rels):
        raise ValueError(f"expected images inside class sub-folders (<class>/<file>) of {root}, got {rels[0]}")
    label = _class_labels(sorted({r.parts[0] for r in rels}))
    return FileImages(files, np.array([label[r.parts[0]] for r in rels], np.int64), name=str(root))


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: ``kind`` (one of :data:`DATA_KINDS`), ``path``, and the ``generate`` profile."""

    kind: str
    path: Path
    profile: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.profile}:{self.path}" if self.profile else f"{self.kind}:{self.path}"


def parse_data_spec(spec: str) -> DataSpec:
    """Parse ``cifar-c:DIR``, ``imagenet-c:DIR``, ``folder:DIR``, ``npz:FILE`` or ``generate:<profile>:<npz|DIR>``.

    Example:
        >>> parse_data_spec("generate:cifar:test.npz")
        DataSpec(kind='generate', path=PosixPath('test.npz'), profile='cifar')
    """
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in DATA_KINDS or not rest:
        raise ValueError(
            f"expected --data as cifar-c:DIR, imagenet-c:DIR, folder:DIR, npz:FILE or generate:<profile>:<npz|DIR>, "
            f"got {spec!r}"
        )
    if kind != "generate":
        return DataSpec(kind, Path(rest))
    profile, sep, path = rest.partition(":")
    if not sep or profile not in ("cifar", "imagenet") or not path:
        raise ValueError(f"expected generate:<cifar|imagenet>:<npz file or folder>, got {spec!r}")
    return DataSpec(kind, Path(path), profile)


def open_clean(path: str | os.PathLike[str]) -> ImageSet:
    """A labelled clean set from an .npz (``x``, ``y``) or a class folder (``<class>/<image>``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"expected an .npz or a class folder at {path}, found nothing there")
    if path.is_dir():
        return _class_folder(path)
    x, y = read_images(path)
    if y is None:
        raise ValueError(f"expected labels 'y' in {path.name} to measure accuracy, got images only")
    return ArrayImages(x, y, name=path.name)


class BenchData:
    """The cells a benchmark runs: ``cells`` in canonical order (the clean cell first when there is one),
    ``missing`` names the requested cells the data does not have, and :meth:`cell` opens one.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "c.npz"
        >>> np.savez(f, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
        >>> open_data(f"generate:cifar:{f}", ["contrast"], [1, 5]).cells
        [('clean', 0), ('contrast', 1), ('contrast', 5)]
    """

    def __init__(self, spec: DataSpec, cells: list[Cell], missing: list[str], opener, seed: int = 0) -> None:
        self.spec, self.cells, self.missing, self._open, self.seed = spec, cells, missing, opener, seed
        self.limit: int | None = None  # images per cell, spread evenly over it (--limit-per-cell)
        self._cache: dict[Cell, ImageSet] = {}

    def cell(self, corruption: str, severity: int) -> ImageSet:
        key = (corruption, int(severity))
        if key not in self._cache:
            s = self._open(*key)
            if self.limit is not None and len(s) > self.limit:
                s = IndexedImages(s, spread_indices(len(s), self.limit))
            self._cache[key] = s
        return self._cache[key]


def open_data(
    spec: str | DataSpec,
    corruptions: list[str] | None = None,
    severities: list[int] | tuple[int, ...] = (1, 2, 3, 4, 5),
    allow_partial: bool = False,
    seed: int = 0,
    clean: str | os.PathLike[str] | None = None,
    limit: int | None = None,
) -> BenchData:
    """Open a ``--data`` source for a benchmark over ``corruptions`` (default all 19) x ``severities``.

    ``folder:``/``npz:`` data is one clean cell; ``generate`` adds the clean cell of its input. Cells the data lacks
    raise a ValueError naming them, unless ``allow_partial`` (then they are listed in ``missing`` and skipped).
    ``seed`` is the corruption seed of ``generate``; ``clean``: an .npz or class folder to add as the clean cell
    (for ``cifar-c``/``imagenet-c`` data, which holds no clean images); ``limit``: at most this many images per
    cell, spread evenly over it (:func:`spread_indices`).
    """
    from .corruptions import GROUPS

    spec = parse_data_spec(spec) if isinstance(spec, str) else spec
    names = list(corruptions) if corruptions is not None else list(GROUPS["all"])
    unknown = [c for c in names if c not in GROUPS["all"]]
    if unknown:
        raise ValueError(f"expected corruption names, one of {', '.join(GROUPS['all'])}; got {unknown[0]!r}")
    sev = [int(s) for s in severities]
    if limit is not None and limit < 1:
        raise ValueError(f"expected --limit-per-cell >= 1, got {limit}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"expected a non-negative integer --corrupt-seed, got {seed!r}")
    if clean is not None and not Path(clean).exists():
        raise FileNotFoundError(f"expected a clean .npz or class folder for --clean at {clean}, found nothing there")
    if not spec.path.exists():
        raise FileNotFoundError(f"expected {spec.kind} data at {spec.path}, found nothing there")
    if spec.kind in ("folder", "npz"):
        base = open_clean(spec.path)
        data = BenchData(spec, [(CLEAN, 0)], [], lambda c, s: base)
        data.limit = limit
        return data
    if spec.kind == "generate":
        base = open_clean(spec.path)
        cells = [(c, s) for c in names for s in sev]

        def opener(c: str, s: int) -> ImageSet:
            return base if c == CLEAN else CorruptedImages(base, c, s, spec.profile or "cifar", seed)

        data = BenchData(spec, [(CLEAN, 0), *cells], [], opener, seed)
    elif spec.kind == "cifar-c":
        data = _open_cifar_c(spec, names, sev)
    else:
        data = _open_imagenet_c(spec, names, sev)
    if data.missing and not allow_partial:
        raise ValueError(
            f"expected every requested corruption/severity in {spec.path}, but it lacks {', '.join(data.missing)}; "
            "pass --allow-partial to run what exists, or narrow --corruptions/--severities"
        )
    for m in data.missing:
        log.warning("skipping %s: not in %s", m, spec.path)
    if clean is not None and data.cells[0] != (CLEAN, 0):
        clean_set, corrupted = open_clean(clean), data._open
        data._open = lambda c, s: clean_set if c == CLEAN else corrupted(c, s)
        data.cells.insert(0, (CLEAN, 0))
    if not [c for c in data.cells if c[0] != CLEAN]:
        raise ValueError(f"expected at least one corruption/severity cell in {spec.path}, found none of those asked")
    data.limit = limit
    return data


def _open_cifar_c(spec: DataSpec, names: list[str], sev: list[int]) -> BenchData:
    root = spec.path
    labels_path = root / "labels.npy"
    if not labels_path.is_file():
        raise FileNotFoundError(f"expected labels.npy in the CIFAR-C folder {root}, found none")
    labels = _load_npy(labels_path)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or not len(labels):
        raise ValueError(
            f"expected labels.npy in {root} to hold integer class labels of shape (N,), got {labels.dtype} "
            f"{labels.shape}; it must come from a CIFAR-C export"
        )
    blocks = _cifar_c_severities(root)
    if len(labels) % len(blocks):
        raise ValueError(
            f"expected labels.npy to hold {len(blocks)} severity blocks of equal size, got {len(labels)} labels"
        )
    size = len(labels) // len(blocks)
    missing = [f"{c}.npy" for c in names if not (root / f"{c}.npy").is_file()]
    missing += [f"severity {s}" for s in sev if s not in blocks]
    cells = [(c, s) for c in names if (root / f"{c}.npy").is_file() for s in sev if s in blocks]

    def opener(c: str, s: int) -> ImageSet:
        x = _load_npy(root / f"{c}.npy")
        if len(x) != len(labels):
            raise ValueError(
                f"expected {c}.npy to have as many images as labels.npy has labels ({len(labels)}), got {len(x)}; "
                "the folder mixes files of different exports"
            )
        k = blocks.index(s)
        block = slice(k * size, (k + 1) * size)
        return ArrayImages(x[block], np.array(labels[block]), name=f"{c}:{s}")

    return BenchData(spec, cells, missing, opener)


def _cifar_c_severities(root: Path) -> list[int]:
    """Severities stacked in the .npy files: the export manifest's list when there is one, else the released 1..5."""
    manifest = root / "bnadapt-corrupt.json"
    if manifest.is_file():
        import json

        try:
            return [int(s) for s in json.loads(manifest.read_text())["severities"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"expected a readable export manifest at {manifest}, got a damaged one ({e})") from e
    return [1, 2, 3, 4, 5]


def _open_imagenet_c(spec: DataSpec, names: list[str], sev: list[int]) -> BenchData:
    root = spec.path
    cells, missing = [], []
    for c in names:
        if not (root / c).is_dir():
            missing.append(c)
            continue
        for s in sev:
            if (root / c / str(s)).is_dir():
                cells.append((c, s))
            else:
                missing.append(f"{c}/{s}")

    def opener(c: str, s: int) -> ImageSet:
        images = _class_folder(root / c / str(s))
        images.name = f"{c}:{s}"
        return images

    return BenchData(spec, cells, missing, opener)


class _Chunks(torch.utils.data.Dataset):
    """Item k = batch k of a list of cells: (cell position, uint8 NHWC tensor, int64 labels)."""

    def __init__(self, sets: list[ImageSet], batch_size: int) -> None:
        self.sets = sets
        self.index = [
            (k, a, min(a + batch_size, len(s))) for k, s in enumerate(sets) for a in range(0, len(s), batch_size)
        ]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        k, a, b = self.index[i]
        idx = np.arange(a, b)
        x = np.ascontiguousarray(self.sets[k].get(idx))
        return k, torch.from_numpy(x), torch.from_numpy(np.array(self.sets[k].labels[a:b], np.int64))


def iter_batches_of(sets: list[ImageSet], batch_size: int, jobs: int = 0, pin_memory: bool = False):
    """Yield ``(cell position, uint8 NHWC batch, labels)`` over every image of ``sets`` in order, loaded by ``jobs``
    DataLoader workers (0: in this process), pinned for a fast copy to CUDA when asked.

    Example:
        >>> s = ArrayImages(np.zeros((5, 32, 32, 3), np.uint8), np.arange(5))
        >>> [(k, tuple(x.shape)) for k, x, _ in iter_batches_of([s], 4)]
        [(0, (4, 32, 32, 3)), (0, (1, 32, 32, 3))]
    """
    chunks = _Chunks(sets, batch_size)
    loader = torch.utils.data.DataLoader(
        chunks, batch_size=None, shuffle=False, num_workers=jobs, pin_memory=pin_memory,
        prefetch_factor=2 if jobs else None,
    )  # fmt: skip
    try:
        yield from loader
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
