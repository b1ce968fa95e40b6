"""Two online BN-statistics methods of the test-time adaptation literature, as their reference code defines them.

- ``rbn``: RoTTA's robust BatchNorm (Yuan et al., CVPR 2023; ``RobustBN2d`` in BIT-DA/RoTTA
  ``core/utils/bn_layers.py``). Global statistics start from the source's; every batch first moves them by
  ``momentum`` (0.05, RoTTA's ``ALPHA``) towards its own mean and *biased* variance, and is then normalised with the
  moved global statistics, not its own. That is ``ema`` with RoTTA's momentum and variance.
- ``dua``: DUA, "The Norm Must Go On" (Mirza et al., CVPR 2022; jmiemirza/DUA ``methods/dua.py``). Every incoming
  image becomes a batch of ``copies`` (64) augmented copies (random crop of the zero-padded image, horizontal flip,
  rotation by a multiple of 90 degrees), which one train-mode forward sends through the network with momentum
  ``momentum * decay**t + min_momentum`` for the t-th image (0.1, 0.94, 0.005), updating the running statistics.
  The image is then predicted in eval mode, with the updated statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapt import AdaptConfig, register_method
from ..bn import bn_layers, iter_batches, model_device
from .online import attach_ema, check_momentum

__all__ = ["DUA", "augmented_copies", "dua_momentum"]


@register_method("rbn", images="optional", online=True, options={"momentum": 0.05}, check=check_momentum)
def rbn(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """Global statistics moved towards each batch's (biased variance) before it is normalised with them."""
    # RoTTA measures the batch variance with unbiased=False; ema keeps PyTorch's unbiased running update.
    return attach_ema(model, images, cfg, layers, cfg.options["momentum"], correction=0)


def dua_momentum(step: int, momentum: float = 0.1, decay: float = 0.94, min_momentum: float = 0.005) -> float:
    """The momentum of DUA's update on its ``step``-th image (1 for the first): ``momentum * decay**step +
    min_momentum``, as the reference code computes it (the decay is applied before the first update).

    Example:
        >>> round(dua_momentum(1), 6), round(dua_momentum(200), 6)
        (0.099, 0.005)
    """
    return momentum * decay**step + min_momentum


