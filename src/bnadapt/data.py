"""Reading images from disk and turning them into the tensors models take.

On disk and between modules images are uint8 NHWC (RGB or grey); models take float32 NCHW in [0, 1].
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["IMAGE_SUFFIXES", "as_uint8_nhwc", "to_float_nchw", "read_images", "list_image_files"]

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


def list_image_files(root: Path, allow_outside_links: bool = False) -> list[Path]:
    """Image files under ``root`` (recursive, sorted); symlinks pointing outside ``root`` are skipped with a warning."""
    root = root.resolve()
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        here = Path(dirpath)
        if not allow_outside_links and not here.resolve().is_relative_to(root):
            log.warning("skipping %s: it links outside the input folder %s", here, root)
            dirnames.clear()
            continue
        for name in sorted(filenames):
            p = here / name
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not allow_outside_links and not p.resolve().is_relative_to(root):
                log.warning("skipping %s: it links outside the input folder %s", p, root)
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

    In a folder, images directly inside sub-folders get labels from the sorted sub-folder names (ImageFolder style);
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
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.keys())
                if "x" not in keys and len(keys) != 1:
                    raise ValueError(
                        f"expected an .npz with an 'x' array (and optional 'y'), got keys {keys} in {path}"
                    )
                x = z["x"] if "x" in keys else z[keys[0]]
                y = z["y"] if "y" in keys else None
        elif suffix == ".npy":
            x, y = np.load(path, allow_pickle=False, mmap_mode="r"), None
        else:
            raise ValueError(f"expected an image folder, .npz or .npy, got {path.name}")
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"expected a readable numpy file, got a damaged one: {path} ({e})") from e
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


def _read_folder(root: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    files = list_image_files(root)
    if not files:
        raise ValueError(f"expected image files ({', '.join(IMAGE_SUFFIXES)}) in {root}, found none")
    files = files[:limit] if limit is not None else files
    rels = [f.relative_to(root.resolve()) for f in files]
    by_class = all(len(r.parts) == 2 for r in rels)
    classes = sorted({r.parts[0] for r in rels}) if by_class else []
    images = [_decode(f) for f in files]
    shape = images[0].shape
    for f, im in zip(files, images, strict=True):
        if im.shape != shape:
            raise ValueError(
                f"expected all images to be {shape[1]}x{shape[0]}, got {im.shape[1]}x{im.shape[0]} in {f}; "
                "resize them to one size first"
            )
    y = np.array([classes.index(r.parts[0]) for r in rels], np.int64) if by_class else None
    return np.stack(images), y
