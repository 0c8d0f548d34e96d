"""The frontier report: Pareto-front plots, the matched-fidelity table and budget-matched pairs.

Built from the scored points alone (frontier.py), so a finished sweep re-renders without training.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..atomic import atomic_save_figure, atomic_write_text
from .frontier import RunCosts, ScoredPoint
from .pareto import Point, common_fidelity, pareto_front, value_at_fidelity

SCORES = ("alignment", "diversity")
PLOT_NAME = "frontiers.png"


def front(points: Sequence[ScoredPoint], score: str) -> list[Point]:
    """The Pareto front of fidelity against `score` over the given points, by increasing fidelity."""
    xy = [(p.fidelity, getattr(p, score)) for p in points]
    return [xy[i] for i in pareto_front(xy)]


def by_spec(points: Sequence[ScoredPoint]) -> dict[str, list[ScoredPoint]]:
    """Points grouped by method spec, in the order the specs first appear."""
    groups: dict[str, list[ScoredPoint]] = {}
    for p in points:
        groups.setdefault(p.spec, []).append(p)
    return groups


def seed_fronts(points: Sequence[ScoredPoint], score: str) -> dict[int, list[Point]]:
    """One front per seed (over that seed's learning rates and steps)."""
    seeds: dict[int, list[ScoredPoint]] = {}
    for p in points:
        seeds.setdefault(p.seed, []).append(p)
    return {seed: front(group, score) for seed, group in sorted(seeds.items())}


@dataclass
class Matched:
    """A method's score at a fidelity level: the mean over seeds and the per-seed values (None: not reached)."""

    mean: float | None
    per_seed: list[float | None]


def matched(points: Sequence[ScoredPoint], score: str, level: float) -> Matched:
    """`score` where each seed's front crosses fidelity `level`; the mean only when every seed reaches it."""
    values = [value_at_fidelity(f, level) for f in seed_fronts(points, score).values()]
    reached = [v for v in values if v is not None]
    return Matched(statistics.fmean(reached) if len(reached) == len(values) and values else None, values)


def common_level(groups: dict[str, list[ScoredPoint]]) -> float | None:
    """The highest fidelity that every method's every seed reaches."""
    fronts = [f for pts in groups.values() for f in seed_fronts(pts, "alignment").values()]
    return common_fidelity(fronts)


def budget_pairs(costs: dict[str, RunCosts]) -> list[tuple[str, str, float]]:
    """Each filter-atom spec with the baseline of the closest trainable-parameter count (and their ratio)."""
    atoms = [s for s in costs if s.startswith("filter-atoms")]
    others = [s for s in costs if not s.startswith("filter-atoms") and costs[s].trainable_parameters]
    pairs = []
    for a in atoms:
        if not others or not costs[a].trainable_parameters:
            continue
        ratio = {o: costs[o].trainable_parameters / costs[a].trainable_parameters for o in others}
        best = min(others, key=lambda o: abs(_log(ratio[o])))
        pairs.append((a, best, ratio[best]))
    return pairs


def _log(x: float) -> float:
    import math

    return math.log(x)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "not reached" if value is None else f"{value:.{digits}f}"


def _cell(m: Matched, digits: int) -> str:
    seeds = ", ".join("–" if v is None else f"{v:.{digits}f}" for v in m.per_seed)
    return f"{_fmt(m.mean, digits)} ({seeds})"


def _size(n: int) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def matched_table(groups: dict[str, list[ScoredPoint]], costs: dict[str, RunCosts], levels: Sequence[float]) -> str:
    """Markdown: per method, alignment and diversity at each fidelity level (mean, then per seed) and its costs."""
    head = "| method |" + "".join(f" alignment @ {lv:.3f} | diversity @ {lv:.3f} |" for lv in levels)
    head += " max fidelity | trainable params | adapter size | training time |"
    lines = [head, "|---|" + "---:|" * (2 * len(levels) + 4)]
    for spec, pts in groups.items():
        cells = "".join(f" {_cell(matched(pts, 'alignment', lv), 3)} | {_cell(matched(pts, 'diversity', lv), 2)} |"
                        for lv in levels)
        c = costs.get(spec)
        cost = (f" {c.trainable_parameters:,} | {_size(c.adapter_bytes)} | {c.train_seconds:.0f} s |" if c
                else " – | – | – |")
        lines.append(f"| {spec} |{cells} {max(p.fidelity for p in pts):.3f} |{cost}")
    return "\n".join(lines)


def write_plot(groups: dict[str, list[ScoredPoint]], path: Path, title: str, levels: Sequence[float]) -> Path:
    """Two panels (fidelity against alignment, against diversity): each method's points and its front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), dpi=100)
    for i, (spec, pts) in enumerate(groups.items()):
        colour = plt.cm.tab10(i % 10)
        style = ("-o", "--s", ":^")[i // 10 % 3]  # past ten methods the colours repeat: the line style tells them apart
        label = spec.replace("filter-atoms:", "")
        for ax, score in zip(axes, SCORES):
            ax.scatter([p.fidelity for p in pts], [getattr(p, score) for p in pts], s=10, color=colour, alpha=0.3)
            xs, ys = zip(*front(pts, score))
            ax.plot(xs, ys, style, color=colour, markersize=4, label=label)
    for ax, score in zip(axes, SCORES):
        for lv in levels:
            ax.axvline(lv, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("fidelity ↑")
        ax.set_ylabel(f"{score} ↑")
        ax.grid(True, alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def write_tables(points: Sequence[ScoredPoint], costs: dict[str, RunCosts], out: Path, title: str,
                 extra_level: float | None = None) -> str:
    """frontiers.png and tables.md (matched-fidelity table, budget pairs); returns the markdown."""
    groups = by_spec(points)
    level = common_level(groups)
    levels = [lv for lv in (level, extra_level) if lv is not None]
    write_plot(groups, out / PLOT_NAME, title, levels)
    lines = [f"![Pareto fronts]({PLOT_NAME})", "",
             f"Common fidelity level (the highest every method's every seed reaches): {_fmt(level)}"
             + (f"; second level {extra_level:.3f}." if extra_level is not None else "."), "",
             "Cells: mean over seeds where every seed's front reaches the level, then each seed's value.", "",
             matched_table(groups, costs, levels), "", "Budget-matched pairs (closest trainable-parameter count):", ""]
    for a, b, ratio in budget_pairs(costs):
        for lv in levels:
            cells = [f"{s}: alignment {_fmt(matched(groups[s], 'alignment', lv).mean)}, diversity "
                     f"{_fmt(matched(groups[s], 'diversity', lv).mean, 2)}" for s in (a, b)]
            lines.append(f"- {a} ({costs[a].trainable_parameters:,}) vs {b} ({costs[b].trainable_parameters:,}, "
                         f"{ratio:.2f}x) at fidelity {lv:.3f}: " + "; ".join(cells) + ".")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out / "tables.md", text)
    return text
