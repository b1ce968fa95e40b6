"""`bnadapt corrupt` and export_corrupted: released layouts, atomic outputs, resume, refusal to mix, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from bnadapt import corrupt
from bnadapt.cli import main
from bnadapt.corruptions.export import export_corrupted
from bnadapt.data import resize_crop


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "in.npz", x=x, y=np.arange(6) % 3)
    return tmp_path / "in.npz", x


def test_cifar_c_layout_matches_engine(tmp_path, npz):
    path, x = npz
    out = tmp_path / "c"
    export_corrupted(path, out, corruptions=["gaussian_noise", "contrast"], severities=[1, 3], seed=4, jobs=2)
    arr = np.load(out / "gaussian_noise.npy")
    assert arr.shape == (12, 32, 32, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[6:], corrupt(x, "gaussian_noise", 3, profile="cifar", seed=4))
    assert np.load(out / "labels.npy").tolist() == [0, 1, 2, 0, 1, 2] * 2
    assert json.loads((out / "bnadapt-corrupt.json").read_text())["seed"] == 4
    assert not list(out.glob(".*tmp"))


def test_rerun_skips_finished_and_refuses_other_options(tmp_path, npz):
    path, _ = npz
    out = tmp_path / "c"
    export_corrupted(path, out, corruptions=["contrast"])
    stamp = (out / "contrast.npy").stat().st_mtime_ns
    export_corrupted(path, out, corruptions=["contrast", "gaussian_noise"])
    assert (out / "contrast.npy").stat().st_mtime_ns == stamp and (out / "gaussian_noise.npy").is_file()
    with pytest.raises(ValueError, match="other options"):
        export_corrupted(path, out, corruptions=["contrast"], seed=9)
    export_corrupted(path, out, corruptions=["contrast"], seed=9, force=True)


def test_failure_leaves_no_finished_looking_file(tmp_path, npz, monkeypatch):
    import bnadapt.corruptions.export as ex

    path, _ = npz
    calls = {"n": 0}
    real = ex.corrupt

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("killed mid-way")
        return real(*a, **k)

    monkeypatch.setattr(ex, "corrupt", flaky)
    with pytest.raises(RuntimeError):
        export_corrupted(path, tmp_path / "c", corruptions=["contrast"], severities=[1, 2, 3])
    # Nothing finished, and the folder was this run's: it is removed whole (no temporaries, no labels, no manifest).
    assert not (tmp_path / "c").exists()


def test_imagenet_c_layout_from_folder(tmp_path):
    rng = np.random.default_rng(1)
    for cls in ("n01", "n02"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / "src" / cls / f"im{i}.png"
            )
    out = tmp_path / "inet"
    flags = "--profile imagenet --format imagenet-c --corruptions contrast --severities 2 --no-resize --no-progress"
    code = main(["corrupt", "--input", str(tmp_path / "src"), "--out", str(out), *flags.split()])
    assert code == 0
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.JPEG"))
    assert files == ["contrast/2/n01/im0.JPEG", "contrast/2/n01/im1.JPEG", "contrast/2/n02/im0.JPEG",
                     "contrast/2/n02/im1.JPEG"]  # fmt: skip
    with Image.open(out / "contrast/2/n01/im0.JPEG") as im:
        assert im.size == (50, 40) and im.format == "JPEG"


def test_resize_crop_like_torchvision():
    from torchvision import transforms

    im = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 451, 3), dtype=np.uint8))
    ours = np.asarray(resize_crop(im))
    ref = np.asarray(transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])(im))
    assert ours.shape == (224, 224, 3) and np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_cli_reads_with_plain_numpy(tmp_path, npz, capsys):
    path, _ = npz
    code = main(["corrupt", "--input", str(path), "--profile", "cifar", "--format", "cifar-c", "--out",
                 str(tmp_path / "o"), "--corruptions", "noise", "--severities", "1-2", "--no-progress"])  # fmt: skip
    assert code == 0 and "wrote 3 files" in capsys.readouterr().out
    assert np.load(tmp_path / "o" / "impulse_noise.npy").shape == (12, 32, 32, 3)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--corruptions", "fogg"], "expected corruption names"),
        (["--severities", "0-3"], "within 1..5"),
        (["--profile", "mnist"], "invalid choice"),
        (["--input", "{t}/none.npz"], "found nothing"),
        (["--out", "{t}/in.npz/b/c"], "got a file"),
    ],
)
def test_cli_bad_input(tmp_path, npz, capsys, args, match):
    path, _ = npz
    base = {"--input": str(path), "--profile": "cifar", "--format": "cifar-c", "--out": str(tmp_path / "o")}
    for k, v in zip(args[::2], args[1::2], strict=True):
        base[k] = v.format(t=tmp_path)
    argv = ["corrupt", "--no-progress"] + [t for kv in base.items() for t in kv]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.npy"))


def test_failed_start_leaves_nothing_that_blocks_the_corrected_rerun(tmp_path, npz):
    path, _ = npz
    np.savez(tmp_path / "nolabels.npz", x=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        export_corrupted(tmp_path / "nolabels.npz", tmp_path / "o", corruptions=["contrast"])
    assert not (tmp_path / "o").exists()
    assert [p.name for p in export_corrupted(path, tmp_path / "o", corruptions=["contrast"])] == ["contrast.npy"]


def test_unreadable_image_named_or_skipped(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "src" / "a" / "ok.png")
    (tmp_path / "src" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    kw = {
        "format": "imagenet-c",
        "profile": "imagenet",
        "corruptions": ["contrast"],
        "severities": [1],
        "resize": False,
    }
    with pytest.raises(ValueError, match="bad.jpg"):
        export_corrupted(tmp_path / "src", tmp_path / "o", **kw)
    assert not (tmp_path / "o" / "contrast" / "1").exists()
    export_corrupted(tmp_path / "src", tmp_path / "o2", skip_bad=True, **kw)
    assert [p.name for p in (tmp_path / "o2").rglob("*.JPEG")] == ["ok.JPEG"]


@pytest.mark.shared
def test_shared_cifar_to_cifar_c(shared, tmp_path):
    src = shared / "data" / "cifar10" / "test1000_lossless.npz"
    flags = "--profile cifar --format cifar-c --corruptions gaussian_noise --no-progress -j 2"
    assert main(["corrupt", "--input", str(src), "--out", str(tmp_path / "c10c"), *flags.split()]) == 0
    arr = np.load(tmp_path / "c10c" / "gaussian_noise.npy")
    labels = np.load(tmp_path / "c10c" / "labels.npy")
    assert arr.shape == (5000, 32, 32, 3) and labels.shape == (5000,)
    assert np.array_equal(labels[:1000], np.load(src)["y"])
