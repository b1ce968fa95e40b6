"""Low-level image helpers: checks and conversions between uint8 NHWC and float NCHW, file listing, decoding, and the
one resize + centre crop (ImageNet-C's, and each model's own as a :class:`Preprocess`)."""

from __future__ import annotations

import logging
import math
import os
import re
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)


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
        _finite_range(images)
        return images.float()
    x = as_uint8_nhwc(images)
    # Memory-mapped or read-only arrays are copied once here rather than shared with a tensor.
    x = np.ascontiguousarray(x) if x.flags.writeable else np.array(x)
    return torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)


def to_float_inputs(inputs) -> torch.Tensor:
    """What :func:`bnadapt.adapt` feeds a model: images as :func:`to_float_nchw` makes them, float ones only in
    [0, 1]; or, for BatchNorm1d/3d models, float features (N, C), sequences (N, C, L) or volumes (N, C, D, H, W),
    checked finite and passed as given (their range is the model's business).

    Example:
        >>> to_float_inputs(torch.full((2, 4, 10), -3.0)).shape
        torch.Size([2, 4, 10])
    """
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind == "f":
        inputs = torch.from_numpy(inputs)
    if not (isinstance(inputs, torch.Tensor) and inputs.is_floating_point() and inputs.ndim in (2, 3, 4, 5)):
        return to_float_nchw(inputs)
    lo, hi = _finite_range(inputs)
    if inputs.ndim != 4:
        return inputs
    # 0..255 floats would be normalised as if 255 times brighter than the source: every statistic wrong, silently.
    if lo < 0 or hi > 1:
        raise ValueError(
            f"expected float images in [0, 1], got values from {lo:g} to {hi:g}; pass uint8 images (0..255), divide "
            "by 255, or move the model's normalisation into the model"
        )
    return inputs.float()


def _finite_range(x: torch.Tensor) -> tuple[float, float]:
    """(min, max) of a float tensor in one pass; NaN or inf anywhere is a ValueError."""
    if x.numel() == 0:
        return 0.0, 0.0
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):  # aminmax carries a NaN through to both ends
        raise ValueError("expected finite float images, got NaN or inf values; clean the input first")
    return lo, hi


_OUTSIDE_LINKS: ContextVar[bool] = ContextVar("bnadapt_outside_links", default=False)


def outside_links_followed() -> bool:
    """Whether readers follow symlinks (and list-file paths) that lead outside the input folder just now.

    Example:
        >>> with follow_outside_links():
        ...     outside_links_followed()
        True
    """
    return _OUTSIDE_LINKS.get()


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
    """Image files under ``root`` (recursive, sorted). Symlinks pointing outside ``root`` are skipped unless
    ``allow_outside_links`` (default: as set by :func:`follow_outside_links`, else no), with one warning line that
    counts them; when they were all there is, a ValueError that names ``--follow-links``.

    Example:
        >>> list_image_files(Path("."))  # doctest: +SKIP
        [PosixPath('/data/cat/1.png'), PosixPath('/data/dog/2.png')]
    """
    if allow_outside_links is None:
        allow_outside_links = _OUTSIDE_LINKS.get()
    root = root.resolve()
    files: list[Path] = []
    outside: list[Path] = []  # skipped links (files or folders) leading out of root
    broken: list[Path] = []
    seen: set[str] = set()  # real folders already listed: a link back up (cat/loop -> ..) must not repeat them
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in seen:
            log.warning("skipping %s: it links back to the folder %s, already read", here, real)
            dirnames.clear()
            continue
        seen.add(real)
        if not allow_outside_links and not Path(real).is_relative_to(root):
            outside.append(here)
            dirnames.clear()
            continue
        for name in sorted(filenames):
            p = here / name
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not p.is_file():  # a broken link, or one that points to itself
                broken.append(p)
            elif not allow_outside_links and not Path(os.path.realpath(p)).is_relative_to(root):
                outside.append(p)
            else:
                files.append(p)
    _report_skipped(root, files, outside, broken)
    return files


