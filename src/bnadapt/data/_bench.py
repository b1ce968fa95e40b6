"""Benchmark data: the (corruption, severity) cells of a ``--data`` source, from released layouts or on the fly."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ._cache import prepared_images
from ._images import Preprocess, load_npy
from ._sets import (
    RELEASE_JPEG_QUALITY,
    ArrayImages,
    CorruptedImages,
    FileImages,
    ImageSet,
    IndexedImages,
    class_folder,
    open_clean,
    spread_indices,
)

log = logging.getLogger(__name__)


CLEAN = "clean"  # the corruption name of the clean cell; its severity is 0


DATA_KINDS = ("cifar-c", "imagenet-c", "folder", "npz", "generate")


class Cell(NamedTuple):
    """One benchmark cell: a corruption and its severity 1..5, or ``("clean", 0)``; equal to the plain tuple.

    Written ``fog:3`` or ``clean`` (:meth:`parse` reads that back).

    Example:
        >>> cell = Cell.parse("fog:3")
        >>> cell, str(cell), Cell.parse("clean") == ("clean", 0)
        (Cell(corruption='fog', severity=3), 'fog:3', True)
    """

    corruption: str
    severity: int

    def __str__(self) -> str:
        return CLEAN if self.corruption == CLEAN else f"{self.corruption}:{self.severity}"

    @classmethod
    def parse(cls, text: str) -> Cell:
        """``"gaussian_noise:5"`` -> Cell("gaussian_noise", 5); ``"clean"`` -> Cell("clean", 0)."""
        if text == CLEAN:
            return cls(CLEAN, 0)
        name, sep, sev = text.partition(":")
        if not sep or not name or not sev.isdigit() or not 1 <= int(sev) <= 5:
            raise ValueError(f"expected a cell as <corruption>:<severity 1..5> (e.g. fog:3) or clean, got {text!r}")
        return cls(name, int(sev))


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


class BenchData:
    """The cells a benchmark runs: ``cells`` in canonical order (the clean cell first when there is one),
    ``missing`` names the requested cells the data does not have, and :meth:`cell` opens one.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "c.npz"
        >>> np.savez(f, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
        >>> [str(cell) for cell in open_data(f"generate:cifar:{f}", ["contrast"], [1, 5]).cells]
        ['clean', 'contrast:1', 'contrast:5']
    """

    def __init__(self, spec: DataSpec, cells: list[Cell], missing: list[str], opener, seed: int = 0) -> None:
        self.spec, self.missing, self._open, self.seed = spec, missing, opener, seed
        self.cells = [Cell(*c) for c in cells]
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
    release_jpeg: bool = False,
    preprocess: Preprocess | Mapping[str, Preprocess | None] | None = None,
    cache: str | os.PathLike[str] | None = None,
    jobs: int = 0,
) -> BenchData:
    """Open a ``--data`` source for a benchmark over ``corruptions`` (default all 19) x ``severities``.

    ``folder:``/``npz:`` data is one clean cell; ``generate`` adds the clean cell of its input. Cells the data lacks
    raise a ValueError naming them, unless ``allow_partial`` (then they are listed in ``missing`` and skipped).
    ``seed`` is the corruption seed of ``generate``; ``clean``: an .npz or class folder to add as the clean cell
    (for ``cifar-c``/``imagenet-c`` data, which holds no clean images); ``limit``: at most this many images per
    cell, spread evenly over it (:func:`spread_indices`); ``release_jpeg``: ``generate`` only, a JPEG quality-85
    round trip after each corruption, as ImageNet-C's released files had.

    Image folders for the ImageNet profile (``generate:imagenet:DIR``, and ``--clean`` of ``imagenet-c`` data) are
    resized to 256 and centre-cropped to 224, as ImageNet-C was made; released ``imagenet-c`` files are read as they
    are, centre-cropped to 224 only when larger. ``preprocess``, the models' own (:class:`Preprocess`, or one per
    model name, which must agree), brings ``folder:``/``npz:`` data and ``cifar-c``'s ``--clean`` to their input size.

    ``cache``: a folder where ``generate:``'s clean image folder is prepared once, by ``jobs`` workers, for every
    cell to read (:func:`prepared_images`); None decodes each image in every cell.
    """
    from ..corruptions import GROUPS

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
    if release_jpeg and spec.kind != "generate":
        raise ValueError(f"expected --release-jpeg with generate: data only, got {spec.kind}: data (already files)")
    imagenet = spec.profile == "imagenet" or spec.kind == "imagenet-c"
    prepare = "resize256-crop224" if imagenet else None
    if spec.kind in ("folder", "npz"):
        base = open_clean(spec.path, _one_preprocess(preprocess, f"{spec.kind}: data"))
        data = BenchData(spec, [(CLEAN, 0)], [], lambda c, s: base)
        data.limit = limit
        return data
    if spec.kind == "generate":
        data = _generated(spec, prepare, [(c, s) for c in names for s in sev], seed, release_jpeg, cache, limit, jobs)
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
        clean_prep = prepare if imagenet else _one_preprocess(preprocess, "--clean images")
        clean_set, corrupted = open_clean(clean, clean_prep), data._open
        data._open = lambda c, s: clean_set if c == CLEAN else corrupted(c, s)
        data.cells.insert(0, Cell(CLEAN, 0))
    if not [c for c in data.cells if c[0] != CLEAN]:
        raise ValueError(f"expected at least one corruption/severity cell in {spec.path}, found none of those asked")
    data.limit = limit
    return data


def _generated(spec: DataSpec, prepare, cells: list, seed: int, release_jpeg: bool, cache, limit, jobs: int):
    """The clean cell of ``spec``'s images and ``cells`` corrupted on the fly (after each, a JPEG round trip if asked);
    a clean image folder read from the prepared cache in ``cache`` (built once), with the positions ``limit`` keeps."""
    base = open_clean(spec.path, prepare)
    if cache is not None and isinstance(base, FileImages):
        base = prepared_images(base, cache, None if limit is None else spread_indices(len(base), limit), jobs)
    quality = RELEASE_JPEG_QUALITY if release_jpeg else None

    def opener(c: str, s: int) -> ImageSet:
        return base if c == CLEAN else CorruptedImages(base, c, s, spec.profile or "cifar", seed, quality)

    return BenchData(spec, [(CLEAN, 0), *cells], [], opener, seed)


def _one_preprocess(preprocess: Preprocess | Mapping[str, Preprocess | None] | None, what: str) -> Preprocess | None:
    """The one preprocessing that prepares ``what`` for every model, or a ValueError naming the models that differ."""
    if preprocess is None or isinstance(preprocess, Preprocess):
        return preprocess
    distinct = set(preprocess.values())
    if len(distinct) <= 1:
        return next(iter(distinct), None)
    each = "; ".join(f"{name}: {p or 'as they are'}" for name, p in preprocess.items())
    raise ValueError(
        f"expected models that prepare {what} alike, got {each}; run them separately, or make them agree with "
        "--img-size/--crop-pct/--interpolation"
    )


def _open_cifar_c(spec: DataSpec, names: list[str], sev: list[int]) -> BenchData:
    root = spec.path
    labels_path = root / "labels.npy"
    if not labels_path.is_file():
        raise FileNotFoundError(f"expected labels.npy in the CIFAR-C folder {root}, found none")
    labels = load_npy(labels_path)
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
        x = load_npy(root / f"{c}.npy")
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
        images = class_folder(root / c / str(s), prepare="crop224")
        images.name = f"{c}:{s}"
        return images

    return BenchData(spec, cells, missing, opener)
