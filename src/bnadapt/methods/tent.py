"""``tent``: test-time entropy minimisation over the normalisation layers' affine parameters (Wang et al., ICLR 2021).

The adapted model normalises every batch with its own statistics (as ``test-batch``) and, on every forward call,
takes ``steps`` optimiser steps that lower the mean softmax entropy of its predictions on that batch. Only the
selected BN layers' weight and bias learn; every other parameter stays frozen. Like the paper's code, a call returns
the logits computed *before* its (last) update, so each batch is predicted once, without a second forward.

A model without BatchNorm (a ViT, a GroupNorm ResNet) learns the weight and bias of its LayerNorm and GroupNorm layers
instead, as SAR and the other test-time adaptation repositories run tent on ViTs; those layers have no running
statistics, so nothing else changes. A model with BN layers keeps the paper's choice: BN only.

Online by default: the parameters keep moving across batches, so the result depends on the batch size and on the
order of the stream. ``episodic=True`` returns to the starting state after every batch instead.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..adapt import AdaptConfig, register_method
from ..bn import bn_layers, iter_batches, use_batch_stats

log = logging.getLogger(__name__)

__all__ = ["Tent", "softmax_entropy"]

OPTIMIZERS = ("adam", "sgd")


def softmax_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per row, in float32 (so it stays accurate under autocast).

    Example:
        >>> softmax_entropy(torch.zeros(1, 4)).item() == torch.log(torch.tensor(4.0)).item()
        True
    """
    logits = logits.float()
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def _check_options(opts: dict[str, Any]) -> None:
    """Refuse bad tent option values (called by the registry whenever options are parsed)."""
    if not opts["lr"] > 0:  # also refuses NaN
        raise ValueError(f"expected tent option lr > 0 (e.g. lr=0.001), got lr={opts['lr']}")
    if opts["steps"] < 1:
        raise ValueError(f"expected tent option steps >= 1 optimiser steps per batch, got steps={opts['steps']}")
    if opts["optimizer"] not in OPTIMIZERS:
        choices = ", ".join(OPTIMIZERS)
        raise ValueError(f"expected tent option optimizer to be one of {choices}, got {opts['optimizer']!r}")


# Normalisation layers without running statistics whose affine parameters tent learns on a model without BN.
NORM_TYPES = (nn.LayerNorm, nn.GroupNorm)


def _affine_params(net: nn.Module, layers: list[str]) -> list[nn.Parameter]:
    """Freeze every parameter of ``net`` except the selected BN layers' weight and bias (on a model without BN
    layers: every LayerNorm/GroupNorm layer's), and return those."""
    found = dict(bn_layers(net))
    if found:
        params = [p for name in layers for p in (found[name].weight, found[name].bias) if p is not None]
    else:
        norms = [m for m in net.modules() if isinstance(m, NORM_TYPES)]
        params = [p for m in norms for p in (m.weight, m.bias) if p is not None]
        if not params:
            kinds = "/".join(t.__name__ for t in NORM_TYPES)
            raise ValueError(
                f"expected BatchNorm or {kinds} layers with affine weight and bias for tent to learn, got none; "
                "tent needs normalisation layers to adapt"
            )
    if not params:
        raise ValueError(
            "expected BN layers with affine weight and bias for tent to learn, got none (affine=False); "
            "use test-batch, which needs no parameters"
        )
    net.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


class Tent(nn.Module):
    """Wraps ``net`` (kept as ``.net``, so its state dict and BN layers keep their names) and adapts it per call.

    Build it with :func:`bnadapt.adapt` (``method="tent"``), which also puts the BN layers in batch-statistics mode
    (a model without BN layers keeps its LayerNorm/GroupNorm layers as they are, and learns their affine parameters).

    Example:
        >>> from bnadapt import adapt
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2)).eval()
        >>> model = adapt(net, method="tent", options={"lr": 0.01})
        >>> with torch.inference_mode():
        ...     logits = model(torch.rand(8, 3, 8, 8))  # predicts, then takes one step
        >>> model.reset()  # back to the state adapt() returned
    """

    def __init__(
        self, net: nn.Module, params: list[nn.Parameter], lr: float, optimizer: str, steps: int, episodic: bool
    ) -> None:
        super().__init__()
        self.net = net
        self.steps = steps
        self.episodic = episodic
        # Plain attributes, not submodules: the optimiser refers to net's parameters, and copy.deepcopy of the
        # wrapper copies both with one memo, so a copy's optimiser steps the copy's parameters.
        self._params = params
        if optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
        else:
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
        self._initial: tuple[list[torch.Tensor], dict] = ([], {})
        self.snapshot()

    def snapshot(self) -> None:
        """Make the current parameters and optimiser state the ones :meth:`reset` (and ``episodic``) return to."""
        self._initial = ([p.detach().clone() for p in self._params], copy.deepcopy(self.optimizer.state_dict()))

    @torch.no_grad()
    def reset(self) -> None:
        """Restore the affine parameters and the optimiser state to the last snapshot (what adapt() returned)."""
        values, state = self._initial
        for p, v in zip(self._params, values, strict=True):
            p.copy_(v)
        self.optimizer.load_state_dict(copy.deepcopy(state))

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        # .to()/.cuda() move the parameters in place; the optimiser's moments must follow them.
        out = super()._apply(fn, *args, **kwargs)
        self.optimizer.load_state_dict(self.optimizer.state_dict())
        return out

    def adapt_batch(self, x: torch.Tensor) -> torch.Tensor:
        """Take ``steps`` entropy steps on batch ``x``; return the (detached) logits of the last step's forward."""
        # The benchmark evaluates under inference_mode, where no graph can be recorded: leave it for the update.
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone()  # an inference tensor cannot be saved for backward; its clone is a normal tensor
            for _ in range(self.steps):
                logits = self.net(x)
                loss = softmax_entropy(logits).mean()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        return logits.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.adapt_batch(x)
        if self.episodic:
            self.reset()
        return logits


@register_method(
    "tent",
    images="optional",
    online=True,
    options={"lr": 1e-3, "optimizer": "adam", "steps": 1, "episodic": False},
    check=_check_options,
    needs_bn=False,
)
def tent(model: nn.Module, images, cfg: AdaptConfig, layers: list[str]) -> nn.Module:
    """test-batch plus entropy steps on the BN (else LayerNorm/GroupNorm) affine parameters, as a :class:`Tent`."""
    opts = cfg.options  # checked by _check_options when adapt() parsed them
    params = _affine_params(model, layers)  # before use_batch_stats: bn_layers() only lists layers with buffers
    use_batch_stats(model, layers, cfg.part, "tent")
    device = cfg.device or params[0].device
    wrapper = Tent(model.eval(), params, opts["lr"], opts["optimizer"], opts["steps"], opts["episodic"])
    if images is not None:
        # One pass over the given images, always kept (even when episodic): it defines the starting state.
        for x in iter_batches(images, cfg.batch_size):
            wrapper.adapt_batch(x.to(device))
        wrapper.snapshot()
        log.info("tent: adapted on the given images before inference")
    return wrapper