def _report_skipped(root: Path, files: list[Path], outside: list[Path], broken: list[Path]) -> None:
    """One warning line per kind of skipped link (a folder of 50 links is one line, not 50), or the error when
    skipped links are all the folder has."""
    if broken:
        log.warning("skipping %d link(s) to no readable file in %s (first: %s)", len(broken), root, broken[0])
    if not outside:
        return
    what = f"{len(outside)} symlink(s) in {root} that lead outside it (first: {outside[0]})"
    if not files:
        raise ValueError(f"expected image files in {root}, got only {what}; pass --follow-links to read them")
    log.warning("skipping %s; pass --follow-links to read them", what)


# How images read from files are prepared (FileImages.prepare): as they are; ImageNet-C's "resize 256, centre crop
# 224" (torchvision's Resize + CenterCrop, bilinear); released ImageNet-C files, only centre-cropped when larger; or a
# model's own preprocessing, a Preprocess.
PREPARE = (None, "resize256-crop224", "crop224")

# Interpolations a model's preprocessing may name: torchvision's InterpolationMode values that PIL implements (timm's
# str_to_interp_mode knows the same six). The command line offers the three that model configs use.
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "box", "hamming", "lanczos")


def check_crop_pct(crop_pct: float) -> float:
    """A crop fraction 0 < F <= 1 (timm's ``crop_pct``), or a ValueError saying so.

    Example:
        >>> check_crop_pct(0.875)
        0.875
    """
    if isinstance(crop_pct, bool) or not isinstance(crop_pct, (int, float)) or not 0 < crop_pct <= 1:
        raise ValueError(f"expected a crop fraction 0 < crop_pct <= 1 (e.g. 0.875), got {crop_pct!r}")
    return float(crop_pct)


