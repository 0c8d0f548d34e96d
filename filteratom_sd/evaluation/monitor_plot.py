"""The drift monitor's curves as one small PNG (for the model card and the README)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..atomic import atomic_save_figure

_SERIES = (("fidelity", "fidelity", "tab:blue"), ("alignment", "alignment (new contexts)", "tab:green"),
           ("prior_accuracy", "prior accuracy", "tab:olive"), ("prior_drift", "prior drift (rel. MSE)", "tab:red"),
           ("concept_fit", "concept fit", "tab:gray"))


def plot_monitor_curves(records: list[Mapping[str, Any]], path: Path, kept_step: int | None = None,
                        title: str = "") -> Path:
    """Every measured score against the step, the kept step marked; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    figure, axis = plt.subplots(figsize=(5.0, 3.0), dpi=100)
    for key, label, colour in _SERIES:
        points = [(s, r[key]) for s, r in zip(steps, records) if r.get(key) is not None]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=label, color=colour,
                      linestyle="--" if key == "concept_fit" else "-")
    if kept_step is not None:
        axis.axvline(kept_step, color="black", linewidth=1, linestyle=":", label=f"kept: step {kept_step}")
    axis.set_xlabel("training step")
    axis.set_ylim(bottom=min(0.0, axis.get_ylim()[0]))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    if title:
        axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return atomic_save_figure(figure, path)
