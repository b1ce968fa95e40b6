"""The online methods that keep no parameters: ``test-batch`` and ``ema``, and the protocol every online method's
model follows: :func:`reset` returns it to the state :func:`bnadapt.adapt` gave it.

- ``test-batch``: every inference batch is normalised with its own statistics (Nado et al. 2020; tent's "norm").
- ``ema``: each inference batch first moves the running statistics by option ``momentum`` towards its own, then is
  normalised with them, for deployments that see an endless stream. Given images, it first streams them.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ..adapt import AdaptConfig, register_method
from ..bn import EMAUpdate, bn_layers, iter_batches, model_device, use_batch_stats

__all__ = ["Resettable", "attach_ema", "check_momentum", "reset"]


@runtime_checkable
class Resettable(Protocol):
    """An online method's model that can go back to the state adapt() returned (tent's and bank's models)."""

    def reset(self) -> None: ...


def reset(model: nn.Module) -> nn.Module:
    """Return an online method's adapted ``model`` to the state :func:`bnadapt.adapt` gave it, in place.

    Models with their own ``reset()`` (:class:`Resettable`) use it; ``ema``'s layers get back the statistics they
    had; ``test-batch`` keeps no state. Returns the model.

    Example:
        >>> from bnadapt import adapt
        >>> net = adapt(nn.Sequential(nn.BatchNorm2d(2)).eval(), method="ema", momentum=0.5)
        >>> _ = net(torch.full((2, 2, 3, 3), 4.0))
        >>> reset(net)[0].running_mean.tolist()
        [0.0, 0.0]
    """
    if isinstance(model, Resettable):
        model.reset()
        return model
    for layer in model.modules():
        for hook in layer._forward_pre_hooks.values():
            if isinstance(hook, EMAUpdate):
                hook.restore(layer)
    return model


@register_method("test-batch", images="unused", online=True)
def test_batch(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """Every batch normalised with its own statistics."""
    use_batch_stats(model, layers, cfg.part, "test-batch")
    return model


def check_momentum(options: dict) -> None:
    """Refuse an EMA ``momentum`` option outside (0, 1] (the check of ``ema`` and ``rbn``).

    Example:
        >>> check_momentum({"momentum": 0.05})
    """
    if not 0.0 < options["momentum"] <= 1.0:
        raise ValueError(f"expected momentum in (0, 1], got {options['momentum']}")


def attach_ema(
    model: nn.Module, images, cfg: AdaptConfig, layers: list[str], momentum: float, correction: int = 1
) -> nn.Module:
    """Give each of ``layers`` an :class:`~bnadapt.bn.EMAUpdate` hook (``momentum``, batch variance with
    ``correction``), then stream ``images`` (if any) through ``model``; :func:`reset` returns to the statistics after
    them. The body of ``ema`` and ``rbn``.

    Example:
        >>> net = attach_ema(nn.Sequential(nn.BatchNorm2d(2)).eval(), None, AdaptConfig(), ["0"], 0.5)
        >>> _ = net(torch.full((2, 2, 3, 3), 4.0))
        >>> net[0].running_mean.tolist()
        [2.0, 2.0]
    """
    found = dict(bn_layers(model))
    hooks = {name: EMAUpdate(found[name], momentum, cfg.part, correction) for name in layers}
    for name, hook in hooks.items():
        found[name].register_forward_pre_hook(hook)
    if images is not None:
        device = model_device(model, cfg.device)
        with torch.no_grad():
            model.eval()
            for x in iter_batches(images, cfg.batch_size):
                model(x.to(device))
        for name, hook in hooks.items():
            hook.snapshot(found[name])  # reset() returns to the statistics after the given images
    return model


@register_method("ema", images="optional", online=True, options={"momentum": 0.1}, check=check_momentum)
def ema(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """Running statistics moved towards each batch's before it is normalised."""
    return attach_ema(model, images, cfg, layers, cfg.options["momentum"])
