"""The model wrapper every loader returns, and its preprocessing record.

:class:`Classifier` puts a :class:`Normalize` layer in front of a network, so it takes float32 NCHW images in [0, 1];
its ``preprocessing`` dict records how images are brought to its input size. :func:`preprocess_of` reads that record
as a :class:`~bnadapt.data.Preprocess` for the readers, and :func:`override_preprocessing` changes it (timm's flags).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import torch
from torch import nn

from .data import Preprocess

__all__ = ["Classifier", "Normalize", "override_preprocessing", "preprocess_of"]

log = logging.getLogger(__name__)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; mean/std are buffers so they move with the model."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A network with its input normalisation in front: takes [0, 1] images.

    ``net`` is the user's network (its state dict keys are those of the original checkpoint); ``preprocessing``
    records how images should be prepared (e.g. resize/crop of torchvision weights) so results can state it.

    Example:
        >>> m = Classifier(nn.Flatten(), mean=(0.5,), std=(0.5,))
        >>> m(torch.ones(1, 1, 2, 2)).tolist()
        [[1.0, 1.0, 1.0, 1.0]]
    """

    def __init__(
        self, net: nn.Module, mean: Sequence[float], std: Sequence[float], preprocessing: dict | None = None
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.preprocessing = {"mean": list(mean), "std": list(std), **(preprocessing or {})}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _one_size(value, what: str) -> int | None:
    """A square size from an int, ``[n]``, ``[n, n]`` or ``[c, n, n]``; None (with a warning) when not square."""
    sizes = [int(value)] if isinstance(value, (int, float)) else [int(v) for v in value][-2:]
    if len(set(sizes)) != 1:
        log.warning("%s %s is not square: images are read as they are (pass --img-size N to resize them)", what, value)
        return None
    return sizes[0]


def preprocess_of(model: nn.Module) -> Preprocess | None:
    """How images are brought to ``model``'s input, from its ``preprocessing`` record; None when it names no input
    size (images are then read as they are).

    Torchvision weights and the built-ins record ``resize``/``crop``; timm models ``input_size`` and ``crop_pct``;
    a record with an input size only (the CIFAR ResNets) means the whole image, resized to it (``crop_pct`` 1).

    Example:
        >>> from bnadapt.models import cifar_resnet, efficientnet_lite0
        >>> preprocess_of(efficientnet_lite0())
        Preprocess(size=224, resize=256, interpolation='bilinear')
        >>> preprocess_of(cifar_resnet(20))
        Preprocess(size=32, resize=32, interpolation='bilinear')
    """
    prep = getattr(model, "preprocessing", None) or {}
    source = "crop" if prep.get("crop") is not None else "input_size"
    if prep.get(source) is None:
        return None
    size = _one_size(prep[source], f"the model's {source}")
    if size is None:
        return None
    interpolation = prep.get("interpolation") or "bilinear"
    if prep.get("crop_mode", "center") != "center":
        log.warning("the model's crop mode %r is read as timm's 'center' crop", prep["crop_mode"])
    if prep.get("resize") is not None:
        resize = _one_size(prep["resize"], "the model's resize")
        return None if resize is None else Preprocess(size, resize, interpolation)
    return Preprocess.from_crop_pct(size, prep.get("crop_pct") or 1.0, interpolation)


def override_preprocessing(
    model: Classifier,
    *,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    inplace: bool = False,
) -> Classifier:
    """``model`` with timm's ``--img-size``, ``--crop-pct``, ``--interpolation``, ``--mean`` and ``--std`` applied
    (None keeps the model's own value), recorded in its ``preprocessing``; a copy unless ``inplace``.

    A new ``img_size`` alone keeps the model's crop fraction; ``mean``/``std`` replace the normalisation in front of
    the network.

    Example:
        >>> from bnadapt.models import efficientnet_lite0
        >>> m = override_preprocessing(efficientnet_lite0(), img_size=192, interpolation="bicubic")
        >>> preprocess_of(m)
        Preprocess(size=192, resize=219, interpolation='bicubic')
    """
    if not isinstance(model, Classifier):
        raise ValueError(
            f"expected a bnadapt Classifier (from load_model) to change its preprocessing, got {type(model).__name__}"
        )
    channels = model.normalize.mean.shape[1]
    for name, given in (("mean", mean), ("std", std)):  # all checks first: an in-place change is all or nothing
        if given is not None and (len(given) != channels or not all(math.isfinite(float(v)) for v in given)):
            raise ValueError(f"expected {channels} finite --{name} values (one per channel), got {list(given)}")
    if std is not None and min(std) <= 0:
        raise ValueError(f"expected a positive --std for every channel, got {list(std)}")
    geometry = None
    if (img_size, crop_pct, interpolation) != (None, None, None):
        geometry = _new_geometry(model, img_size, crop_pct, interpolation)
    model = model if inplace else copy.deepcopy(model)
    if geometry is not None:
        model.preprocessing.update(
            input_size=[channels, geometry.size, geometry.size],
            resize=geometry.resize,
            crop=geometry.size,
            crop_pct=round(geometry.crop_pct, 6),
            interpolation=geometry.interpolation,
        )
    if mean is not None or std is not None:
        old = model.normalize.mean
        mean = [float(v) for v in mean] if mean is not None else model.preprocessing["mean"]
        std = [float(v) for v in std] if std is not None else model.preprocessing["std"]
        model.normalize = Normalize(mean, std).to(device=old.device, dtype=old.dtype)
        model.preprocessing.update(mean=list(mean), std=list(std))
    return model


def _new_geometry(model: Classifier, img_size: int | None, crop_pct: float | None, interpolation: str | None):
    """The model's resize/crop with the given values changed (a model that records none needs ``img_size``)."""
    base = preprocess_of(model)
    if base is None:
        if img_size is None:
            raise ValueError("expected --img-size N as well: the model records no input size to crop or resize to")
        base = Preprocess(img_size, img_size)
    return base.replace(size=img_size, crop_pct=crop_pct, interpolation=interpolation)
