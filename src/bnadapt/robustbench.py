"""RobustBench's common-corruption CIFAR models, read offline from their files (``robustbench:<dataset>/<name>``).

Our own code for their architectures, laid out as their state dicts so their checkpoints load as they come:
``WideResNet`` (TRADES' layout: ``block1.layer.0.bn1.weight``, ``convShortcut``, ``fc``) and ``CifarResNeXt``
(AugMix's layout: ``stage_1.0.conv_reduce.weight``, ``downsample``, ``classifier``). Files sit where RobustBench's
``load_model`` puts them, ``<model_dir>/<dataset>/corruptions/<name>.pt``; nothing is downloaded.

What each entry does to its input, as RobustBench's entry does: ``Standard`` takes [0, 1] images as they are; the
AugMix entries normalise with mean 0.5 and std 0.5 (their ``mu``/``sigma`` buffers). The normalisation is not part of
the network here: :func:`bnadapt.load_model` puts it in front, as for every other model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CifarResNeXt", "WideResNet", "ZooEntry", "checkpoint_path", "checkpoint_state", "entry", "zoo_names"]

THREAT_MODEL = "corruptions"  # the only RobustBench folder bnadapt reads
_AUGMIX_NORM = (0.5, 0.5, 0.5)


def _init_like_theirs(net: nn.Module) -> None:
    """Random init as their constructors do it (He-normal convolutions, unit BN, zero linear bias)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()
        elif isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.zero_()


class _WideBlock(nn.Module):
    """Pre-activation basic block; a 1x1 ``convShortcut`` where the width changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        # Their rule: a projection exactly when the channel count changes (stride alone never changes in a WRN).
        self.convShortcut = None if in_planes == out_planes else nn.Conv2d(in_planes, out_planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # Their block: the projection reads the activated input, the identity the raw one.
        shortcut = x if self.convShortcut is None else self.convShortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return shortcut + out


class _WideStage(nn.Module):
    """Their ``NetworkBlock``: the blocks under ``.layer``, as the keys say."""

    def __init__(self, blocks: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(
            *(
                _WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
                for i in range(blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen`` for 32x32 images (Zagoruyko & Komodakis 2016), in RobustBench's key layout.

    Example:
        >>> WideResNet(16, 1)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int = 28, widen: int = 10, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"expected a WideResNet depth of the form 6n+4 (16, 28, 40), got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = _WideStage(n, widths[0], widths[1], 1)
        self.block2 = _WideStage(n, widths[1], widths[2], 2)
        self.block3 = _WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        _init_like_theirs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        # Their fixed 8x8 pooling (the whole map of a 32x32 image), not a global mean: other sizes fail as in theirs.
        return self.fc(F.avg_pool2d(out, 8).flatten(1))


class _ResNeXtBlock(nn.Module):
    """Bottleneck of type C: 1x1 reduce, grouped 3x3, 1x1 expand (x4); ``downsample`` where the shape changes."""

    def __init__(self, inplanes: int, planes: int, cardinality: int, base_width: int, stride: int) -> None:
        super().__init__()
        width = int(math.floor(planes * (base_width / 64.0))) * cardinality
        self.conv_reduce = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(width)
        self.conv_conv = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.conv_expand = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(planes * 4)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)))
        out = F.relu(self.bn(self.conv_conv(out)))
        out = self.bn_expand(self.conv_expand(out))
        return F.relu((x if self.downsample is None else self.downsample(x)) + out)


class CifarResNeXt(nn.Module):
    """ResNeXt-``depth`` (``cardinality`` x ``base_width``d) for 32x32 images (Xie et al. 2017), in AugMix's key
    layout, as RobustBench uses it.

    Example:
        >>> CifarResNeXt(11, 2, 4)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, depth: int = 29, cardinality: int = 4, base_width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 9:
            raise ValueError(f"expected a ResNeXt depth of the form 9n+2 (11, 29, 38), got {depth}")
        n = (depth - 2) // 9
        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        inplanes, stages = 64, []
        for planes, stride in ((64, 1), (128, 2), (256, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_ResNeXtBlock(inplanes, planes, cardinality, base_width, stride if i == 0 else 1))
                inplanes = planes * 4
            stages.append(nn.Sequential(*blocks))
        self.stage_1, self.stage_2, self.stage_3 = stages
        self.classifier = nn.Linear(256 * 4, num_classes)
        _init_like_theirs(self)
        nn.init.kaiming_normal_(self.classifier.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_1(self.conv_1_3x3(x)))
        x = self.stage_3(self.stage_2(self.stage_1(x)))
        return self.classifier(F.avg_pool2d(x, 8).flatten(1))


@dataclass(frozen=True)
class ZooEntry:
    """One RobustBench model: its architecture (``build(num_classes)``), classes and input normalisation."""

    arch: str
    build: Callable[[int], nn.Module]
    num_classes: int
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)


