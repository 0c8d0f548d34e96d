"""Which monitored step to keep: the most faithful one that still follows prompts and keeps the prior.

The rule: among monitored steps after step 0, those whose alignment has not dropped more than
`alignment_margin` below step 0's, whose prior accuracy has not dropped more than `prior_margin`
below step 0's, and whose prior drift is at most `drift_margin` are within the margins; the one
with the highest fidelity (concept fit where fidelity is not measured) is kept, the earliest on a
tie. When no step is within the margins, the step that exceeds them least (in units of each margin)
is kept, and the reason says so. Quantities that were not measured are not checked.

Adding a record never changes whether an earlier step is within the margins, so the choice can
only move to the newest step: a trainer can keep the chosen step's weights as it goes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

_TOLERANCE = 1e-9  # a score exactly at a margin is within it, whatever the rounding of (step 0 - margin)


@dataclass(frozen=True)
class BestStepRule:
    """Margins relative to step 0 (absolute drops in fractions; drift as relative MSE)."""

    alignment_margin: float = 0.10
    prior_margin: float = 0.05
    drift_margin: float = 0.10


@dataclass(frozen=True)
class Choice:
    """The kept step and why."""

    step: int
    reason: str
    within_margins: bool


def _value(record: Mapping[str, Any], key: str) -> float | None:
    value = record.get(key)
    return None if value is None else float(value)


def _excess(record: Mapping[str, Any], start: Mapping[str, Any], rule: BestStepRule) -> float:
    """How far a step is outside the margins, in units of each margin (0 when within all)."""
    excess = [max(0.0, (_value(record, "prior_drift") or 0.0) - rule.drift_margin) / rule.drift_margin]
    for key, margin in (("alignment", rule.alignment_margin), ("prior_accuracy", rule.prior_margin)):
        now, then = _value(record, key), _value(start, key)
        if now is not None and then is not None:
            excess.append(max(0.0, (then - margin) - now) / margin)
    return max(excess)


def _fidelity(record: Mapping[str, Any]) -> float:
    fidelity = _value(record, "fidelity")
    return fidelity if fidelity is not None else float(record["concept_fit"])


def _describe(record: Mapping[str, Any], start: Mapping[str, Any]) -> str:
    parts = [f"fidelity {_fidelity(record):.3f}"]
    for key, label in (("alignment", "alignment"), ("prior_accuracy", "prior accuracy")):
        now, then = _value(record, key), _value(start, key)
        if now is not None and then is not None:
            parts.append(f"{label} {now:.3f} (step 0: {then:.3f})")
    parts.append(f"prior drift {float(record['prior_drift']):.3f}")
    return ", ".join(parts)


def choose_step(records: list[Mapping[str, Any]], rule: BestStepRule) -> Choice | None:
    """The step to keep among monitor records (dicts with step, fidelity, alignment, prior_drift, ...).

    None when there is no record after step 0, or none of step 0 to compare with.
    """
    start = next((r for r in records if r["step"] == 0), None)
    later = sorted((r for r in records if r["step"] > 0), key=lambda r: r["step"])
    if start is None or not later:
        return None
    within = [r for r in later if _excess(r, start, rule) <= _TOLERANCE]
    if within:
        best = max(within, key=lambda r: (_fidelity(r), -r["step"]))
        return Choice(best["step"], f"highest fidelity of the {len(within)} monitored step(s) within the margins "
                                    f"of step 0 ({_describe(best, start)})", True)
    best = min(later, key=lambda r: (_excess(r, start, rule), r["step"]))
    return Choice(best["step"], f"no monitored step stayed within the margins of step 0; this one exceeds them "
                                f"least ({_describe(best, start)})", False)
