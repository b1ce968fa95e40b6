"""Moved: ``sequential`` is in :mod:`bnadapt.methods.basic`, ``auto`` in :mod:`bnadapt.methods.auto`, the shrinkage
maths in :mod:`bnadapt.bn`. This alias keeps old imports working for one release."""

from __future__ import annotations

from .bn import equivalent_prior, shrinkage_weight
from .methods.inorder import auto_weights

__all__ = ["auto_weights", "equivalent_prior", "shrinkage_weight"]
