"""EfficientNet-Lite0/1/2 (Tan & Le 2019; the TF "lite" variants), laid out like efficientnet_pytorch's state dicts.

Lite differs from EfficientNet-B0..B2 in three ways that matter here: no squeeze-excitation, ReLU6 instead of swish, and
a fixed 32-channel stem and 1280-channel head (also when scaled up, which fixes the first and last stages' repeats).
The published weights were trained in TensorFlow, whose "SAME" padding pads stride-2 convolutions asymmetrically (the
extra row/column goes at the bottom/right); PyTorch's symmetric ``padding=`` would shift every stride-2 feature map by
one pixel, so convolutions pad themselves TF-style here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EfficientNetLite", "LITE0_STAGES", "LITE_PARAMS", "lite_stages", "lite_net"]

# (kernel, stride, expand ratio, output channels, repeats): the seven MBConv stages of EfficientNet-B0.
LITE0_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)

# (width, depth, resolution, dropout) of each variant: efficientnet_lite_builder.py's efficientnet_lite_params, which
# the efficientnet-lite-pytorch package copies (checked against the wheels' weight shapes in the tests).
LITE_PARAMS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}

# TF's BatchNormalization defaults used in training: epsilon 1e-3, decay 0.99 (torch momentum = 1 - decay).
_BN = {"eps": 1e-3, "momentum": 0.01}


def _round_filters(channels: int, width: float, divisor: int = 8) -> int:
    # TF's round_filters: the nearest multiple of divisor, but never more than 10% below the scaled width.
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def lite_stages(width: float, depth: float) -> tuple[tuple[int, int, int, int, int], ...]:
    """:data:`LITE0_STAGES` scaled as TF's Lite builder does: channels ``width`` times (multiples of 8), repeats
    ``ceil(depth * repeats)``, except the first and last stage, whose repeats Lite keeps with its fixed stem and head.

    Example:
        >>> [s[3:] for s in lite_stages(1.1, 1.2)]
        [(16, 1), (24, 3), (48, 3), (88, 4), (120, 4), (208, 5), (352, 1)]
    """
    last = len(LITE0_STAGES) - 1
    return tuple(
        (k, s, e, _round_filters(c, width), r if i in (0, last) else math.ceil(depth * r))
        for i, (k, s, e, c, r) in enumerate(LITE0_STAGES)
    )


class SameConv2d(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow "SAME" padding, computed from the input size (so any image size works).

    Output size is ``ceil(input / stride)``; when the total padding is odd the extra pixel goes after (bottom/right),
    as in TF. For 1x1 or stride-1 odd kernels this equals symmetric padding.

    Example:
        >>> SameConv2d(1, 1, 3, stride=2)(torch.zeros(1, 1, 224, 224)).shape
        torch.Size([1, 1, 112, 112])
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1], strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: [1x1 expand] -> kxk depthwise -> 1x1 project (+ identity)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:  # attribute names follow the checkpoint's keys (_expand_conv, _bn0, ...)
            self._expand_conv = SameConv2d(in_ch, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, **_BN)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **_BN)
        self._project_conv = SameConv2d(mid, out_ch, 1)
        self._bn2 = nn.BatchNorm2d(out_ch, **_BN)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))  # linear bottleneck: no activation after the projection
        # Drop-connect only acts in training; inference adds the identity as is.
        return out + x if self.residual else out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite: stem, MBConv blocks, head, classifier; by default Lite0 (16 blocks, 49 BN layers).

    Takes normalised images (``(x*255 - 127) / 128`` for the published weights); any size, Lite0 trained at 224.
    :func:`lite_net` builds the other variants.

    Example:
        >>> EfficientNetLite()(torch.zeros(1, 3, 64, 64)).shape
        torch.Size([1, 1000])
    """

    def __init__(
        self, num_classes: int = 1000, stages=LITE0_STAGES, stem: int = 32, head: int = 1280, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, stem, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(stem, **_BN)
        blocks, in_ch = [], stem
        for kernel, stride, expand, out_ch, repeats in stages:
            for i in range(repeats):
                blocks.append(MBConv(in_ch, out_ch, kernel, stride if i == 0 else 1, expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(in_ch, head, 1)
        self._bn1 = nn.BatchNorm2d(head, **_BN)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(head, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # He init on fan-out (as the TF reference) keeps activations from vanishing through 16 blocks at random init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(self._dropout(x.mean(dim=(2, 3))))


def lite_net(name: str = "efficientnet_lite0", num_classes: int = 1000) -> EfficientNetLite:
    """The randomly initialised network of a Lite variant named in :data:`LITE_PARAMS` (no input scaling in front).

    Example:
        >>> len(lite_net("efficientnet_lite2")._blocks)
        21
    """
    if name not in LITE_PARAMS:
        raise ValueError(f"expected an EfficientNet-Lite variant, one of {', '.join(LITE_PARAMS)}; got {name!r}")
    width, depth, _, dropout = LITE_PARAMS[name]
    return EfficientNetLite(num_classes, lite_stages(width, depth), dropout=dropout)
