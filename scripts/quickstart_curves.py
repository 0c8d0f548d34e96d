"""Measure every checkpoint of quickstart-style runs against issue 14's targets and plot the curves.

    python scripts/quickstart_curves.py --run "C2=outputs/c2" --run "C2 + prior preservation=outputs/c2pp" \
        --out docs/quickstart

Each run folder is a `fa-sd train` output with `--checkpoint-every`: every checkpoint's adapter and
the final adapter are scored by measure_quickstart.py (background accuracy and castle silhouette with
the token, the no-token drop against the base model). Results are kept in OUT/measurements/, one JSON
per run and step, so an interrupted measurement resumes; OUT/curves.json and OUT/curves.png are
written from them. Step 0 of every curve is the base model (the token prompts scored without an adapter).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable

from measure_quickstart import TARGETS, drops_in_points, score_adapter, score_no_token, score_token_prompts

from filteratom_sd import read_adapter_metadata
from filteratom_sd.atomic import atomic_save_figure, atomic_write_text
from filteratom_sd.errors import AdapterFormatError
from filteratom_sd.models import load_pipeline

logger = logging.getLogger("quickstart_curves")


def run_adapters(run: Path) -> dict[int, Path]:
    """Step -> adapter file: every checkpoint's adapter and the final one."""
    adapters: dict[int, Path] = {}
    for candidate in sorted(run.glob("checkpoints/step-*/*.safetensors")) + sorted(run.glob("*.safetensors")):
        try:
            step = read_adapter_metadata(candidate).get("step")
        except AdapterFormatError:  # a checkpoint's resume state (params.safetensors) beside its adapter
            continue
        if step is not None:
            adapters.setdefault(int(step), candidate)
    return dict(sorted(adapters.items()))


def slug(label: str) -> str:
    """A file-name form of a run label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()


def cached_json(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The JSON kept at `path`, or `compute()` written there first (so an interrupted measurement resumes)."""
    if path.is_file():
        return json.loads(path.read_text())
    result = compute()
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


def curve_points(result: dict[str, Any]) -> dict[str, float]:
    """The four plotted numbers of one measurement."""
    drops = result["no_token"]["drop_points"]
    return {"background_accuracy": result["token_prompts"]["background_accuracy"],
            "silhouette_similarity": result["token_prompts"]["silhouette_similarity"],
            "no_token_shape_drop": drops["shape_accuracy"], "no_token_colour_drop": drops["colour_accuracy"]}


def plot(curves: dict[str, dict[int, dict[str, float]]], path: Path) -> Path:
    """Three panels against the training step: background accuracy, silhouette, no-token drop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-(len(curves) + 1) // 2)  # the legend's rows, two labels to a row
    figure, axes = plt.subplots(1, 3, figsize=(12.0, 3.2 + 0.22 * rows), dpi=100)
    panels = (("background_accuracy", "background right, with the token", TARGETS["background_accuracy"]),
              ("silhouette_similarity", "castle silhouette IoU", TARGETS["silhouette_similarity"]),
              ("no_token_shape_drop", "no-token drop (points): shape —, colour --",
               TARGETS["max_no_token_drop_points"]))
    for axis, (key, title, target) in zip(axes, panels):
        for index, (label, points) in enumerate(curves.items()):
            colour = f"C{index}"
            steps = sorted(points)
            axis.plot(steps, [points[s][key] for s in steps], marker="o", markersize=3, color=colour, label=label)
            if key == "no_token_shape_drop":
                axis.plot(steps, [points[s]["no_token_colour_drop"] for s in steps], marker="x", markersize=3,
                          color=colour, linestyle="--")
        axis.axhline(target, color="black", linewidth=1, linestyle=":", label="target")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("training step")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.07 * rows / (1 + 0.07 * rows), 1, 1))
    return atomic_save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_FOLDER (repeatable)")
    parser.add_argument("--out", required=True, help="folder for measurements/, curves.json and curves.png")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (the checker's default)")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--keep-curves", default=None, help="an earlier curves.json whose curves are kept beside the "
                        "new runs (runs measured before, whose folders are gone)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    kept = out / "measurements"
    kept.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    pipe = load_pipeline(None)
    pipe.set_progress_bar_config(disable=True)
    sampling = (seeds, args.steps, args.guidance_scale)
    base = cached_json(kept / "base.json", partial(score_no_token, pipe, *sampling))
    base_token = cached_json(kept / "base-token.json",
                             partial(score_token_prompts, pipe, "<castle>", "castle", *sampling))
    start = curve_points({"token_prompts": base_token,
                          "no_token": {"drop_points": drops_in_points(base, base)}})

    curves: dict[str, dict[int, dict[str, float]]] = {}
    if args.keep_curves:
        earlier = json.loads(Path(args.keep_curves).read_text())["curves"]
        curves.update({label: {int(step): point for step, point in points.items()} for label, points in earlier.items()})
    for spec in args.run:
        label, _, folder = spec.partition("=")
        curves[label] = {0: start}
        for step, adapter in run_adapters(Path(folder)).items():
            result = cached_json(kept / f"{slug(label)}-step-{step:06d}.json",
                                 partial(score_adapter, pipe, adapter, "castle", base, *sampling))
            curves[label][step] = curve_points(result)
    summary = {"targets": TARGETS, "base_no_token": base, "base_with_token": base_token, "seeds": len(seeds),
               "sampling_steps": args.steps, "guidance_scale": args.guidance_scale, "curves": curves}
    atomic_write_text(out / "curves.json", json.dumps(summary, indent=2) + "\n")
    plot(curves, out / "curves.png")
    logger.info("wrote %s and %s", out / "curves.json", out / "curves.png")


if __name__ == "__main__":
    main()
