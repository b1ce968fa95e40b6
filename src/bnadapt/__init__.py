"""bnadapt: make pretrained classifiers robust to corrupted inputs by re-estimating their BatchNorm statistics.

Example:
    >>> import bnadapt, torch
    >>> model = bnadapt.load_model("cifar10_resnet20", pretrained=False)
    >>> adapted = bnadapt.adapt(model, torch.rand(32, 3, 32, 32), method="replace", n=32, seed=0)
"""

from __future__ import annotations

from ._version import __version__
from .adapt import MethodSpec, adapt, method_names, method_spec, register_method
from .bank import Bank, build_bank
from .benchmark import BenchConfig, run_benchmark
from .bn import BNStats, bn_layers, estimate_stats, mix_stats
from .corruptions import corrupt, corruption_names
from .data import Cell, open_data, read_images, to_float_nchw
from .methods import BankModel, Tent, reset  # importing the package registers every method
from .models import load_model, model_names

__all__ = [
    "BNStats",
    "Bank",
    "BankModel",
    "BenchConfig",
    "Cell",
    "MethodSpec",
    "Tent",
    "__version__",
    "adapt",
    "bn_layers",
    "build_bank",
    "corrupt",
    "corruption_names",
    "estimate_stats",
    "load_model",
    "method_names",
    "method_spec",
    "mix_stats",
    "model_names",
    "open_data",
    "read_images",
    "register_method",
    "reset",
    "run_benchmark",
    "to_float_nchw",
]
