"""The adaptation methods, one module per family; importing this package registers every one of them.

- :mod:`.basic`: ``source``, ``replace``, ``prior``.
- :mod:`.online`: ``test-batch``, ``ema``, and :func:`reset`, the protocol of every online method's model.
- :mod:`.inorder`: ``sequential`` and ``auto`` (estimated in execution order; ``auto`` shrinks towards the source).
- :mod:`.bank`: ``bank`` (statistics of the best-matching known condition, per batch).
- :mod:`.tent`: ``tent`` (entropy minimisation over the BN affine parameters).
- :mod:`.peers`: ``rbn`` (RoTTA's robust BN) and ``dua`` (DUA's per-image updates on augmented copies).

A new method is a function ``(model, images, cfg, layers) -> model`` decorated with
:func:`bnadapt.adapt.register_method` in one of these modules (or a new one imported here).

Example:
    >>> from bnadapt.adapt import method_names
    >>> method_names()[:6]
    ['source', 'replace', 'prior', 'test-batch', 'ema', 'sequential']
"""

from __future__ import annotations

# Registration order is method_names() order, kept from earlier releases: basic, online, inorder, bank, tent, peers.
from . import basic  # noqa: F401  # isort: skip
from .online import Resettable, reset  # isort: skip
from .inorder import auto_weights  # isort: skip
from .bank import BankModel  # isort: skip
from .tent import Tent, softmax_entropy  # isort: skip
from .peers import DUA  # isort: skip

__all__ = ["BankModel", "DUA", "Resettable", "Tent", "auto_weights", "reset", "softmax_entropy"]
