"""Benchmark data: --data specs, CIFAR-C / ImageNet-C / folder / npz readers, on-the-fly corruption, loaders."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bnadapt import corrupt
from bnadapt.corruptions.export import export_corrupted
from bnadapt.data import CLEAN, CorruptedImages, iter_batches_of, open_clean, open_data, parse_data_spec


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    y = np.arange(12) % 5
    np.savez(tmp_path / "in.npz", x=x, y=y)
    return tmp_path / "in.npz", x, y


@pytest.mark.parametrize(
    ("spec", "kind", "profile"),
    [("cifar-c:/d", "cifar-c", None), ("imagenet-c:d", "imagenet-c", None), ("npz:a.npz", "npz", None),
     ("folder:x", "folder", None), ("generate:imagenet:a:b.npz", "generate", "imagenet")],
)  # fmt: skip
def test_parse_data_spec(spec, kind, profile):
    d = parse_data_spec(spec)
    assert (d.kind, d.profile) == (kind, profile) and str(d) == spec


@pytest.mark.parametrize("spec", ["cifar-c", "mnist:/d", "generate:cifar", "generate:svhn:a.npz", "npz:"])
def test_parse_data_spec_rejects(spec):
    with pytest.raises(ValueError, match="expected"):
        parse_data_spec(spec)


def test_cifar_c_blocks_match_engine(tmp_path, npz):
    path, x, y = npz
    export_corrupted(path, tmp_path / "c", corruptions=["gaussian_noise", "contrast"], severities=[1, 3], seed=2)
    data = open_data(f"cifar-c:{tmp_path / 'c'}", ["gaussian_noise", "contrast"], [3])
    assert data.cells == [("gaussian_noise", 3), ("contrast", 3)]
    cell = data.cell("gaussian_noise", 3)
    assert np.array_equal(cell.get(np.arange(12)), corrupt(x, "gaussian_noise", 3, profile="cifar", seed=2))
    assert cell.labels.tolist() == y.tolist()
    assert np.array_equal(cell.get(np.array([2, 7])), cell.get(np.arange(12))[[2, 7]])


def test_released_cifar_c_layout_without_manifest(tmp_path, npz):
    _, x, y = npz
    (tmp_path / "r").mkdir()
    np.save(tmp_path / "r" / "fog.npy", np.concatenate([x + s for s in range(5)]))
    np.save(tmp_path / "r" / "labels.npy", np.tile(y, 5))
    cell = open_data(f"cifar-c:{tmp_path / 'r'}", ["fog"]).cell("fog", 4)
    assert np.array_equal(cell.get(np.arange(12)), x + 3)


def test_cifar_c_missing_and_partial(tmp_path, npz):
    path, _, _ = npz
    export_corrupted(path, tmp_path / "c", corruptions=["contrast"], severities=[1, 2])
    with pytest.raises(ValueError, match=r"fog\.npy, severity 5.*--allow-partial"):
        open_data(f"cifar-c:{tmp_path / 'c'}", ["contrast", "fog"], [1, 5])
    data = open_data(f"cifar-c:{tmp_path / 'c'}", ["contrast", "fog"], [1, 5], allow_partial=True)
    assert data.cells == [("contrast", 1)] and data.missing == ["fog.npy", "severity 5"]


def test_cifar_c_mismatched_labels(tmp_path, npz):
    path, _, _ = npz
    export_corrupted(path, tmp_path / "c", corruptions=["contrast"], severities=[1])
    np.save(tmp_path / "c" / "labels.npy", np.zeros(7, np.int64))
    with pytest.raises(ValueError, match="as many images as labels.npy"):
        open_data(f"cifar-c:{tmp_path / 'c'}", ["contrast"], [1]).cell("contrast", 1)


def _class_folders(root, names, per=2, size=32):
    rng = np.random.default_rng(1)
    for c in names:
        (root / c).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagenet_c_folders(tmp_path):
    _class_folders(tmp_path / "src", ["n02", "n01", "n10"])
    export_corrupted(tmp_path / "src", tmp_path / "inc", format="imagenet-c", profile="imagenet",
                     corruptions=["contrast"], severities=[2], resize=False)  # fmt: skip
    data = open_data(f"imagenet-c:{tmp_path / 'inc'}", ["contrast", "fog"], [2, 3], allow_partial=True)
    assert data.cells == [("contrast", 2)] and data.missing == ["contrast/3", "fog"]
    cell = data.cell("contrast", 2)
    assert cell.labels.tolist() == [0, 0, 1, 1, 2, 2]  # sorted wnids: n01, n02, n10
    assert cell.get(np.array([0, 5])).shape == (2, 32, 32, 3)


def test_numeric_class_folders_are_labels(tmp_path):
    _class_folders(tmp_path / "f", ["3", "10"], per=1)
    clean = open_clean(tmp_path / "f")
    # The folder name is the label, not its rank in sorted order ("10" < "3").
    assert [(f.parent.name, int(t)) for f, t in zip(clean.files, clean.labels, strict=True)] == [("10", 10), ("3", 3)]
    data = open_data(f"folder:{tmp_path / 'f'}")
    assert data.cells == [(CLEAN, 0)]


def test_mixed_sizes_named(tmp_path):
    _class_folders(tmp_path / "f", ["a"], per=1)
    Image.new("RGB", (40, 32)).save(tmp_path / "f" / "a" / "wide.png")
    with pytest.raises(ValueError, match="wide.png"):
        open_clean(tmp_path / "f").get(np.arange(2))


def test_generate_any_batching_same_bytes(npz):
    path, x, _ = npz
    data = open_data(f"generate:cifar:{path}", ["gaussian_noise", "impulse_noise"], [5], seed=3)
    assert data.cells == [(CLEAN, 0), ("gaussian_noise", 5), ("impulse_noise", 5)]
    sets = [data.cell(*c) for c in data.cells]
    whole = corrupt(x, "impulse_noise", 5, profile="cifar", seed=3)
    for b in (5, 12):
        got = np.concatenate([xb.numpy() for k, xb, _ in iter_batches_of(sets, b) if k == 2])
        assert np.array_equal(got, whole)
    assert np.array_equal(sets[2].get(np.array([4, 9])), whole[[4, 9]])


def test_loader_workers_same_bytes(npz):
    path, x, y = npz
    cell = CorruptedImages(open_clean(path), "shot_noise", 2, "cifar", 0)
    a = list(iter_batches_of([cell], 5, jobs=0))
    b = list(iter_batches_of([cell], 5, jobs=2))
    assert [k for k, _, _ in a] == [k for k, _, _ in b] == [0, 0, 0]
    assert all(np.array_equal(p[1], q[1]) and np.array_equal(p[2], q[2]) for p, q in zip(a, b, strict=True))
    assert np.concatenate([t[2] for t in a]).tolist() == y.tolist()


def test_clean_set_added(tmp_path, npz):
    path, _, _ = npz
    export_corrupted(path, tmp_path / "c", corruptions=["contrast"], severities=[1])
    data = open_data(f"cifar-c:{tmp_path / 'c'}", ["contrast"], [1], clean=path)
    assert data.cells == [(CLEAN, 0), ("contrast", 1)] and len(data.cell(CLEAN, 0)) == 12


def test_limit_per_cell_spreads_over_sorted_sets(npz):
    path, x, y = npz
    data = open_data(f"generate:cifar:{path}", ["contrast"], [2], limit=4)
    for cell in data.cells:
        s = data.cell(*cell)
        assert s.labels.tolist() == y[[0, 3, 6, 9]].tolist()
    full = open_data(f"generate:cifar:{path}", ["contrast"], [2]).cell("contrast", 2)
    # the corrupted bytes of an image do not depend on the subset it is read through
    assert np.array_equal(data.cell("contrast", 2).get(np.array([1, 3])), full.get(np.array([3, 9])))
    assert len(open_data(f"npz:{path}", limit=100).cell(CLEAN, 0)) == 12
    with pytest.raises(ValueError, match="limit-per-cell >= 1"):
        open_data(f"npz:{path}", limit=0)


@pytest.mark.parametrize(
    ("spec", "exc", "match"),
    [("npz:{t}/none.npz", FileNotFoundError, "found nothing"), ("cifar-c:{t}", FileNotFoundError, "labels.npy"),
     ("generate:cifar:{t}/noy.npz", ValueError, "labels")],
)  # fmt: skip
def test_bad_sources(tmp_path, spec, exc, match):
    np.savez(tmp_path / "noy.npz", x=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(exc, match=match):
        open_data(spec.format(t=tmp_path), ["contrast"], [1])
