"""Settings of the baseline methods: dataclasses filled from partial dicts, every value checked."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import ConfigError

T = TypeVar("T")

# Upper bounds keep a crafted adapter file from asking for huge tensors.
MAX_RANK = 4096


def options_from_dict(cls: type[T], data: Any, method: str) -> T:
    """Build the options dataclass `cls` from a partial dict; missing keys take their defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"The {method} settings must be a mapping of names to values.")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"Unknown {method} setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}."
        )
    return cls(**data)


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


@dataclass
class ExcludeOptions:
    """exclude_modules: regular expressions (searched in module names) of layers left alone."""

    exclude_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_patterns("exclude_modules", self.exclude_modules)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored in adapter metadata)."""
        return dataclasses.asdict(self)


@dataclass
class TargetOptions(ExcludeOptions):
    """Also target_modules: regular expressions of the layers to adapt (None = the default rule)."""

    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_patterns("target_modules", self.target_modules, allow_none=True)


@dataclass
class LowRankOptions(TargetOptions):
    """A rank and the alpha of the update's scale alpha / rank (alpha defaults to the rank: scale 1)."""

    rank: int = 4
    alpha: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("rank", self.rank)
        if self.alpha is None:
            self.alpha = float(self.rank)
        check_number("alpha", self.alpha)

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor of the low-rank product."""
        return float(self.alpha) / self.rank