def _wrn(depth: int, widen: int) -> Callable[[int], nn.Module]:
    return lambda k: WideResNet(depth, widen, k)


def _resnext29(k: int) -> nn.Module:
    return CifarResNeXt(29, 4, 32, k)


_ENTRIES: dict[str, ZooEntry] = {
    "cifar10/Standard": ZooEntry("WRN-28-10", _wrn(28, 10), 10),
    "cifar10/Hendrycks2020AugMix_WRN": ZooEntry("WRN-40-2", _wrn(40, 2), 10, _AUGMIX_NORM, _AUGMIX_NORM),
    "cifar10/Hendrycks2020AugMix_ResNeXt": ZooEntry("ResNeXt-29 32x4d", _resnext29, 10, _AUGMIX_NORM, _AUGMIX_NORM),
    "cifar100/Hendrycks2020AugMix_WRN": ZooEntry("WRN-40-2", _wrn(40, 2), 100, _AUGMIX_NORM, _AUGMIX_NORM),
    "cifar100/Hendrycks2020AugMix_ResNeXt": ZooEntry("ResNeXt-29 32x4d", _resnext29, 100, _AUGMIX_NORM, _AUGMIX_NORM),
}


def zoo_names() -> list[str]:
    """The RobustBench models bnadapt builds, as ``<dataset>/<name>`` (prefix them with ``robustbench:``).

    Example:
        >>> zoo_names()[0]
        'cifar10/Standard'
    """
    return list(_ENTRIES)


def entry(spec: str) -> ZooEntry:
    """The entry of ``<dataset>/<name>`` (as RobustBench spells both).

    Example:
        >>> entry("cifar10/Hendrycks2020AugMix_WRN").arch
        'WRN-40-2'
    """
    if spec not in _ENTRIES:
        raise ValueError(
            f"expected robustbench:<dataset>/<name>, one of {', '.join(_ENTRIES)} (corruptions models); got {spec!r}"
        )
    return _ENTRIES[spec]


def checkpoint_path(spec: str, model_dir: str | os.PathLike[str]) -> Path:
    """Where RobustBench keeps the file of ``spec`` under ``model_dir``; FileNotFoundError saying so when absent.

    Example:
        >>> checkpoint_path("cifar10/Standard", "models")  # doctest: +SKIP
        PosixPath('models/cifar10/corruptions/Standard.pt')
    """
    entry(spec)
    dataset, name = spec.split("/", 1)
    path = Path(model_dir) / dataset / THREAT_MODEL / f"{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"expected RobustBench's checkpoint of robustbench:{spec} at {path}, found none; bnadapt never downloads: "
            f"put their {name}.pt there (as robustbench.utils.load_model saves it), or pass --model-dir DIR"
        )
    return path


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def checkpoint_state(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], tuple[list, list] | None]:
    """A loaded RobustBench file as (state dict, its ``mu``/``sigma`` normalisation or None), unwrapped as their
    loader does: the dict under ``state_dict`` when there is one, ``module.`` and ``model.`` prefixes dropped.

    Example:
        >>> state, norm = checkpoint_state({"state_dict": {"module.fc.bias": torch.zeros(2)}}, Path("x.pt"))
        >>> list(state), norm
        (['fc.bias'], None)
    """
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(
            f"expected a state dict of tensors in {path} (optionally under 'state_dict'), got another file"
        )
    state = _strip(_strip(obj, "module."), "model.")
    # Some of their files carry the AugMix entries' normalisation buffers; their loader then uses those values.
    mu, sigma = state.pop("mu", None), state.pop("sigma", None)
    norm = None if mu is None or sigma is None else (mu.flatten().tolist(), sigma.flatten().tolist())
    return state, norm
