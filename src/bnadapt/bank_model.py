"""Moved to :mod:`bnadapt.methods.bank`; this alias keeps old imports working for one release."""

from __future__ import annotations

from .methods.bank import BankModel

__all__ = ["BankModel"]