@dataclass(frozen=True)
class Preprocess:
    """How images are brought to a model's input: the shorter side resized to ``resize`` (aspect ratio kept) with
    ``interpolation``, then the centre ``size`` x ``size`` cropped: the evaluation transform of timm
    (``create_transform(..., is_training=False)``, crop mode "center") and of torchvision's weights.

    An image that is already ``size`` x ``size`` is taken as prepared and left as it is (CIFAR arrays, exported crops,
    ImageNet-C files): resizing and cropping it again would zoom into it.

    Example:
        >>> p = Preprocess.from_crop_pct(224, 0.875)
        >>> p.resize, p.crop_pct, str(p)
        (256, 0.875, 'resize 256 (bilinear), centre crop 224')
    """

    size: int
    resize: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("size", "resize"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"expected a positive integer image {name}, got {value!r}")
        if self.resize < self.size:
            raise ValueError(f"expected resize >= the crop size {self.size}, got {self.resize}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"expected an interpolation, one of {', '.join(INTERPOLATIONS)}; got {self.interpolation!r}"
            )

    @classmethod
    def from_crop_pct(cls, size: int, crop_pct: float = 1.0, interpolation: str = "bilinear") -> Preprocess:
        """timm's description: input ``size`` and the fraction ``crop_pct`` of the resized image that is kept."""
        # timm's transforms_imagenet_eval: scale_size = math.floor(img_size / crop_pct).
        return cls(size, math.floor(size / check_crop_pct(crop_pct)), interpolation)

    @property
    def crop_pct(self) -> float:
        """The fraction of the resized image's shorter side that the crop keeps."""
        return self.size / self.resize

    def replace(
        self, size: int | None = None, crop_pct: float | None = None, interpolation: str | None = None
    ) -> Preprocess:
        """This description with the given values changed (None keeps one); a new ``size`` alone keeps the crop
        fraction.

        Example:
            >>> Preprocess(224, 256).replace(size=160).resize
            182
        """
        new_size = self.size if size is None else size
        if crop_pct is not None:
            return Preprocess.from_crop_pct(new_size, crop_pct, interpolation or self.interpolation)
        # In integers: size / crop_pct in floats can land just below a whole number (224 / (224 / 232)).
        resize = self.resize if size is None else max(new_size, new_size * self.resize // self.size)
        return Preprocess(new_size, resize, interpolation or self.interpolation)

    def image(self, image):
        """A PIL image prepared: resized and centre-cropped, or as it is when already ``size`` x ``size``."""
        if image.size == (self.size, self.size):
            return image
        return resize_crop(image, self.resize, self.size, self.interpolation)

    def array(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C) images prepared one by one as :meth:`image` does (as they are when of the size).

        Example:
            >>> Preprocess(4, 8).array(np.zeros((2, 10, 12, 3), np.uint8)).shape
            (2, 4, 4, 3)
        """
        from PIL import Image

        x = as_uint8_nhwc(images)
        if x.shape[1:3] == (self.size, self.size):
            return x
        channels = x.shape[-1]
        out = [np.asarray(self.image(Image.fromarray(im[..., 0] if channels == 1 else im))) for im in x]
        return np.stack(out).reshape(len(x), self.size, self.size, channels)

    def __str__(self) -> str:
        return f"resize {self.resize} ({self.interpolation}), centre crop {self.size}"


MAX_PIXELS_ENV = "BNADAPT_MAX_PIXELS"


class ImageTooLargeError(ValueError):
    """An image file whose header announces more pixels than :func:`max_pixels` allows (a decompression bomb)."""


def max_pixels() -> int | None:
    """The most pixels an image file may have to be decoded: ``$BNADAPT_MAX_PIXELS`` (0: no limit), else Pillow's
    ``Image.MAX_IMAGE_PIXELS`` (89,478,485 unless changed); None when there is no limit.

    Example:
        >>> max_pixels() is None or max_pixels() > 1000
        True
    """
    from PIL import Image

    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return Image.MAX_IMAGE_PIXELS
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"expected {MAX_PIXELS_ENV} to be a number of pixels (0: no limit), got {text!r}")
    return int(text) or None


def _too_large(path, limit: int | None, size: str) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"expected images of at most {limit} pixels, got {path} with {size}; set {MAX_PIXELS_ENV}=<pixels> "
        "(0: no limit) to read larger images"
    )


@contextmanager
def open_image(path, name: object = None):
    """A PIL image opened lazily, after its header's size is checked against :func:`max_pixels`: a decompression
    bomb (a few KB that decode to gigabytes) is an :class:`ImageTooLargeError` before anything is decoded.
    ``path`` may be an open binary file; ``name`` is what errors call it (default: ``path``).

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> f = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (30, 20)).save(f)
        >>> with open_image(f) as im:
        ...     im.size
        (30, 20)
    """
    from PIL import Image

    limit, name = max_pixels(), path if name is None else name
    # Pillow refuses at twice its own limit before we see the size: a user who allows more must get more.
    if Image.MAX_IMAGE_PIXELS is not None and (limit is None or limit > Image.MAX_IMAGE_PIXELS):
        Image.MAX_IMAGE_PIXELS = limit
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, with the file's name
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise _too_large(name, limit, f"{found[1] if found else 'more'} pixels") from None
    with im:
        if limit is not None and im.width * im.height > limit:
            raise _too_large(name, limit, f"{im.width}x{im.height} = {im.width * im.height} pixels")
        yield im


def decode_image(path: Path, channels: int = 3, prepare: str | Preprocess | None = None) -> np.ndarray:
    """An image file as a uint8 (H, W, channels) array, prepared as ``prepare`` says (one of :data:`PREPARE`, or a
    :class:`Preprocess`); an unreadable file is a ValueError naming it.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> f = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (300, 260)).save(f)
        >>> decode_image(f, prepare="resize256-crop224").shape
        (224, 224, 3)
    """
    from PIL import UnidentifiedImageError

    try:
        with open_image(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if prepare == "resize256-crop224":
                im = resize_crop(im)
            elif isinstance(prepare, Preprocess):
                im = prepare.image(im)
            out = np.asarray(im).reshape(im.height, im.width, channels)
    except ImageTooLargeError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"expected a readable image file, got an unreadable one: {path} ({e})") from e
    return center_crop(out, 224) if prepare == "crop224" else out


def resize_crop(image, resize: int = 256, crop: int = 224, resample: str = "bilinear"):
    """torchvision's ``Resize(resize)`` + ``CenterCrop(crop)`` on a PIL image (``resample``: one of
    :data:`INTERPOLATIONS`), as ImageNet-C was made and as timm and torchvision's weights evaluate.

    Example:
        >>> from PIL import Image
        >>> resize_crop(Image.new("RGB", (500, 375))).size
        (224, 224)
    """
    from torchvision.transforms.v2 import functional as TF

    # torchvision's own kernels, so the sizes, rounding and crop offsets are theirs; on a PIL image they call Pillow's
    # resize, which always antialiases (the same call timm's eval transform and ImageClassification make).
    image = TF.resize(image, [resize], interpolation=TF.InterpolationMode(resample), antialias=True)
    return TF.center_crop(image, [crop])


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The centre ``size`` x ``size`` of an (H, W, C) image, or the image itself when it is not larger (torchvision's
    CenterCrop offsets).

    Example:
        >>> center_crop(np.zeros((256, 230, 3), np.uint8), 224).shape
        (224, 224, 3)
    """
    h, w = image.shape[:2]
    if h <= size and w <= size:
        return image
    top, left = max(0, int(round((h - size) / 2.0))), max(0, int(round((w - size) / 2.0)))
    return image[top : top + size, left : left + size]


