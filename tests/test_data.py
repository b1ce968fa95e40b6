"""Image readers: npz/npy/folders, labels from class folders, unreadable and mismatched files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from bnadapt.data import read_images, to_float_nchw


def _write_folder(root, classes=("cat", "dog"), per=3, size=(12, 10)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_npz_npy(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 9, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    got, y = read_images(tmp_path / "a.npz")
    assert np.array_equal(got, x) and y.tolist() == [0, 1, 2, 3, 4]
    np.save(tmp_path / "a.npy", x)
    got, y = read_images(tmp_path / "a.npy")
    assert np.array_equal(got, x) and y is None


def test_folder_with_classes(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    x, y = read_images(tmp_path)
    assert x.shape == (6, 10, 12, 3) and x.dtype == np.uint8 and y.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize(
    ("setup", "exc", "match"),
    [
        (lambda p: p / "missing.npz", FileNotFoundError, "found nothing"),
        (lambda p: (p / "e").mkdir() or p / "e", ValueError, "found none"),
        (lambda p: (p / "bad.npz").write_bytes(b"PK\x03\x04junk") and p / "bad.npz", ValueError, "damaged"),
        (lambda p: np.save(p / "f.npy", np.zeros((2, 8, 8, 3), np.float32)) or p / "f.npy", TypeError, "uint8"),
        (
            lambda p: np.savez(p / "l.npz", x=np.zeros((2, 8, 8, 3), np.uint8), y=np.arange(3)) or p / "l.npz",
            ValueError,
            "labels",
        ),
        (lambda p: (p / "t.txt").write_text("x") and p / "t.txt", ValueError, "folder, .npz or .npy"),
    ],
)
def test_bad_sources(tmp_path, setup, exc, match):
    with pytest.raises(exc, match=match):
        read_images(setup(tmp_path))


def test_unreadable_image_named(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    with pytest.raises(ValueError, match="broken.jpg"):
        read_images(tmp_path)


def test_mixed_sizes_refused(tmp_path):
    _write_folder(tmp_path / "a", classes=("x",), size=(8, 8))
    _write_folder(tmp_path / "b", classes=("x",), size=(9, 8))
    with pytest.raises(ValueError, match="one size"):
        read_images(tmp_path)


def test_symlink_outside_root_skipped(tmp_path):
    _write_folder(tmp_path / "in")
    _write_folder(tmp_path / "out", classes=("z",))
    os.symlink(tmp_path / "out" / "z", tmp_path / "in" / "z")
    x, y = read_images(tmp_path / "in")
    assert len(x) == 6 and set(y.tolist()) == {0, 1}


def test_to_float_nchw():
    u8 = np.full((2, 3, 4, 1), 255, np.uint8)
    t = to_float_nchw(u8)
    assert t.shape == (2, 1, 3, 4) and t.dtype == torch.float32 and float(t.max()) == 1.0
    with pytest.raises(ValueError, match="finite"):
        to_float_nchw(torch.tensor([[[[float("inf")]]]]))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        to_float_nchw(torch.rand(3, 4, 4))
