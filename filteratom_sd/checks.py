"""Value checks shared by the settings of every method: one-sentence ConfigErrors for bad values."""

from __future__ import annotations

import math
import re
from typing import Any

from .errors import ConfigError

# Upper bounds keep a crafted adapter file from asking for huge tensors.
MAX_RANK = 4096


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
