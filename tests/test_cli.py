"""The command line: end-to-end adapt, outputs that load back, one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from bnadapt import BNStats, load_model
from bnadapt.cli import main


@pytest.fixture
def setup(tmp_path, resnet20_checkpoint):
    x = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "imgs.npz", x=x, y=np.zeros(40, np.int64))
    return tmp_path


def _args(p, *extra):
    return ["adapt", "--model", "cifar10_resnet20", "--checkpoint", str(p / "ck.pt"), "--images", str(p / "imgs.npz"),
            *extra]  # fmt: skip


def test_adapt_pt_round_trip(setup, capsys):
    before = (setup / "ck.pt").read_bytes()
    assert main(_args(setup, "--n", "32", "--out", str(setup / "a.pt"))) == 0
    assert "adapted 19 BN layers" in capsys.readouterr().out
    assert (setup / "ck.pt").read_bytes() == before  # the input checkpoint is untouched
    adapted = load_model("cifar10_resnet20", checkpoint=setup / "a.pt")
    source = load_model("cifar10_resnet20", checkpoint=setup / "ck.pt")
    assert not torch.equal(adapted.net.bn1.running_mean, source.net.bn1.running_mean)
    assert torch.equal(adapted.net.conv1.weight, source.net.conv1.weight)
    meta = torch.load(setup / "a.pt", weights_only=True)["bnadapt"]
    assert meta["method"] == "replace" and meta["n"] == "32"


def test_adapt_safetensors_applies_to_model(setup):
    assert main(_args(setup, "--method", "prior", "--prior", "8", "--out", str(setup / "s.safetensors"))) == 0
    stats = BNStats.load(setup / "s.safetensors")
    assert stats.metadata["method"] == "prior" and len(stats.names) == 19
    main(_args(setup, "--out", str(setup / "a.pt"), "--method", "prior", "--prior", "8"))
    model = stats.apply_to(load_model("cifar10_resnet20", checkpoint=setup / "ck.pt"))
    ref = load_model("cifar10_resnet20", checkpoint=setup / "a.pt")
    assert torch.equal(model.net.bn1.running_var, ref.net.bn1.running_var)


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (("--n", "41", "--out", "{p}/o.pt"), "n <= the number of images"),
        (("--out", "{p}/imgs.npz/o.pt"), "got a file"),
        (("--out", "{p}/o.txt"), ".safetensors"),
        (("--method", "test-batch", "--out", "{p}/o.pt"), "adapts while it runs"),
        (("--method", "nope", "--out", "{p}/o.pt"), "invalid choice"),
        (("--n", "0", "--out", "{p}/o.pt"), "positive integer"),
        (("--layers", "head*", "--out", "{p}/o.pt"), "matched none"),
    ],
)
def test_bad_input_one_line_exit_2(setup, capsys, extra, match):
    try:
        code = main(_args(setup, *[e.format(p=setup) for e in extra]))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not list(setup.glob("o.*")) and not list(setup.glob(".o.*"))


def test_unknown_model_and_bad_images(setup, capsys):
    assert main(["adapt", "--model", "resnet9", "--images", str(setup / "imgs.npz"), "--out", str(setup / "o.pt")]) == 2
    assert "cifar10_resnet20" in capsys.readouterr().err
    np.save(setup / "four.npy", np.zeros((4, 32, 32, 4), np.uint8))
    assert main(_args(setup, "--out", str(setup / "o.pt")) [:-4] + ["--images", str(setup / "four.npy"),
                "--out", str(setup / "o.pt")]) == 2  # fmt: skip
    assert "C = 1 or 3" in capsys.readouterr().err


def test_no_bn_model(tmp_path, capsys):
    """A checkpoint loads into an architecture; a model with no BN is refused by the library (exit 2 via CLI)."""
    from bnadapt import adapt

    with pytest.raises(ValueError, match="BatchNorm"):
        adapt(torch.nn.Linear(2, 2), torch.rand(4, 2, 1, 1))


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "bnadapt", "--help"], capture_output=True, text=True, check=True)
    assert "adapt" in out.stdout and "demo" in out.stdout
