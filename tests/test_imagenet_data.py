"""ImageNet-sized data: dataset.txt lists, the ImageNet-C preparation (resize 256 + crop 224, crop-if-larger), the
release JPEG round trip, and loading with decoding left to the device (tested on the CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bnadapt.corruptions import corrupt
from bnadapt.data import (
    FileImages,
    center_crop,
    iter_batches_of,
    jpeg_roundtrip,
    open_clean,
    open_data,
    resize_crop,
)
from conftest import write_imagenet_c, write_jpeg


@pytest.fixture
def listed(tmp_path: Path) -> Path:
    """A folder like imagenet_val1300: images/ of different sizes and a dataset.txt with labels."""
    sizes = [(300, 260), (250, 400), (227, 227), (500, 375)]
    lines = []
    for i, (w, h) in enumerate(sizes):
        write_jpeg(tmp_path / "images" / f"im{i}.JPEG", w, h, i)
        lines.append(f"images/im{i}.JPEG, {7 * i}")
    (tmp_path / "dataset.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_list_file_labels_and_imagenet_preparation(listed: Path):
    s = open_clean(listed, prepare="resize256-crop224")
    assert s.labels.tolist() == [0, 7, 14, 21]
    x = s.get(np.arange(4))
    assert x.shape == (4, 224, 224, 3)
    with Image.open(listed / "images" / "im3.JPEG") as im:
        expected = np.asarray(resize_crop(im.convert("RGB")))
    np.testing.assert_array_equal(x[3], expected)


def test_list_file_given_directly_and_unprepared_sizes_must_match(listed: Path):
    s = open_clean(listed / "dataset.txt")
    assert len(s) == 4
    with pytest.raises(ValueError, match="resize them to one size"):
        s.get(np.arange(2))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("images/im0.JPEG\n", "expected '<image path>, <label>' on line 1"),
        ("images/im0.JPEG, cat\n", "on line 1"),
        ("../outside.JPEG, 1\n", "inside"),
        ("# only a comment\n", "at least one"),
    ],
)
def test_bad_list_files_are_one_line_errors(listed: Path, text: str, match: str):
    (listed / "dataset.txt").write_text(text)
    with pytest.raises(ValueError, match=match):
        open_clean(listed)


def test_missing_listed_image_is_named(listed: Path):
    (listed / "dataset.txt").write_text("images/im0.JPEG, 1\nimages/nope.JPEG, 2\n")
    with pytest.raises(FileNotFoundError, match="nope.JPEG"):
        open_clean(listed)


def test_generate_imagenet_prepares_then_corrupts(listed: Path):
    data = open_data(f"generate:imagenet:{listed}", ["contrast"], [3])
    clean = data.cell("clean", 0).get(np.arange(4))
    cell = data.cell("contrast", 3).get(np.arange(4))
    assert clean.shape == cell.shape == (4, 224, 224, 3)
    np.testing.assert_array_equal(cell, corrupt(clean, "contrast", 3, "imagenet", 0, indices=[0, 1, 2, 3]))


def test_release_jpeg_adds_a_q85_round_trip_to_corrupted_cells_only(listed: Path):
    plain = open_data(f"generate:imagenet:{listed}", ["gaussian_noise"], [2])
    released = open_data(f"generate:imagenet:{listed}", ["gaussian_noise"], [2], release_jpeg=True)
    idx = np.arange(4)
    np.testing.assert_array_equal(released.cell("clean", 0).get(idx), plain.cell("clean", 0).get(idx))
    a, b = plain.cell("gaussian_noise", 2).get(idx), released.cell("gaussian_noise", 2).get(idx)
    np.testing.assert_array_equal(b, jpeg_roundtrip(a, 85))
    assert np.abs(a.astype(int) - b).mean() > 1  # JPEG smooths noise: the round trip is not a no-op


def test_jpeg_roundtrip_matches_pillow_at_q85():
    import io

    x = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    ours = jpeg_roundtrip(x)
    for i in range(2):
        buf = io.BytesIO()
        Image.fromarray(x[i]).save(buf, "JPEG", quality=85)
        np.testing.assert_array_equal(ours[i], np.asarray(Image.open(buf)))


def test_release_jpeg_only_for_generated_data(listed: Path):
    with pytest.raises(ValueError, match="release-jpeg"):
        open_data(f"folder:{listed}", release_jpeg=True)


@pytest.mark.parametrize("size", [224, 256])
def test_imagenet_c_folders_read_as_released_and_crop_only_when_larger(tmp_path: Path, size: int):
    write_imagenet_c(tmp_path, size)
    data = open_data(f"imagenet-c:{tmp_path}", ["fog"], [1, 2])
    s = data.cell("fog", 2)
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1]  # sorted wnids
    x = s.get(np.arange(6))
    assert x.shape == (6, 224, 224, 3)
    with Image.open(s.files[4]) as im:
        np.testing.assert_array_equal(x[4], center_crop(np.asarray(im.convert("RGB")), 224))


def test_center_crop_offsets_follow_torchvision():
    from torchvision.transforms.functional import center_crop as tv_crop

    img = np.arange(7 * 9 * 3, dtype=np.uint8).reshape(7, 9, 3)
    t = torch.from_numpy(img).permute(2, 0, 1)
    np.testing.assert_array_equal(center_crop(img, 4), tv_crop(t, [4, 4]).permute(1, 2, 0).numpy())
    assert center_crop(img, 10) is img


def test_device_decoding_path_equals_cpu_decoding(tmp_path: Path):
    """The GPU path's code (read bytes in the worker, decode in the main process, crop) run with the CPU decoder."""
    write_imagenet_c(tmp_path, 256)
    data = open_data(f"imagenet-c:{tmp_path}", ["fog"], [1])
    s = data.cell("fog", 1)
    plain = [x for _, x, _ in iter_batches_of([s], 4)]
    staged = [x for _, x, _ in iter_batches_of([s], 4, on_device=True)]
    for a, b in zip(plain, staged, strict=True):
        assert a.shape == b.shape
        # Both are libjpeg-turbo, but torchvision and Pillow may pick different IDCT/upsampling settings.
        assert (a.int() - b.int()).abs().max() <= 3
    assert s.cpu_fallbacks() == 0


