"""Reliability, round 2 (first cases): loops of links, damaged BN statistics in checkpoints, absurd labels, a
byte-order mark, --first/--last beyond the model, half-precision models, a read-only --out."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bnadapt
from bnadapt import BNStats
from bnadapt.cli import app, main
from bnadapt.data import open_clean, read_images
from bnadapt.models import cifar_resnet, load_model
from conftest import save_resnet20_checkpoint


def _folder(root: Path) -> Path:
    for label, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i + label, np.uint8)).save(root / cls / f"{i}.png")
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
