"""bnadapt: make pretrained classifiers robust to corrupted inputs by re-estimating their BatchNorm statistics.

Example:
    >>> import bnadapt, torch
    >>> model = bnadapt.load_model("cifar10_resnet20", pretrained=False)
    >>> adapted = bnadapt.adapt(model, torch.rand(32, 3, 32, 32), method="replace", n=32, seed=0)
"""

from __future__ import annotations

from . import shrink as _shrink  # noqa: F401  (registers sequential and auto)
from .adapt import adapt, method_names, register_method
from .bank import Bank, build_bank
from .bank_model import BankModel  # also registers the method bank
from .benchmark import BenchConfig, run_benchmark
from .bn import BNStats, bn_layers, estimate_stats, mix_stats
from .corruptions import corrupt, corruption_names
from .data import open_data, read_images, to_float_nchw
from .models import load_model, model_names
from .tent import Tent  # importing the module registers the tent method

__all__ = [
    "BNStats",
    "Bank",
    "BankModel",
    "BenchConfig",
    "Tent",
    "adapt",
    "bn_layers",
    "build_bank",
    "corrupt",
    "corruption_names",
    "estimate_stats",
    "load_model",
    "method_names",
    "mix_stats",
    "model_names",
    "open_data",
    "read_images",
    "register_method",
    "run_benchmark",
    "to_float_nchw",
]
__version__ = "0.1.0"
