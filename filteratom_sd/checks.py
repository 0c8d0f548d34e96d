"""Value checks shared by the settings of every method: one-sentence ConfigErrors for bad values."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

from .errors import ConfigError

# Upper bounds keep a crafted adapter file from asking for huge tensors.
MAX_RANK = 4096
# An adapter's update multiplied by more than this gives noise (1e30 gave black images), never a useful result.
MAX_ADAPTER_SCALE = 10.0
# torch generators take seeds below 2**64; runs derive per-step seeds from the seed, so half of that is the limit.
MAX_SEED = 2**63 - 1
# Classifier-free guidance beyond this saturates every image.
MAX_GUIDANCE = 100.0


def check_int(name: str, value: Any, low: int = 1, high: int = MAX_RANK) -> None:
    """An integer in [low, high] (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value!r}.")


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    """A finite number, optionally bounded."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}.")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ConfigError(f"{name} must lie in [{low}, {high}], got {value!r}.")


def check_bool(name: str, value: Any) -> None:
    """True or False."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}.")


def check_patterns(name: str, value: Any, allow_none: bool = False) -> None:
    """A list of valid regular expressions (or None when allowed)."""
    if value is None and allow_none:
        return
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{name} must be a list of regular expressions.")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error:
            raise ConfigError(f"{name} holds an invalid regular expression: {pattern!r}.") from None


def check_scale(value: Any, name: str = "An adapter scale") -> float:
    """A finite number within +-MAX_ADAPTER_SCALE (booleans refused), as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or abs(value) > MAX_ADAPTER_SCALE:
        raise ConfigError(f"{name} must be a finite number from -{MAX_ADAPTER_SCALE:g} to {MAX_ADAPTER_SCALE:g}, "
                          f"got {value!r}.")
    return float(value)


def matches_type(value: Any, hint: Any) -> bool:
    """True when `value` has the declared type `hint` (a bool is not an int; an int is a float)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, arg) for arg in args)
    if origin is list:
        return isinstance(value, list) and all(matches_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(matches_type(k, args[0]) and matches_type(v, args[1])
                                               for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe_type(hint: Any) -> str:
    """`hint` in words: "an integer", "a string, a list of strings or null", ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        names = [describe_type(arg) for arg in args]
        return ", ".join(names[:-1]) + " or " + names[-1]
    if origin is list:
        return f"a list of {_plural(args[0])}"
    if origin is dict:
        return f"a mapping of {_plural(args[0])} to {_plural(args[1])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _plural(hint: Any) -> str:
    return "values" if hint is Any else describe_type(hint).split(" ", 1)[1] + "s"


def check_field_types(instance: Any) -> None:
    """ConfigError naming the first field of a dataclass instance whose value has the wrong type."""
    hints = typing.get_type_hints(type(instance))
    for field in dataclasses.fields(instance):
        value = getattr(instance, field.name)
        if not matches_type(value, hints[field.name]):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ConfigError(f"The setting {field.name!r} must be {describe_type(hints[field.name])}, got {shown}.")
