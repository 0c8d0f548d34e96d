"""Pareto fronts of scored runs and their values at a common fidelity level (pure functions, no I/O).

A point is (fidelity, other), both higher-is-better; `other` is alignment or diversity. A method's
frontier over its learning rates and checkpoints is the set of points no other point beats in
both. Sorted by fidelity it climbs in fidelity and falls in the other score, and between two of its
points the frontier is taken as the straight line joining them.
"""

from __future__ import annotations

from typing import Sequence

Point = tuple[float, float]


def pareto_front(points: Sequence[Point]) -> list[int]:
    """Indices of the points no other point dominates (>= in both, > in one), by increasing fidelity.

    Of identical points the first is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1], i))
    front: list[int] = []
    best_other = float("-inf")
    for i in order:  # from the highest fidelity down: a point survives when its other score beats all before it
        if points[i][1] > best_other:
            front.append(i)
            best_other = points[i][1]
    return front[::-1]


def value_at_fidelity(front: Sequence[Point], level: float) -> float | None:
    """The frontier's other score at fidelity `level`, for a front sorted by increasing fidelity.

    Between two front points: linear interpolation. Below the front's lowest fidelity: that point's
    score (a run at higher fidelity is also one at least that faithful). Above its highest: None,
    the method never reached that fidelity.
    """
    if not front or level > front[-1][0]:
        return None
    if level <= front[0][0]:
        return front[0][1]
    for (x0, y0), (x1, y1) in zip(front, front[1:]):
        if x0 <= level <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (level - x0) / (x1 - x0)
    return None


def common_fidelity(fronts: Sequence[Sequence[Point]]) -> float | None:
    """The highest fidelity every front reaches (the lowest of their maxima); None without a front."""
    maxima = [front[-1][0] for front in fronts if front]
    return min(maxima) if maxima else None