def test_a_file_the_device_decoder_refuses_is_decoded_on_the_cpu_and_counted(tmp_path: Path, caplog):
    write_imagenet_c(tmp_path, 224)
    f = sorted((tmp_path / "fog" / "1").rglob("*.JPEG"))[1]
    # A PNG under a .JPEG name: Pillow reads it by its content, a JPEG decoder refuses it.
    Image.fromarray(np.full((224, 224, 3), 77, np.uint8)).save(f, format="PNG")
    s = open_data(f"imagenet-c:{tmp_path}", ["fog"], [1]).cell("fog", 1)
    with caplog.at_level("WARNING"):
        (_, x, _), *_ = list(iter_batches_of([s], 6, on_device=True))
    assert s.cpu_fallbacks() == 1
    assert (x[1] == 77).all()
    assert "decoding" in caplog.text and f.name in caplog.text


def test_file_images_refuse_an_unknown_preparation(tmp_path: Path):
    with pytest.raises(ValueError, match="prepare"):
        FileImages([], np.zeros(0, np.int64), prepare="resize")


@pytest.mark.parametrize("release_jpeg", [False, True])
def test_corruption_left_to_the_device_gives_the_workers_bytes(listed: Path, release_jpeg: bool):
    """generate: on a GPU corrupts in the main process with the torch path; run here on the CPU, it is exact."""
    data = open_data(f"generate:imagenet:{listed}", ["gaussian_noise", "glass_blur"], [2], release_jpeg=release_jpeg)
    sets = [data.cell(*c) for c in data.cells]
    plain = [x for _, x, _ in iter_batches_of(sets, 3)]
    staged = [x for _, x, _ in iter_batches_of(sets, 3, on_device=True)]
    assert len(plain) == len(staged) == 6
    for a, b in zip(plain, staged, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bench_gpu_script_runs_on_cpu_tiny(capsys):
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["bench_gpu.py", "--device", "cpu", "--tiny"]
    try:
        with pytest.raises(SystemExit) as stop:
            runpy.run_path(str(Path(__file__).parents[1] / "benchmarks" / "bench_gpu.py"), run_name="__main__")
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert stop.value.code == 0
    for what in ("(a) forward fp32", "(b) bench source", "(c) bench source, decode on CPU", "(d) corrupt"):
        assert what in out
    rates = [line.rsplit("  ", 1)[1] for line in out.splitlines() if line.startswith("(")]
    assert all(float(r.split("|")[0]) > 0 for r in rates)
