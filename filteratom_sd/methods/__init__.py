"""Fine-tuning methods behind one interface (`AdapterMethod`), looked up by name."""

from __future__ import annotations

import importlib

from .base import METHODS, AdapterMethod, LayerDeltaMethod, attached_adapters, method_class, register_method

# Modules that register a method when imported; a missing optional one is simply not offered.
_BUILTIN_MODULES = ("filter_atoms", "liera", "peft_methods", "bias_methods", "full")


def _load_builtin_methods() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{module}":
                raise


def available_methods() -> list[str]:
    """Names accepted by `--method`."""
    _load_builtin_methods()
    return sorted(METHODS)


__all__ = [
    "METHODS",
    "AdapterMethod",
    "LayerDeltaMethod",
    "attached_adapters",
    "available_methods",
    "method_class",
    "register_method",
]
