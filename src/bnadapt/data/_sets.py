"""Image sets read by index on demand (arrays, files, corrupted on the fly, subsets) and the clean-set readers."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ._images import (
    IMAGE_SUFFIXES,
    NUMPY_FILE_ERRORS,
    PREPARE,
    ImageTooLargeError,
    Preprocess,
    as_uint8_nhwc,
    center_crop,
    decode_image,
    list_image_files,
    load_npy,
    numpy_reason,
    open_image,
    outside_links_followed,
)

log = logging.getLogger(__name__)


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

    # Loading in two steps, so that a DataLoader worker does the CPU part (stage) and the main process the part that
    # belongs on the GPU (finish): JPEG decoding, on-the-fly corruption. By default all work is done in stage().
    def stage(self, indices: np.ndarray, on_device: bool = False) -> object:
        """The worker's part of loading ``indices``; with ``on_device`` a set may leave work for :meth:`finish`."""
        return torch.from_numpy(np.ascontiguousarray(self.get(indices)))

    def finish(self, staged: object, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        """Complete :meth:`stage`'s work on ``device``: the images as a uint8 (k, H, W, C) tensor there."""
        assert isinstance(staged, torch.Tensor)
        return staged.to(device, non_blocking=True)

    def load(self, indices: np.ndarray, device: torch.device | str = "cpu", on_device: bool = False) -> torch.Tensor:
        """:meth:`stage` then :meth:`finish` in this process: the images at ``indices`` on ``device``.

        Example:
            >>> ArrayImages(np.zeros((4, 32, 32, 3), np.uint8), np.arange(4)).load(np.array([0, 1])).shape
            torch.Size([2, 32, 32, 3])
        """
        indices = np.asarray(indices, np.int64)
        return self.finish(self.stage(indices, on_device), indices, torch.device(device))

    def cpu_fallbacks(self) -> int:
        """How many files device decoding could not read and the CPU decoder read instead."""
        return 0


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
        # A run of consecutive positions is one slice read from the map. Checked step by step: a shuffled stream asks
        # for positions in any order, and first/last alone can span len(indices) without being that run.
        if len(indices) and (len(indices) == 1 or bool((np.diff(indices) == 1).all())):
            return np.array(self.x[indices[0] : indices[-1] + 1])
        return np.array(self.x[indices])


class FileImages(ImageSet):
    """Images in files, decoded when asked for and prepared as ``prepare`` says (one of :data:`PREPARE`, or a model's
    :class:`Preprocess`); every image of a cell must have the same size after that."""

    def __init__(
        self, files: list[Path], labels: np.ndarray, name: str = "images", prepare: str | Preprocess | None = None
    ) -> None:
        if not isinstance(prepare, Preprocess) and prepare not in PREPARE:
            raise ValueError(f"expected prepare to be one of {PREPARE} or a Preprocess, got {prepare!r}")
        self.files, self.labels, self.name, self.prepare = list(files), np.asarray(labels, np.int64), name, prepare
        self._fallbacks = 0

    def stage(self, indices: np.ndarray, on_device: bool = False) -> object:
        # Resizing stays with PIL (its antialiased resize defines ImageNet-C's images and timm's evaluation); cropping
        # is exact anywhere.
        jpegs = all(self.files[int(i)].suffix.lower() in (".jpg", ".jpeg") for i in indices)
        if not on_device or not jpegs or self.prepare not in (None, "crop224"):
            return super().stage(indices)
        encoded = [np.fromfile(self.files[int(i)], np.uint8) for i in indices]
        for data, i in zip(encoded, indices, strict=True):  # the device decoder has no decompression-bomb check
            _check_header(data, self.files[int(i)])
        return _Encoded([torch.from_numpy(data) for data in encoded])

    def finish(self, staged: object, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        if not isinstance(staged, _Encoded):
            return super().finish(staged, indices, device)
        try:
            images = _decode_jpegs(staged.data, device)
        except RuntimeError:  # one bad file fails the whole batch: decode one by one to find it
            images = []
            for data, i in zip(staged.data, indices, strict=True):
                try:
                    images.append(_decode_jpegs(data, device))
                except RuntimeError as e:
                    self._fallbacks += 1
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    log.warning(
                        "decoding %s on the CPU: the %s decoder refused it (%s)",
                        self.files[int(i)],
                        device.type,
                        reason,
                    )
                    im = decode_image(self.files[int(i)], prepare=self.prepare)
                    images.append(torch.from_numpy(np.array(im)).permute(2, 0, 1).to(device))
        images = [im.permute(1, 2, 0) for im in images]  # (H, W, C) views, as get() returns them
        if self.prepare == "crop224":
            images = [center_crop(im, 224) for im in images]
        self._check_same_size(indices, images)
        return torch.stack(images)

    def cpu_fallbacks(self) -> int:
        return self._fallbacks

    def get(self, indices: np.ndarray) -> np.ndarray:
        images = [decode_image(self.files[int(i)], prepare=self.prepare) for i in indices]
        self._check_same_size(indices, images)
        return np.stack(images)

    def _check_same_size(self, indices: np.ndarray, images: list) -> None:
        """Every (H, W, C) image of a batch must have the first one's size (arrays or tensors)."""
        for i, im in zip(indices, images, strict=True):
            if im.shape != images[0].shape:
                raise ValueError(
                    f"expected all images of {self.name} to be {images[0].shape[1]}x{images[0].shape[0]}, got "
                    f"{im.shape[1]}x{im.shape[0]} in {self.files[int(i)]}; resize them to one size first"
                )


class CorruptedImages(ImageSet):
    """A clean set corrupted on the fly by :func:`bnadapt.corrupt`; each image is keyed by its own index, so any
    batching (and any worker) gives the same bytes."""

    def __init__(
        self, base: ImageSet, corruption: str, severity: int, profile: str, seed: int, jpeg_quality: int | None = None
    ) -> None:
        self.base, self.corruption, self.severity, self.profile, self.seed = base, corruption, severity, profile, seed
        self.jpeg_quality = jpeg_quality  # a JPEG round trip after the corruption, as the released files had
        self.labels, self.name = base.labels, f"{corruption}:{severity}"

    def get(self, indices: np.ndarray) -> np.ndarray:
        from ..corruptions import corrupt

        indices = np.asarray(indices, np.int64)
        x = self.base.get(indices)
        x = corrupt(x, self.corruption, self.severity, self.profile, self.seed, indices=indices.tolist())
        return x if self.jpeg_quality is None else jpeg_roundtrip(x, self.jpeg_quality)

    def _on_device(self) -> bool:
        from ..corruptions import torch_corruption_names

        return self.corruption in torch_corruption_names()

    def stage(self, indices: np.ndarray, on_device: bool = False) -> object:
        if on_device and self._on_device():  # corrupt in finish(), on the device, with the engine's torch path
            return _Deferred(self.base.stage(indices, on_device))
        return super().stage(indices)

    def finish(self, staged: object, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        if not isinstance(staged, _Deferred):
            return super().finish(staged, indices, device)
        from ..corruptions import corrupt

        x = self.base.finish(staged.data, indices, device).contiguous()
        x = corrupt(
            x, self.corruption, self.severity, self.profile, self.seed, indices=indices.tolist(), backend="torch"
        )
        if self.jpeg_quality is not None:  # Pillow's encoder defines the released files: a CPU round trip
            x = torch.from_numpy(jpeg_roundtrip(x.cpu().numpy(), self.jpeg_quality)).to(device)
        return x

    def cpu_fallbacks(self) -> int:
        return self.base.cpu_fallbacks()


def _decode_jpegs(data, device: torch.device):
    """torchvision's JPEG decoder (nvJPEG on CUDA) on one encoded file or a list of them, as RGB (C, H, W)."""
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (for torchcodec's) but keeps them
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def _check_header(data: np.ndarray, name: Path) -> None:
    """Refuse an encoded image whose header announces too many pixels (:func:`open_image`); a damaged header is left
    to the decoder, whose CPU fallback names the file."""
    try:
        with open_image(io.BytesIO(data.tobytes()), name):
            pass
    except ImageTooLargeError:
        raise
    except (OSError, ValueError):
        pass


class _Encoded:
    """Encoded JPEG files (uint8 byte tensors) staged for decoding on the device."""

    def __init__(self, data: list[torch.Tensor]) -> None:
        self.data = data


class _Deferred:
    """A base set's staged images whose corruption is left to finish()."""

    def __init__(self, data: object) -> None:
        self.data = data


RELEASE_JPEG_QUALITY = 85  # ImageNet-C's files were saved by Pillow at quality 85


def jpeg_roundtrip(images: np.ndarray, quality: int = RELEASE_JPEG_QUALITY) -> np.ndarray:
    """Encode uint8 NHWC images as JPEG at ``quality`` (Pillow's defaults: 4:2:0, baseline) and decode them again.

    Example:
        >>> jpeg_roundtrip(np.full((1, 32, 32, 3), 200, np.uint8)).shape
        (1, 32, 32, 3)
    """
    from ..corruptions.digital import jpeg_compression

    return jpeg_compression(images, quality, [], "imagenet")


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

    def stage(self, indices: np.ndarray, on_device: bool = False) -> object:
        return self.base.stage(self.index[np.asarray(indices, np.int64)], on_device)

    def finish(self, staged: object, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        return self.base.finish(staged, self.index[np.asarray(indices, np.int64)], device)

    def cpu_fallbacks(self) -> int:
        return self.base.cpu_fallbacks()


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


MAX_LABEL = 2**31 - 1  # labels are stored as int64; a larger number is a typo, not a class
LIST_FILE = "dataset.txt"  # a folder's image list: lines "<relative path>, <label>" (or separated by spaces)


def _list_file(path: Path, prepare: str | Preprocess | None) -> FileImages:
    """The images a list file names, with their labels; paths are relative to the list file's folder."""
    root = path.parent.resolve()
    files, labels = [], []
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of the first path
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"expected a readable text list of '<image path>, <label>' lines at {path} ({e})") from e
    for k, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rel, _, label = line.replace(",", " ").strip().rpartition(" ")
        if not rel.strip() or not (label.isascii() and label.isdigit()):
            raise ValueError(f"expected '<image path>, <label>' on line {k} of {path}, got {line.strip()!r}")
        if int(label) > MAX_LABEL:
            raise ValueError(f"expected a class label 0..{MAX_LABEL} on line {k} of {path}, got {label}")
        f = (root / rel.strip()).resolve()
        if not outside_links_followed() and not f.is_relative_to(root):
            raise ValueError(
                f"expected image paths inside {root} in {path}, got {rel.strip()!r} on line {k}; pass "
                "--follow-links to read files outside it"
            )
        files.append(f)
        labels.append(int(label))
    if not files:
        raise ValueError(f"expected at least one '<image path>, <label>' line in {path}, found none")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(
            f"expected the {len(files)} images listed in {path}, but {len(missing)} are missing (first: {missing[0]})"
        )
    return FileImages(files, np.array(labels, np.int64), name=str(path.parent), prepare=prepare)


def class_folder(root: Path, prepare: str | Preprocess | None = None) -> FileImages:
    """The labelled images of a folder: as its ``dataset.txt`` list says, else ``<class>/<image>`` sub-folders.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "3").mkdir()
        >>> Image.new("RGB", (32, 32)).save(root / "3" / "a.png")
        >>> class_folder(root).labels.tolist()
        [3]
    """
    if (root / LIST_FILE).is_file():
        return _list_file(root / LIST_FILE, prepare)
    files = list_image_files(root)
    if not files:
        raise ValueError(f"expected image files in class sub-folders of {root}, found none")
    rels = [f.relative_to(root.resolve()) for f in files]
    if not all(len(r.parts) == 2 for r in rels):
        raise ValueError(f"expected images inside class sub-folders (<class>/<file>) of {root}, got {rels[0]}")
    label = _class_labels(sorted({r.parts[0] for r in rels}))
    return FileImages(files, np.array([label[r.parts[0]] for r in rels], np.int64), name=str(root), prepare=prepare)


def open_clean(path: str | os.PathLike[str], prepare: str | Preprocess | None = None) -> ImageSet:
    """A labelled clean set from an .npz (``x``, ``y``), a class folder (``<class>/<image>``), or a folder with a
    ``dataset.txt`` list (``<relative image path>, <label>`` per line); folder images are prepared as ``prepare``
    says (one of :data:`PREPARE`, e.g. ``"resize256-crop224"``, or a model's :class:`Preprocess`, which also
    prepares the .npz's images when they are of another size)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"expected an .npz, a class folder or a {LIST_FILE} list at {path}, found nothing there"
        )
    if path.is_file() and path.suffix == ".txt":
        return _list_file(path, prepare)
    if path.is_dir():
        return class_folder(path, prepare)
    x, y = read_images(path)
    if y is None:
        raise ValueError(f"expected labels 'y' in {path.name} to measure accuracy, got images only")
    images = ArrayImages(x, y, name=path.name)
    if isinstance(prepare, Preprocess) and x.shape[1:3] != (prepare.size, prepare.size):
        return PreparedImages(images, prepare)
    return images


class PreparedImages(ImageSet):
    """The images of ``base`` brought to a model's input by ``preprocess`` as they are read (arrays of another size).

    Example:
        >>> base = ArrayImages(np.zeros((2, 40, 50, 3), np.uint8), np.arange(2))
        >>> PreparedImages(base, Preprocess(32, 36)).get(np.array([0, 1])).shape
        (2, 32, 32, 3)
    """

    def __init__(self, base: ImageSet, preprocess: Preprocess) -> None:
        self.base, self.preprocess = base, preprocess
        self.labels, self.name = base.labels, base.name

    def get(self, indices: np.ndarray) -> np.ndarray:
        return self.preprocess.array(self.base.get(indices))


def read_images(
    path: str | os.PathLike[str], limit: int | None = None, preprocess: Preprocess | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Read images and optional labels from an .npz (``x`` and ``y``), an .npy, or an image folder.

    In a folder, images directly inside sub-folders get labels from the sub-folder names (their sorted position,
    ImageFolder style, or the names themselves when all are integers, as `bnadapt corrupt` writes them);
    otherwise labels are None. With ``preprocess`` (a model's, :func:`bnadapt.models.preprocess_of`), every image
    not already of the model's input size is resized and centre-cropped to it, so sizes may be mixed; without it,
    all images must have the same size.

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
        return _read_folder(path, limit, preprocess)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        x, y = load_npy(path), None
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                x = z["x"] if "x" in keys else (z[keys[0]] if len(keys) == 1 else None)
                y = z["y"] if "y" in keys else None
        except NUMPY_FILE_ERRORS as e:
            raise ValueError(f"expected a readable numpy file, got a damaged one: {path} ({numpy_reason(e)})") from e
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
    if preprocess is not None:
        x = preprocess.array(x)
    if y is not None:
        y = np.asarray(y)
        if y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise ValueError(
                f"expected integer labels 'y' of shape ({len(x)},) in {path.name}, got {y.dtype} {y.shape}"
            )
        y = y.astype(np.int64)
    return x, y


def _read_folder(root: Path, limit: int | None, preprocess: Preprocess | None) -> tuple[np.ndarray, np.ndarray | None]:
    files = list_image_files(root)
    if not files:
        raise ValueError(f"expected image files ({', '.join(IMAGE_SUFFIXES)}) in {root}, found none")
    files = files[:limit] if limit is not None else files
    rels = [f.relative_to(root.resolve()) for f in files]
    by_class = all(len(r.parts) == 2 for r in rels)
    label = _class_labels(sorted({r.parts[0] for r in rels})) if by_class else {}
    y = np.array([label[r.parts[0]] for r in rels], np.int64) if by_class else None
    # FileImages decodes, prepares and checks that every image has the same size, as the benchmark's readers do.
    images = FileImages(files, np.zeros(len(files), np.int64), name=str(root), prepare=preprocess)
    return images.get(np.arange(len(files))), y