def augmented_copies(image: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
    """``copies`` augmented copies (copies, C, H, W) of one (C, H, W) image, DUA's augmentation.

    Each copy is a random H x W crop of the image zero-padded by ``min(H, W) // 8`` pixels per side (DUA's 4 pixels
    at 32 x 32), flipped horizontally with probability 1/2, then rotated by a random multiple of 90 degrees (of 180
    degrees for a non-square image, whose copies must keep one shape). Draws come from ``generator`` (CPU).

    Example:
        >>> x = augmented_copies(torch.rand(3, 32, 32), 64, torch.Generator().manual_seed(0))
        >>> tuple(x.shape)
        (64, 3, 32, 32)
    """
    _, h, w = image.shape
    pad = min(h, w) // 8
    oy = torch.randint(0, 2 * pad + 1, (copies,), generator=generator)
    ox = torch.randint(0, 2 * pad + 1, (copies,), generator=generator)
    flip = torch.rand(copies, generator=generator) < 0.5
    turns = torch.randint(0, 4 if h == w else 2, (copies,), generator=generator) * (1 if h == w else 2)
    padded = nn.functional.pad(image, (pad, pad, pad, pad))
    rows = (oy[:, None] + torch.arange(h)).to(image.device)
    cols = (ox[:, None] + torch.arange(w)).to(image.device)
    out = padded[:, rows[:, :, None], cols[:, None, :]].transpose(0, 1)  # (copies, C, H, W)
    out = torch.where(flip.to(image.device)[:, None, None, None], out.flip(-1), out)
    for k in (1, 2, 3):
        chosen = (turns == k).nonzero().flatten().to(image.device)
        if len(chosen):
            out[chosen] = torch.rot90(out[chosen], k, dims=(-2, -1))
    return out


@torch.no_grad()
def _momentum_forward(net: nn.Module, layers: list[nn.Module], x: torch.Tensor, momentum: float, part: str) -> None:
    """One forward of ``x`` with ``layers`` in train mode at ``momentum`` (PyTorch's running update, unbiased
    variance); the rest of ``net`` stays as it is. The statistic ``part`` leaves out is put back."""
    kept = [(b.running_mean.clone(), b.running_var.clone()) for b in layers]
    saved = [(b.momentum, b.training) for b in layers]
    try:
        for b in layers:
            b.momentum = momentum
            b.train()
        net(x)
    finally:
        for b, (m, mode) in zip(layers, saved, strict=True):
            b.momentum = m
            b.train(mode)
    if part != "both":
        for b, (mean, var) in zip(layers, kept, strict=True):
            (b.running_mean if part == "var" else b.running_var).copy_(mean if part == "var" else var)


class DUA(nn.Module):
    """Wraps ``net`` (kept as ``.net``) and adapts its BN layers ``layers`` on every image it is called with, before
    predicting them. Build it with :func:`bnadapt.adapt` (``method="dua"``).

    Example:
        >>> from bnadapt import adapt
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2)).eval()
        >>> model = adapt(net, method="dua", options={"copies": 8})
        >>> with torch.inference_mode():
        ...     logits = model(torch.rand(2, 3, 8, 8))  # two updates, then the prediction
        >>> model.step
        2
        >>> model.reset()  # back to the state adapt() returned
    """

    def __init__(self, net: nn.Module, layers: list[str], options: dict, part: str, seed: int | None) -> None:
        super().__init__()
        self.net = net
        self.layers = list(layers)
        self.options = dict(options)
        self.part = part
        self.step = 0
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self._initial: tuple = ()
        self.snapshot()

    def _bn(self) -> list[nn.Module]:
        found = dict(bn_layers(self.net))
        return [found[name] for name in self.layers]

    def snapshot(self) -> None:
        """Make the current statistics, image count and random state the ones :meth:`reset` returns to."""
        buffers = [{k: b.clone() for k, b in m.named_buffers(recurse=False)} for m in self._bn()]
        self._initial = (buffers, self.step, self.generator.get_state())

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the statistics, the momentum schedule and the augmentations' random state of the last snapshot."""
        buffers, self.step, state = self._initial
        for m, saved in zip(self._bn(), buffers, strict=True):
            for k, b in saved.items():
                getattr(m, k).copy_(b)
        self.generator.set_state(state)

    def adapt_images(self, x: torch.Tensor) -> None:
        """One DUA update per image of ``x`` (N, C, H, W), in order."""
        if x.ndim != 4:
            raise ValueError(f"expected dua's images as (N, C, H, W), got shape {tuple(x.shape)}; pass image batches")
        layers = self._bn()
        o = self.options
        for image in x:
            self.step += 1
            m = dua_momentum(self.step, o["momentum"], o["decay"], o["min_momentum"])
            batch = augmented_copies(image, o["copies"], self.generator)
            _momentum_forward(self.net, layers, batch, m, self.part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.adapt_images(x)
        return self.net(x)


def _check_dua(options: dict) -> None:
    """Refuse bad dua option values (called by the registry whenever options are parsed)."""
    m, decay, low, copies = options["momentum"], options["decay"], options["min_momentum"], options["copies"]
    if not 0.0 < m <= 1.0:
        raise ValueError(f"expected dua option momentum in (0, 1], got momentum={m}")
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"expected dua option decay in (0, 1], got decay={decay}")
    if not low >= 0.0 or m * decay + low > 1.0:  # "not >=" also refuses NaN
        raise ValueError(
            f"expected dua option min_momentum >= 0 with momentum * decay + min_momentum <= 1, got "
            f"min_momentum={low} (momentum={m}, decay={decay}); lower one of them"
        )
    if copies < 2:
        raise ValueError(f"expected dua option copies >= 2 augmented copies per image, got copies={copies}")


@register_method(
    "dua",
    images="optional",
    online=True,
    options={"momentum": 0.1, "decay": 0.94, "min_momentum": 0.005, "copies": 64},
    check=_check_dua,
    random=True,
)
def dua(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """A :class:`DUA` wrapper; given images, it first adapts on them, one image at a time."""
    wrapper = DUA(model.eval(), layers, dict(cfg.options), cfg.part, cfg.seed)
    if images is not None:
        device = model_device(model, cfg.device)
        with torch.no_grad():
            for x in iter_batches(images, cfg.batch_size):
                wrapper.adapt_images(x.to(device))
        wrapper.snapshot()
    return wrapper