# What a damaged .npy/.npz makes numpy, zipfile and zlib raise besides OSError/ValueError: a flipped byte in a zip
# header asks for an unknown compression method, encryption or a newer zip version (NotImplementedError,
# RuntimeError); in a deflate stream, zlib.error; in a .npy header, tokenize's TokenError; a header that declares an
# enormous array, MemoryError (found by tests/test_properties.py).
NUMPY_FILE_ERRORS = (
    zipfile.BadZipFile,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    RuntimeError,
    zlib.error,
    tokenize.TokenError,
    MemoryError,
)


def numpy_reason(e: Exception) -> str:
    """Why numpy could not load a file, without its advice to unpickle (object arrays are never loaded here).

    Example:
        >>> numpy_reason(ValueError("Object arrays cannot be loaded when allow_pickle=False"))
        'it holds Python objects (pickled data), which bnadapt never loads'
    """
    if "pickle" in str(e) or "object" in str(e).lower():
        return "it holds Python objects (pickled data), which bnadapt never loads"
    if isinstance(e, MemoryError):
        return f"it declares an array larger than memory: {str(e).splitlines()[0] if str(e) else 'MemoryError'}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def load_npy(path: Path) -> np.ndarray:
    """An .npy file memory-mapped read-only, never unpickled; a damaged file is a ValueError naming it.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "a.npy"
        >>> np.save(f, np.zeros((2, 8, 8, 3), np.uint8))
        >>> load_npy(f).shape
        (2, 8, 8, 3)
    """
    try:
        x = np.load(path, allow_pickle=False, mmap_mode="r")
    except NUMPY_FILE_ERRORS as e:
        raise ValueError(f"expected a readable numpy file, got a damaged one: {path} ({numpy_reason(e)})") from e
    if not isinstance(x, np.ndarray):  # np.load opens an .npz archive whatever its name
        x.close()
        raise ValueError(f"expected one array in the .npy file {path}, got an .npz archive; name it .npz")
    if x.ndim == 0:
        raise ValueError(f"expected an array in the numpy file {path}, got a single value")
    return x
