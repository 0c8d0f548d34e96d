"""The comparison report: a Table 2-style markdown table, the alignment-vs-fidelity plot, grids and results.json."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..atomic import atomic_save_figure, atomic_write_text
from ..training.settings import TrainingSettings
from .prompt_sets import PromptSet

BASE_LABEL = "base"
PLOT_NAME = "alignment-vs-fidelity.png"
GRID_SEEDS = 2  # rows of each method's grid: the first seeds of the prompt set
GRID_COLUMNS = 8  # the first prompts


class ReportRequest(Protocol):
    """What the report reads of a comparison request."""

    out: Path
    model: str | None
    command: str | None


@dataclass
class RunRecord:
    """One row of the report: a method's scores and costs (the base model has no adapter)."""

    label: str
    slug: str
    method: str | None
    fidelity: float
    diversity: float
    alignment: float
    images: int
    trainable_parameters: int = 0
    adapter_bytes: int = 0
    train_seconds: float = 0.0
    final_loss: float | None = None
    lr: float | None = None
    lr_source: str | None = None
    train_key: str | None = None
    eval_key: str = ""
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (metrics.json, results.json)."""
        data = dict(self.__dict__)
        data.pop("reused")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunRecord":
        """Rebuild from `to_dict` output."""
        return cls(**data)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (indented, with a final newline)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _size(n: int) -> str:
    if n == 0:
        return "–"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _params(n: int) -> str:
    return "–" if n == 0 else f"{n:,}"


def table_markdown(records: list[RunRecord]) -> str:
    """The Table 2-style comparison as a markdown table, one row per method."""
    lines = ["| method | fidelity ↑ | diversity ↑ | alignment ↑ | trainable params | adapter size | training time | lr |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        time_text = "–" if r.method is None else f"{r.train_seconds:.0f} s"
        lr_text = "–" if r.lr is None else f"{r.lr:g}"
        lines.append(f"| {r.label} | {r.fidelity:.3f} | {r.diversity:.2f} | {r.alignment:.3f} | "
                     f"{_params(r.trainable_parameters)} | {_size(r.adapter_bytes)} | {time_text} | {lr_text} |")
    return "\n".join(lines)


def _short(label: str) -> str:
    return label.replace("filter-atoms:", "")


def write_plot(records: list[RunRecord], path: Path, title: str) -> Path:
    """Alignment against fidelity, marker area growing with the square root of the trainable parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    largest = max([r.trainable_parameters for r in records] + [1])
    fig, ax = plt.subplots(figsize=(9, 5), dpi=100)
    handles = []
    for i, r in enumerate(records):
        if r.method is None:
            colour, marker = "black", "x"
            ax.scatter(r.fidelity, r.alignment, s=80, marker=marker, color=colour, zorder=3)
        else:
            colour, marker = plt.cm.tab20(i % 20), "o"
            size = 30 + 900 * math.sqrt(r.trainable_parameters / largest)
            ax.scatter(r.fidelity, r.alignment, s=size, color=colour, alpha=0.6, edgecolors="black", linewidths=0.6,
                       zorder=2)
        ax.annotate(_short(r.label), (r.fidelity, r.alignment), textcoords="offset points", xytext=(6, 4), fontsize=8)
        handles.append(Line2D([0], [0], marker=marker, linestyle="", color=colour, markersize=7,
                              label=f"{r.label} ({r.trainable_parameters:,})" if r.method else r.label))
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False,
              title="method (trainable parameters)", title_fontsize=8)
    ax.set_xlabel("fidelity ↑")
    ax.set_ylabel("text–image alignment ↑")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.margins(0.12)
    fig.text(0.99, 0.01, "marker area ∝ √(trainable parameters); × = base model", ha="right", fontsize=7, color="grey")
    fig.tight_layout()
    return atomic_save_figure(fig, path)


def _metric_notes(metrics: str) -> list[str]:
    if metrics == "tiny":
        return ["  - **fidelity**: mean silhouette similarity (IoU after cropping to the bounding box) of each image's "
                "shape with the concept's silhouette, from the tiny-domain checker;",
                "  - **diversity**: Vendi score of the images' 16x16 RGB pixels (cosine kernel): the effective number "
                "of distinct images;",
                "  - **alignment**: fraction of images whose background colour (and shape colour, when named) is the "
                "one the prompt asks for."]
    return ["  - **fidelity**: mean cosine similarity of DINOv2 embeddings between generated and training images;",
            "  - **diversity**: Vendi score of the generated images' DINOv2 embeddings;",
            "  - **alignment**: mean CLIP cosine similarity between each image and its prompt."]


def write_report(request: ReportRequest, records: list[RunRecord], settings: TrainingSettings, prompt_set: PromptSet,
                 metrics: str, references: int) -> Path:
    """report.md, the plot, one grid per run under grids/, and results.json."""
    out = request.out
    grids = out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    for r in records:
        shutil.copyfile(out / "runs" / r.slug / "grid.png", grids / f"{r.slug}.png")
    model = request.model or "the bundled tiny model"
    write_plot(records, out / PLOT_NAME, f"{settings.trigger} on {model}: {settings.steps} steps, seed {settings.seed}")
    images = len(prompt_set.prompts) * len(prompt_set.seeds)
    lr_sources = [f"{r.label} {r.lr:g} ({r.lr_source})" for r in records if r.lr is not None]
    lr_line = ("- Learning rate of each run (and where it comes from): " + "; ".join(lr_sources) + "."
               if lr_sources else "- No method was trained.")
    lines = [f"# Method comparison: {settings.trigger} on {model}", ""]
    if request.command:
        lines += ["Reproduce with", "", "```bash", request.command, "```", ""]
    lines += [table_markdown(records), "", f"![alignment against fidelity]({PLOT_NAME})", "",
              "## Setup", "",
              f"- Every method trains {settings.steps} steps (batch {settings.batch_size}, resolution "
              f"{settings.resolution}, AdamW, weight decay {settings.adam_weight_decay:g}) with seed {settings.seed} "
              f"on the {references} images of {settings.trigger}; captions from the prompt templates "
              f"{', '.join(repr(t) for t in settings.prompt_templates)}.",
              lr_line,
              "- Training time is the wall time of train() after the model is loaded and patched: the steps, the "
              "final validation grid and the model card, on the machine that ran the comparison.",
              f"- Evaluation: {len(prompt_set.prompts)} prompts ({prompt_set.source}) x {len(prompt_set.seeds)} seeds "
              f"= {images} images per method, {prompt_set.steps} sampling steps, guidance {prompt_set.guidance_scale:g}.",
              f"- Metrics ({metrics}):", *_metric_notes(metrics), "",
              "## Samples", "",
              f"Columns: the first {min(GRID_COLUMNS, len(prompt_set.prompts))} prompts of the set; rows: seeds "
              f"{', '.join(map(str, prompt_set.seeds[:GRID_SEEDS]))}.", ""]
    first_prompts = prompt_set.for_token(settings.trigger)[:GRID_COLUMNS]
    lines += ["Prompts: " + "; ".join(f"`{p}`" for p in first_prompts) + ".", ""]
    for r in records:
        lines += [f"**{r.label}**", "", f"![{r.label}](grids/{r.slug}.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
    write_json(out / "results.json", {"concept": settings.concept, "token": settings.trigger, "model": model,
                                       "steps": settings.steps, "seed": settings.seed, "metric_set": metrics,
                                       "prompt_set": prompt_set.to_dict(), "runs": [r.to_dict() for r in records]})
    return out / "report.md"
