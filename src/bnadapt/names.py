"""Built-in names the command line shows before anything heavy is imported (no torch, no numpy).

The registries stay the truth: ``BUILTIN_METHODS`` is :func:`bnadapt.method_names` before any user registration, in
registry order, and tests/test_startup.py checks that it stays so; a method registered at run time is accepted when
the command runs. ``ANALYSES`` is the one list of ``bnadapt analyze``'s analyses.

Example:
    >>> BUILTIN_METHODS[:3], ANALYSES
    (('source', 'replace', 'prior'), ('transfer', 'parts', 'depth'))
"""

from __future__ import annotations

__all__ = ["ANALYSES", "BUILTIN_METHODS"]

BUILTIN_METHODS = (
    "source",
    "replace",
    "prior",
    "test-batch",
    "ema",
    "sequential",
    "auto",
    "bank",
    "tent",
    "rbn",
    "dua",
)
ANALYSES = ("transfer", "parts", "depth")
