"""Reliability, round 2 (issue 18): loops of links, damaged BN statistics in checkpoints, absurd labels, a
byte-order mark, --first/--last beyond the model, half-precision models, a read-only --out; then colliding export
names, decompression bombs, full disks, temporaries left by killed runs, float images outside [0, 1], BatchNorm1d/3d
inputs, and the grey luma that differed between machines."""

from __future__ import annotations

import copy
import errno
import io
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bnadapt
from bnadapt import BNStats
from bnadapt._io import no_space_error
from bnadapt.cli import app, main
from bnadapt.corruptions import corrupt
from bnadapt.corruptions.export import export_corrupted
from bnadapt.data import open_clean, open_data, read_images
from bnadapt.data._images import decode_image
from bnadapt.methods.inorder import auto_weights
from bnadapt.models import cifar_resnet, load_model
from conftest import save_resnet20_checkpoint


def _folder(root: Path, size: int = 8) -> Path:
    for label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((size, size, 3), 40 * i + label, np.uint8)).save(root / cls / f"{i}.png")
    return root


def test_a_link_back_up_and_a_self_link_are_read_once_and_skipped(tmp_path):
    root = _folder(tmp_path / "imgs")
    os.symlink("..", root / "cat" / "loop")  # each image would otherwise be read again and again
    os.symlink("self.png", root / "dog" / "self.png")
    x, y = read_images(root)
    assert x.shape == (6, 8, 8, 3) and y.tolist() == [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("damage", ["nan", "negative"])
def test_checkpoint_with_damaged_bn_statistics_is_refused(tmp_path, capsys, damage):
    path = save_resnet20_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["bn1.running_var"][0] = float("nan") if damage == "nan" else -1.0
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match="usable BatchNorm statistics"):
        load_model("cifar10_resnet20", checkpoint=path)
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.int64))
    argv = ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(path), "--data", f"npz:{tmp_path / 'c.npz'}"]
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "usable BatchNorm statistics" in err
    assert not (tmp_path / "out").exists()


def test_dataset_txt_absurd_label_and_byte_order_mark(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "dataset.txt").write_text("cat/0.png, 99999999999999999999999\n")
    with pytest.raises(ValueError, match="class label 0.."):
        open_clean(root)
    (root / "dataset.txt").write_text("\ufeffcat/0.png, 3\ndog/1.png, 4\n", encoding="utf-8")
    images = open_clean(root)
    assert len(images) == 2 and images.labels.tolist() == [3, 4]


