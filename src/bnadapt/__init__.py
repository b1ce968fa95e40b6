"""bnadapt: make pretrained classifiers robust to corrupted inputs by re-estimating their BatchNorm statistics.

The public names below are resolved on first use (PEP 562), so ``import bnadapt`` and ``bnadapt --help`` load
neither torch nor numpy, and a corruption's module (and scipy) loads only when a corruption is used.

Example:
    >>> import bnadapt, torch
    >>> model = bnadapt.load_model("cifar10_resnet20", pretrained=False)
    >>> adapted = bnadapt.adapt(model, torch.rand(32, 3, 32, 32), method="replace", n=32, seed=0)
"""

from __future__ import annotations

import importlib
import sys
import types

from ._version import __version__

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

# The submodule each public name is read from on first use.
_HOMES = {
    "BNStats": "bn",
    "Bank": "bank",
    "BankModel": "methods",
    "BenchConfig": "benchmark",
    "Cell": "data",
    "MethodSpec": "adapt",
    "Tent": "methods",
    "adapt": "adapt",
    "bn_layers": "bn",
    "build_bank": "bank",
    "corrupt": "corruptions",
    "corruption_names": "corruptions",
    "estimate_stats": "bn",
    "load_model": "models",
    "method_names": "adapt",
    "method_spec": "adapt",
    "mix_stats": "bn",
    "model_names": "models",
    "open_data": "data",
    "read_images": "data",
    "register_method": "adapt",
    "reset": "methods",
    "run_benchmark": "benchmark",
    "to_float_nchw": "data",
}


def __getattr__(name: str):
    """A public name (imported from its submodule, then kept) or a submodule, e.g. ``bnadapt.corruptions``."""
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
        globals()[name] = value  # written past _Package.__setattr__: the next lookup is a plain attribute
        return value
    if not name.startswith("__"):
        # Submodules were attributes when this package imported them all; they still are, on first use.
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package's module type: ``bnadapt.adapt`` stays the function once the submodule of that name loads.

    Importing a submodule binds it on its package, which would replace the function ``adapt`` (or, before its first
    use, hide it from ``__getattr__``) by the module ``bnadapt.adapt``; that one binding is dropped.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in _HOMES and isinstance(value, types.ModuleType) and value.__name__ == f"{__name__}.{name}":
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
