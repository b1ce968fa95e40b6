"""Reading images from disk and turning them into the tensors models take.

On disk and between modules images are uint8 NHWC (RGB or grey); models take float32 NCHW in [0, 1].
"""

from __future__ import annotations

from ._bench import CLEAN, DATA_KINDS, BenchData, Cell, DataSpec, open_data, parse_data_spec
from ._cache import CachedImages, cache_dir, prepared_images
from ._images import (
    IMAGE_SUFFIXES,
    INTERPOLATIONS,
    MAX_PIXELS_ENV,
    PREPARE,
    ImageTooLargeError,
    Preprocess,
    as_uint8_nhwc,
    center_crop,
    follow_outside_links,
    list_image_files,
    max_pixels,
    open_image,
    resize_crop,
    to_float_inputs,
    to_float_nchw,
)
from ._loader import Prefetch, iter_batches_of
from ._sets import (
    LIST_FILE,
    RELEASE_JPEG_QUALITY,
    ArrayImages,
    CorruptedImages,
    FileImages,
    ImageSet,
    IndexedImages,
    PreparedImages,
    jpeg_roundtrip,
    open_clean,
    read_images,
    spread_indices,
)

__all__ = [
    "CLEAN",
    "CachedImages",
    "cache_dir",
    "prepared_images",
    "DATA_KINDS",
    "Cell",
    "PREPARE",
    "INTERPOLATIONS",
    "Preprocess",
    "PreparedImages",
    "center_crop",
    "resize_crop",
    "IndexedImages",
    "LIST_FILE",
    "RELEASE_JPEG_QUALITY",
    "jpeg_roundtrip",
    "spread_indices",
    "IMAGE_SUFFIXES",
    "as_uint8_nhwc",
    "to_float_nchw",
    "to_float_inputs",
    "MAX_PIXELS_ENV",
    "ImageTooLargeError",
    "max_pixels",
    "open_image",
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
    "Prefetch",
    "open_clean",
    "open_data",
    "parse_data_spec",
]
