"""The method registry: `--method` names and adapter files' "method" entries map to method classes here."""

from __future__ import annotations

from ..core.method import AdapterMethod
from ..errors import ConfigError
from ..filter_atoms.method import FilterAtomMethod
from .bias_methods import BitFitMethod, DiffFitMethod
from .full import FullMethod
from .liera import LieraMethod
from .peft import LohaMethod, LokrMethod, LoraMethod, OftMethod

METHODS: dict[str, type[AdapterMethod]] = {
    cls.name: cls
    for cls in (FilterAtomMethod, LieraMethod, LoraMethod, LohaMethod, LokrMethod, OftMethod, BitFitMethod,
                DiffFitMethod, FullMethod)
}


def register_method(cls: type[AdapterMethod]) -> type[AdapterMethod]:
    """Add a method class under `cls.name` (usable as a class decorator by methods outside the package)."""
    METHODS[cls.name] = cls
    return cls


def method_class(name: str) -> type[AdapterMethod]:
    """Look up a method by name, with a one-sentence error for unknown names."""
    if name not in METHODS:
        raise ConfigError(f"Unknown method {name!r}; choose one of: {', '.join(available_methods())}.")
    return METHODS[name]


def available_methods() -> list[str]:
    """Names accepted by `--method`, in the order of the registry (filter atoms first)."""
    return list(METHODS)