def test_first_or_last_beyond_the_bn_layers_is_refused(tmp_path, tiny, capsys):
    with pytest.raises(ValueError, match="at most the 3 BN layers"):
        bnadapt.adapt(tiny, torch.rand(8, 3, 8, 8), first=4)
    with pytest.raises(ValueError, match="at most the 3 BN layers"):
        bnadapt.adapt(tiny, torch.rand(8, 3, 8, 8), last=9)
    path = save_resnet20_checkpoint(tmp_path)
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.int64))
    argv = ["bench", "--model", "cifar10_resnet20", "--checkpoint", str(path), "--data", f"npz:{tmp_path / 'c.npz'}"]
    assert main([*argv, "--last", "20", "--n", "2", "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    assert "at most the 19 BN layers" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_adapt_in_their_own_dtype(one_thread, dtype):
    net = cifar_resnet(20).eval()
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    full = BNStats.from_model(bnadapt.adapt(net, x))
    half = bnadapt.adapt(net.to(dtype), x)  # float32 images: converted to the model's dtype
    stats = BNStats.from_model(half)
    assert stats.var["net.bn1"].dtype == dtype
    torch.testing.assert_close(stats.mean["net.bn1"].float(), full.mean["net.bn1"], rtol=0.05, atol=0.02)
    with torch.no_grad():
        assert torch.isfinite(half(x.to(dtype))).all()


def test_read_only_out_is_a_one_line_error(monkeypatch, capsys):
    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out")

    monkeypatch.setitem(app.COMMANDS, "report", read_only)
    assert main(["report", "/mnt/ro/out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "bnadapt: error: cannot write /mnt/ro/out: read-only file system; pass a writable --out"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomically_written_files_follow_the_umask(tmp_path, umask):
    from bnadapt._io import write_text

    old = os.umask(umask)
    try:
        path = write_text(tmp_path / "summary.json", "{}")
        BNStats.from_model(torch.nn.BatchNorm2d(2)).save(tmp_path / "s.safetensors")
    finally:
        os.umask(old)
    for f in (path, tmp_path / "s.safetensors"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


# --- the rest of issue 18: colliding export names, decompression bombs, full disks, stale temporaries, float ranges,
# BatchNorm1d/3d inputs, and the grey luma that flipped between machines.


def _png_header(w: int, h: int) -> bytes:
    """A PNG that announces w x h pixels in a few bytes (its data is cut short): a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_imagenet_c_export_keeps_images_that_share_class_and_stem(tmp_path, capsys):
    src = tmp_path / "src"
    names = ["cat/a/001.png", "cat/b/001.png", "cat/002.png", "dog/001.png", "dog/001.jpg"]
    for k, name in enumerate(names):
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(src / name)
    argv = ["corrupt", "--input", str(src), "--out", str(tmp_path / "c"), "--profile", "imagenet"]
    flags = ["--format", "imagenet-c", "--corruptions", "contrast", "--severities", "1", "--no-resize", "--no-progress"]
    assert main([*argv, *flags]) == 0
    assert "of 5 images" in capsys.readouterr().out
    written = sorted(str(p.relative_to(tmp_path / "c" / "contrast" / "1")) for p in (tmp_path / "c").rglob("*.JPEG"))
    assert written == [
        "cat/002.JPEG",
        "cat/a__001.png.JPEG",
        "cat/b__001.png.JPEG",
        "dog/001.jpg.JPEG",
        "dog/001.png.JPEG",
    ]
    cell = open_data(f"imagenet-c:{tmp_path / 'c'}", ["contrast"], [1]).cell("contrast", 1)
    assert cell.labels.tolist() == [0, 0, 0, 1, 1] and cell.get(np.arange(5)).shape == (5, 32, 32, 3)


def test_export_names_that_still_collide_are_refused_naming_both(tmp_path):
    for name in ("cat/a/001.png", "cat/b/001.png", "cat/a__001.png.png"):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "src" / name)
    kw = {"format": "imagenet-c", "profile": "imagenet", "corruptions": ["contrast"], "severities": [1]}
    with pytest.raises(
        ValueError,
        match=r"got cat/a__001.png.png and cat/a/001.png, which would both be written as cat/a__001.png.JPEG",
    ):
        export_corrupted(tmp_path / "src", tmp_path / "c", resize=False, **kw)
    assert not (tmp_path / "c").exists()


def _folder_with_bomb(root: Path, w: int = 20000, h: int = 20000) -> Path:
    _folder(root, size=32)
    (root / "dog" / "bomb.png").write_bytes(_png_header(w, h))
    return root / "dog" / "bomb.png"


@pytest.mark.parametrize("size", [(20000, 20000), (10000, 10000)])  # over twice Pillow's limit, and just over it
def test_decompression_bomb_refused_from_its_header(tmp_path, size):
    bomb = _folder_with_bomb(tmp_path / "imgs", *size)
    # The file's data is cut short: had it been decoded, the error would say "unreadable", not the size.
    with pytest.raises(ValueError, match=r"at most \d+ pixels.*BNADAPT_MAX_PIXELS") as e:
        read_images(tmp_path / "imgs")
    assert str(bomb) in str(e.value) and "\n" not in str(e.value)


def test_decompression_bomb_at_the_command_line(tmp_path, capsys):
    bomb = _folder_with_bomb(tmp_path / "imgs")
    path = save_resnet20_checkpoint(tmp_path)
    argv = ["adapt", "--model", "cifar10_resnet20", "--checkpoint", str(path), "--images", str(tmp_path / "imgs")]
    assert main([*argv, "--out", str(tmp_path / "a.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bomb) in err and "BNADAPT_MAX_PIXELS" in err
    base = ["corrupt", "--input", str(tmp_path / "imgs"), "--profile", "imagenet", "--format", "imagenet-c"]
    base += ["--corruptions", "contrast", "--severities", "1", "--no-resize", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bomb) in err and "--skip-bad" in err
    assert not (tmp_path / "c").exists()  # the --out this run created is gone
    assert main([*base, "--out", str(tmp_path / "c"), "--skip-bad"]) == 0
    assert "of 6 images; 1 unreadable skipped" in capsys.readouterr().out
    assert len(list((tmp_path / "c").rglob("*.JPEG"))) == 6


def test_pixel_limit_can_be_lowered_and_raised(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    Image.new("RGB", (50, 50)).save(tmp_path / "a.png")
    monkeypatch.setenv("BNADAPT_MAX_PIXELS", "2000")
    with pytest.raises(ValueError, match="at most 2000 pixels, got .*a.png with 50x50 = 2500 pixels"):
        decode_image(tmp_path / "a.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone refuses 2500 pixels (over twice 1000)
    monkeypatch.setenv("BNADAPT_MAX_PIXELS", "5000")
    assert decode_image(tmp_path / "a.png").shape == (50, 50, 3)
    monkeypatch.setenv("BNADAPT_MAX_PIXELS", "many")
    with pytest.raises(ValueError, match="BNADAPT_MAX_PIXELS to be a number of pixels"):
        decode_image(tmp_path / "a.png")


def _no_space_cases():
    from safetensors import SafetensorError

    return {
        "numpy": OSError("200000 requested and 65408 written"),
        "torch": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
        "safetensors": SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        "errno": OSError(errno.ENOSPC, "No space left on device"),
    }


@pytest.mark.parametrize("kind", ["numpy", "torch", "safetensors", "errno"])
def test_no_space_errors_of_every_writer_are_recognised(tmp_path, kind):
    e = _no_space_cases()[kind]
    found = no_space_error(e, tmp_path / "x")
    assert found is not None and found.errno == errno.ENOSPC and found.filename == str(tmp_path / "x")
    assert no_space_error(RuntimeError("[enforce fail at inline_container.cc:300] . file not found"), "x") is None
    assert no_space_error(OSError(errno.EIO, "Input/output error"), "x") is None


def _full_disk(monkeypatch, module, attr: str, error: BaseException) -> None:
    def write_half_then_fail(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half")  # something written before the disk filled up
        raise error

    def numpy_save(file, array, *args, **kwargs):  # np.save(file, array): the file comes first
        file.write(b"half")
        raise error

    monkeypatch.setattr(module, attr, numpy_save if module is np else write_half_then_fail)


@pytest.mark.parametrize("out", ["a.pt", "a.safetensors"])
def test_adapt_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys, out):
    import safetensors.torch

    path = save_resnet20_checkpoint(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((4, 32, 32, 3), np.uint8))
    if out.endswith(".pt"):
        _full_disk(monkeypatch, torch, "save", _no_space_cases()["torch"])
    else:
        _full_disk(monkeypatch, safetensors.torch, "save_file", _no_space_cases()["safetensors"])
    (tmp_path / "o").mkdir()
    argv = ["adapt", "--model", "cifar10_resnet20", "--checkpoint", str(path), "--images", str(tmp_path / "x.npy")]
    assert main([*argv, "--n", "4", "--out", str(tmp_path / "o" / out)]) == 1
    err = capsys.readouterr().err.strip()
    assert (
        err == f"bnadapt: error: no space left on the device writing {tmp_path / 'o' / out}; finished outputs are "
        "kept: free space and rerun the same command to continue"
    )
    assert list((tmp_path / "o").iterdir()) == []


def test_corrupt_cifar_c_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
    _full_disk(monkeypatch, np, "save", _no_space_cases()["numpy"])  # numpy's own error has no errno
    argv = ["corrupt", "--input", str(tmp_path / "c.npz"), "--out", str(tmp_path / "out"), "--profile", "cifar"]
    assert main([*argv, "--format", "cifar-c", "--corruptions", "contrast", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no space left on the device writing" in err and "labels.npy" in err
    assert not (tmp_path / "out").exists()


def test_stale_temporaries_of_killed_runs_are_removed_on_the_next_run(tmp_path):
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))
    out = tmp_path / "out"
    export_corrupted(tmp_path / "c.npz", out, corruptions=["contrast"], severities=[1])
    dead, alive = _dead_pid(), os.getpid()
    stale = [out / f".contrast.npy.{dead}-k3x_9abc.tmp", out / f".fog.npy.{dead}-q1w2e3r4.tmp"]
    kept = [out / f".fog.npy.{alive}-z9y8x7w6.tmp", out / ".contrast.npy.bak", out / "notes.tmp"]
    for p in stale + kept:
        p.write_bytes(b"partial")
    # A complete rerun (contrast is finished: nothing is rewritten) still removes what the killed run left.
    assert [p.name for p in export_corrupted(tmp_path / "c.npz", out, corruptions=["contrast"], severities=[1])] == [
        "contrast.npy"
    ]
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)


def test_stale_imagenet_c_cell_folders_and_own_temporaries_are_removed(tmp_path):
    from bnadapt._io import atomic_path

    dead = _dead_pid()
    cell = tmp_path / "out" / "contrast" / f".1.{dead}-cell.tmp"
    (cell / "cat").mkdir(parents=True)
    (cell / "cat" / "0.JPEG").write_bytes(b"partial")
    src = _folder(tmp_path / "src", size=32)
    export_corrupted(src, tmp_path / "out", "imagenet-c", "imagenet", ["contrast"], [1], resize=False)
    assert not cell.exists() and len(list((tmp_path / "out").rglob("*.JPEG"))) == 6
    (tmp_path / f".a.pt.{dead}-abcd1234.tmp").write_bytes(b"partial")  # what a killed `adapt --out a.pt` left
    with atomic_path(tmp_path / "a.pt") as tmp:
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.glob(".a.pt*")) == []


def test_float_images_outside_zero_one_are_refused(tiny):
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for bad in (x * 255, x - 0.5, x.numpy() * 255):
        with pytest.raises(ValueError, match=r"float images in \[0, 1\].*divide by 255"):
            bnadapt.adapt(tiny, bad)
    with pytest.raises(ValueError, match="finite"):
        bnadapt.adapt(tiny, torch.where(x > 0.5, float("nan"), x))
    bnadapt.adapt(tiny, x)  # in range: fine, and uint8 is divided by 255 as always
    bnadapt.adapt(tiny, (x * 255).to(torch.uint8).permute(0, 2, 3, 1))


def _seq_and_volume_models():
    torch.manual_seed(0)
    seq = torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 3), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Conv1d(4, 3, 1)
    )
    vol = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3), torch.nn.BatchNorm3d(4), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 1)
    )
    g = torch.Generator().manual_seed(1)
    # Features on any scale: only images are held to [0, 1].
    return [(seq.eval(), torch.randn(6, 2, 12, generator=g) * 3), (vol.eval(), torch.randn(6, 2, 5, 6, 6, generator=g))]


@pytest.mark.parametrize("case", [0, 1], ids=["bn1d-sequences", "bn3d-volumes"])
def test_batchnorm1d_sequences_and_batchnorm3d_volumes_adapt(one_thread, case):
    net, x = _seq_and_volume_models()[case]
    inner = net[0](x)  # what the BN layer sees
    dims = [0, *range(2, inner.ndim)]
    replaced = bnadapt.adapt(net, x, method="replace")
    torch.testing.assert_close(replaced[1].running_mean, inner.mean(dims), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(replaced[1].running_var, inner.var(dims), atol=1e-5, rtol=1e-4)
    prior = bnadapt.adapt(net, x, method="prior", prior=16)
    between = (prior[1].running_mean - net[1].running_mean) / (replaced[1].running_mean - net[1].running_mean)
    assert ((between > 0) & (between < 1)).all()
    online = bnadapt.adapt(net, method="test-batch")
    trained = copy.deepcopy(net).train()
    with torch.no_grad():
        torch.testing.assert_close(online(x), trained(x), atol=1e-5, rtol=1e-5)
    sequential = bnadapt.adapt(net, x, method="sequential")  # one BN layer: what replace measures
    torch.testing.assert_close(sequential[1].running_mean, inner.mean(dims), atol=1e-5, rtol=1e-5)
    weights = auto_weights(net, x, options={"select": "none"})  # the shrinkage alone, no label-free choice
    assert list(weights) == ["1"] and all(0 <= w <= 1 for w in weights["1"])


@pytest.mark.parametrize("name", ["brightness", "saturate"])
def test_grey_luma_is_the_same_on_both_paths_for_every_level(name):
    # Every grey level, and colours: the numpy engine and the torch path round each product and sum alike (a BLAS
    # matrix product gave 13 of the 256 grey levels one level lower on some CPUs, and the suite flipped).
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(2, axis=1).repeat(2, axis=2)
    ref = corrupt(levels, name, 4, profile="cifar", seed=0)
    assert np.array_equal(corrupt(torch.from_numpy(levels), name, 4, profile="cifar", seed=0, backend="torch"), ref)


def _npz(compression: int = zipfile.ZIP_STORED, member: bytes | None = None) -> bytearray:
    f, g = io.BytesIO(), io.BytesIO()
    np.save(g, np.zeros((2, 32, 32, 3), np.uint8))
    with zipfile.ZipFile(f, "w", compression) as z:
        z.writestr("x.npy", g.getvalue() if member is None else member)
    return bytearray(f.getvalue())


def _patched(data: bytearray, offset: int, value: bytes) -> bytes:
    at = data.index(b"PK\x01\x02") + offset  # the central directory entry, which zipfile trusts
    data[at : at + len(value)] = value
    return bytes(data)


def _huge_member() -> bytes:
    g = io.BytesIO()
    np.lib.format.write_array_header_1_0(g, {"descr": "|u1", "fortran_order": False, "shape": (10**6, 10**6, 32, 3)})
    return g.getvalue() + bytes(64)


def _deflate_broken() -> bytes:
    data = _npz(zipfile.ZIP_DEFLATED)
    data[45:65] = b"\xff" * 20  # inside the compressed stream (after the 30-byte local header and the name)
    return bytes(data)


def _npy_bad_header() -> bytes:
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (2, 32, 32, 3, }".ljust(118) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(6144)


# Found by tests/test_properties.py (a flipped byte in an .npz), then the neighbours of each: every one escaped as a
# raw NotImplementedError, RuntimeError, zlib.error, tokenize.TokenError or MemoryError.
DAMAGED_NUMPY = {
    "unknown compression method": lambda: _patched(_npz(), 10, struct.pack("<H", 99)),
    "encrypted flag": lambda: _patched(_npz(), 8, b"\x09"),
    "broken deflate stream": _deflate_broken,
    "npy header that does not tokenize": _npy_bad_header,
    "150 bytes declaring 87 TiB": lambda: bytes(_npz(member=_huge_member())),
}


@pytest.mark.parametrize("case", DAMAGED_NUMPY)
def test_damaged_numpy_files_are_named_whatever_breaks(tmp_path, case):
    path = tmp_path / ("x.npy" if "npy header" in case else "x.npz")
    path.write_bytes(DAMAGED_NUMPY[case]())
    with pytest.raises(ValueError, match="expected a readable numpy file, got a damaged one") as e:
        read_images(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_pixel_limit_holds_on_the_device_decoding_path(tmp_path, monkeypatch):
    from bnadapt.data import FileImages

    for k in range(2):
        Image.new("RGB", (32, 32), (k, 0, 0)).save(tmp_path / f"{k}.jpg")
    images = FileImages([tmp_path / "0.jpg", tmp_path / "1.jpg"], np.zeros(2, np.int64))
    assert images.load(np.arange(2), on_device=True).shape == (2, 32, 32, 3)  # staged encoded, decoded by torchvision
    monkeypatch.setenv("BNADAPT_MAX_PIXELS", "1000")  # the device decoder has no limit of its own
    with pytest.raises(ValueError, match=r"at most 1000 pixels, got .*0.jpg with 32x32"):
        images.stage(np.arange(2), on_device=True)
