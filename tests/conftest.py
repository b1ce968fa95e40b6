"""Shared test fixtures: tiny random-init BN nets, the ../shared data location, and the marker policy."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

SHARED = Path(os.environ.get("BNADAPT_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow test: pass --runslow to run it")
    skip_shared = pytest.mark.skip(reason=f"needs the read-only data folder ../shared, not found at {SHARED}")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "shared" in item.keywords and not SHARED.is_dir():
            item.add_marker(skip_shared)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """bnadapt's cache (the prepared images of generate:imagenet folders) in a temporary folder, never ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BNADAPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def shared() -> Path:
    """Path of ../shared (tests using it must carry the `shared` marker)."""
    return SHARED


_REF_FILES = {"cifar": "cifar_ref16.npz", "imagenet": "imagenet_ref4.npz"}


@functools.cache
def _reference_array(profile: str, key: str) -> np.ndarray:
    # np.load decompresses a key on every access: each array is read once per test session.
    with np.load(SHARED / "reference" / "corruptions" / _REF_FILES[profile]) as ref:
        return ref[key]


class reference_set:  # noqa: N801 - used like a function returning a mapping
    """The original code's outputs for one profile: ``reference_set("cifar")["fog"][severity - 1]``, ``["clean"]``."""

    def __init__(self, profile: str) -> None:
        self.profile = profile

    def __getitem__(self, key: str) -> np.ndarray:
        return _reference_array(self.profile, key)


def replay(name: str, profile: str, severity: int, clean: np.ndarray) -> np.ndarray:
    """Our engine with the original's call sequence: np.random.seed(i) before fixture image i."""
    from bnadapt.corruptions import corrupt

    return corrupt(clean, name, severity, profile=profile, seed="legacy")


class TinyNet(nn.Module):
    """Conv-BN-ReLU x2, a BN1d head and dropout: every kind of BN layer the core must handle."""

    def __init__(self, in_ch: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(16, 12)
        self.bn3 = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.drop(x.mean(dim=(2, 3)))
        return self.fc2(torch.relu(self.bn3(self.fc1(x))))


def make_tiny(seed: int = 0, in_ch: int = 3) -> TinyNet:
    """A TinyNet with random weights and non-trivial source statistics, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    net = TinyNet(in_ch)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return net.eval()


@pytest.fixture
def one_thread():
    """Tiny tensors: torch's thread pool only adds spin-waits (many times slower on a busy 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny() -> TinyNet:
    return make_tiny()


def save_resnet20_checkpoint(folder: Path) -> Path:
    """Save a random-init CIFAR ResNet-20 with non-trivial BN statistics as ``folder/ck.pt`` (network-free)."""
    from bnadapt.models import cifar_resnet

    torch.manual_seed(0)
    net = cifar_resnet(20).net
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
    torch.save({"state_dict": net.state_dict()}, folder / "ck.pt")
    return folder / "ck.pt"


@pytest.fixture
def resnet20_checkpoint(tmp_path: Path) -> Path:
    """A random-init CIFAR ResNet-20 with non-trivial BN statistics, saved as ``tmp_path/ck.pt``."""
    return save_resnet20_checkpoint(tmp_path)


def write_jpeg(path: Path, w: int, h: int, seed: int) -> np.ndarray:
    """A smooth w x h RGB JPEG (quality 90) at ``path``; returns the pixels it encoded."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    # Smooth content so that JPEG decoders agree closely; noise would magnify IDCT differences.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], -1)
    img = np.clip(base + rng.integers(0, 20, 3), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=90)
    return img


def write_imagenet_c(root: Path, size: int) -> None:
    """An ImageNet-C-layout folder: fog/1-2/<2 wnids>/3 smooth JPEGs of size x size each."""
    for c in ("fog",):
        for s in (1, 2):
            for k, wnid in enumerate(("n01440764", "n01443537")):
                for j in range(3):
                    write_jpeg(root / c / str(s) / wnid / f"ILSVRC2012_val_{k}{j}.JPEG", size, size, 10 * k + j + s)
