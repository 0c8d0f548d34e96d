"""Settings of the baseline methods: dataclasses filled from partial dicts, every value checked."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from ..checks import check_bool, check_int, check_number, check_patterns
from ..errors import ConfigError

T = TypeVar("T")

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


class OptionsBacked:
    """A method whose settings are one options dataclass (`options_class`): its config is that dataclass."""

    name: ClassVar[str]
    options_class: ClassVar[type]

    def __init__(self, options: Any = None) -> None:
        super().__init__()
        self.options = options or self.options_class()

    def config_dict(self) -> dict[str, Any]:
        return self.options.to_dict()

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> Any:
        return cls(options_from_dict(cls.options_class, config, cls.name))


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


@dataclass
class LoraOptions(LowRankOptions):
    """rank r (paper: 1, 4, 16), alpha (scale alpha / r), dropout on the adapter's input."""

    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("dropout", self.dropout, 0.0, 1.0)


@dataclass
class LohaOptions(LowRankOptions):
    """rank d (paper: 4, 16) of both Hadamard factors; effective_conv2d: peft's CP form for k x k convs."""

    effective_conv2d: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("effective_conv2d", self.effective_conv2d)


@dataclass
class LokrOptions(LowRankOptions):
    """factor f (paper: 4, 16; -1 = as square as possible) of the Kronecker split, rank of its larger factor."""

    factor: int = 4
    decompose_both: bool = False
    effective_conv2d: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.factor != -1:
            check_int("factor", self.factor)
        check_bool("decompose_both", self.decompose_both)
        check_bool("effective_conv2d", self.effective_conv2d)


@dataclass
class OftOptions(TargetOptions):
    """block_size of the orthogonal blocks (peft's default 32), coft / eps for constrained OFT."""

    block_size: int = 32
    coft: bool = False
    eps: float = 6e-5
    cayley_neumann: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("block_size", self.block_size, 2)
        check_bool("coft", self.coft)
        check_number("eps", self.eps, 0.0)
        check_bool("cayley_neumann", self.cayley_neumann)
