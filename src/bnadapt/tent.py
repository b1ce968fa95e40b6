"""Moved to :mod:`bnadapt.methods.tent`; this alias keeps old imports working for one release."""

from __future__ import annotations

from .methods.tent import OPTIMIZERS, Tent, softmax_entropy

__all__ = ["OPTIMIZERS", "Tent", "softmax_entropy"]
