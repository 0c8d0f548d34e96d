"""`FilterAtomConfig`: what a filter-atom adapter tunes, and the paper's presets C1-C4."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..checks import check_patterns, check_scale
from ..errors import ConfigError
from .functional import SOLVERS
from .overcomplete import OVERCOMPLETE_INITS

STRATEGIES = ("D", "D+Dc", "beta+D1+Dc")

# Table 2 of the paper: (m, kc) = (6, 4) and (9, 16) tune D and D_c; C3 adds overcomplete
# atoms (m1 = 3); C4 is C2 with the coefficients alpha trainable too (the overfitting ablation).
# kc = 16 is the Table 2 text's; Tables 9/10 say (9, 8) and C4's 587 M count fits kc = 8: `kc=8` selects it.
PRESETS: dict[str, dict[str, Any]] = {
    "C1": {"m": 6, "kc": 4, "strategy": "D+Dc"},
    "C2": {"m": 9, "kc": 16, "strategy": "D+Dc"},
    "C3": {"m": 9, "kc": 16, "m1": 3, "strategy": "beta+D1+Dc"},
    "C4": {"m": 9, "kc": 16, "strategy": "D+Dc", "train_alpha": True},
}

# Upper bounds keep a crafted adapter file from asking for huge tensors or endless solver loops.
_INT_LIMITS = {"m": 1024, "kc": 1024, "m1": 64, "iterations": 10_000, "dictionary_steps": 1_000}


@dataclass
class FilterAtomConfig:
    """Settings of a filter-atom adapter.

    m: atoms per k x k conv (and per linear block); m1: overcomplete factor (beta+D1+Dc only);
    overcomplete_init: where beta and D1 start, "residual" (random beta on top of the kept atoms,
    so the m1 copies separate) or the paper's "copies" (they never do; see overcomplete.py);
    kc / kc_out: block edges of the Kronecker form of linear and 1x1 layers (kc_out defaults to kc);
    strategy: "D" (k x k convs only), "D+Dc" (also linear / 1x1 layers) or "beta+D1+Dc";
    train_alpha: also tune the coefficients (paper's C4); target_modules / exclude_modules:
    regular expressions matched (re.search) against module names, None = the default targets;
    solver / lam / iterations / dictionary_steps: how alpha and the atoms are computed;
    scale: multiplier of the update.
    """

    m: int = 9
    kc: int = 16
    kc_out: int | None = None
    m1: int = 3
    overcomplete_init: str = "residual"
    strategy: str = "D+Dc"
    train_alpha: bool = False
    target_modules: list[str] | None = None
    exclude_modules: list[str] = field(default_factory=list)
    solver: str = "svd"
    lam: float = 0.1
    iterations: int = 100
    dictionary_steps: int = 10
    scale: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError with one sentence for the first invalid field."""
        for name, upper in _INT_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
            if value > upper:
                raise ConfigError(f"{name} must be at most {upper}, got {value}.")
        check_patterns("target_modules", self.target_modules, allow_none=True)
        check_patterns("exclude_modules", self.exclude_modules)
        if not isinstance(self.train_alpha, bool):
            raise ConfigError(f"train_alpha must be true or false, got {self.train_alpha!r}.")
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam):
            raise ConfigError(f"lam must be a finite number, got {self.lam!r}.")
        check_scale(self.scale, "scale")
        if self.kc_out is not None and (
            isinstance(self.kc_out, bool) or not isinstance(self.kc_out, int) or not 0 < self.kc_out <= _INT_LIMITS["kc"]
        ):
            raise ConfigError(f"kc_out must be a positive integer up to {_INT_LIMITS['kc']}, got {self.kc_out!r}.")
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise ConfigError(f"Unknown strategy {self.strategy!r}; choose one of: {', '.join(STRATEGIES)}.")
        if not isinstance(self.overcomplete_init, str) or self.overcomplete_init not in OVERCOMPLETE_INITS:
            raise ConfigError(f"Unknown overcomplete_init {self.overcomplete_init!r}; "
                              f"choose one of: {', '.join(OVERCOMPLETE_INITS)}.")
        if not isinstance(self.solver, str) or self.solver not in SOLVERS:
            raise ConfigError(f"Unknown solver {self.solver!r}; choose one of: {', '.join(SOLVERS)}.")
        if self.lam < 0:
            raise ConfigError(f"lam must be non-negative, got {self.lam!r}.")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "FilterAtomConfig":
        """The paper's configuration C1, C2, C3 or C4, with optional field overrides."""
        key = str(name).upper()
        if key not in PRESETS:
            raise ConfigError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[key], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored in adapter metadata)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FilterAtomConfig":
        """Inverse of `to_dict`; a "preset" key starts from that preset, other keys override it."""
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        preset = data.pop("preset", None)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown filter-atom setting(s): {', '.join(map(repr, unknown))}.")
        if preset is not None:
            return cls.preset(preset, **data)
        return cls(**data)

    def decomposition_key(self) -> dict[str, Any]:
        """The fields that determine alpha and the fixed atoms (the decomposition cache key)."""
        return {k: getattr(self, k) for k in ("m", "kc", "kc_out", "solver", "lam", "iterations", "dictionary_steps")}
