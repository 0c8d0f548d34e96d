"""Score a concept adapter on the bundled tiny model against the quickstart's targets (issue 14).

    python scripts/measure_quickstart.py outputs/castle/castle.safetensors --json outputs/castle/measure.json

Two measurements, both scored by the tiny-domain checker:
- with the token: "a <castle> on a {colour} background" for every palette colour x seeds; the
  fraction of images whose background is the asked colour (per colour and overall) and the mean
  castle silhouette IoU;
- without the token: the checker's own 64-prompt evaluation (`measure_pipeline`), for the adapted
  and the base model; shape and colour accuracy of each, and the difference in points.
A base-model result can be reused with --base-json (it does not depend on the adapter).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from filteratom_sd import load_adapter, read_adapter_metadata, unload_adapter
from filteratom_sd.atomic import atomic_write_text
from filteratom_sd.generation import generate_images
from filteratom_sd.models import load_pipeline
from filteratom_sd.tiny.checker import measure_pipeline, score_images
from filteratom_sd.tiny.domain import PALETTE

logger = logging.getLogger("measure_quickstart")

# The targets: background right in >= 75 % of token images, silhouette >= 0.60, and the
# no-token shape and colour accuracy within 5 points of the base model.
TARGETS = {"background_accuracy": 0.75, "silhouette_similarity": 0.60, "max_no_token_drop_points": 5.0}


def token_prompts(token: str) -> list[str]:
    """One "a <token> on a {colour} background" prompt per palette colour."""
    return [f"a {token} on a {colour} background" for colour in PALETTE]


def score_token_prompts(pipe: Any, token: str, shape: str, seeds: list[int], steps: int,
                        guidance_scale: float) -> dict[str, Any]:
    """Background accuracy per colour and overall, and the mean silhouette, of the token prompts."""
    prompts = token_prompts(token)
    images: list = []
    for seed in seeds:
        images += generate_images(pipe, prompts, seed, steps, guidance_scale, batch_size=len(prompts))
    used = prompts * len(seeds)
    overall = score_images(images, used, {token: shape})
    per_colour = {}
    for colour, prompt in zip(PALETTE, prompts):
        picked = [i for i, p in enumerate(used) if p == prompt]
        per_colour[colour] = score_images([images[i] for i in picked], [prompt] * len(picked),
                                          {token: shape})["background_accuracy"]
    return {"background_accuracy": overall["background_accuracy"],
            "silhouette_similarity": overall["silhouette_similarity"],
            "background_accuracy_per_colour": per_colour, "images": len(images)}


def score_no_token(pipe: Any, seeds: list[int], steps: int, guidance_scale: float) -> dict[str, Any]:
    """The checker's 64-prompt evaluation (shapes and colours named in words, no token)."""
    scores = measure_pipeline(pipe, seeds=seeds, steps=steps, guidance_scale=guidance_scale)
    return {k: scores[k] for k in ("shape_accuracy", "colour_accuracy", "background_accuracy",
                                   "silhouette_similarity", "images")}


def drops_in_points(adapted: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """How many points (of 100) the adapted model loses against the base, per no-token accuracy."""
    return {k: round(100 * (base[k] - adapted[k]), 2) for k in ("shape_accuracy", "colour_accuracy",
                                                                "background_accuracy")}


def score_adapter(pipe: Any, adapter: str | Path, shape: str, base: dict[str, Any], seeds: list[int], steps: int,
                  guidance_scale: float) -> dict[str, Any]:
    """Both measurements of one adapter (loaded into `pipe`, then unloaded) and its drops against `base`."""
    token = read_adapter_metadata(adapter).get("token") or f"<{shape}>"
    name = load_adapter(pipe, adapter)
    try:
        logger.info("scoring %s with and without %s", adapter, token)
        with_token = score_token_prompts(pipe, token, shape, seeds, steps, guidance_scale)
        adapted = score_no_token(pipe, seeds, steps, guidance_scale)
    finally:
        unload_adapter(pipe, name)
    return {"adapter": str(adapter), "token": token, "token_prompts": with_token,
            "no_token": {"adapted": adapted, "base": base, "drop_points": drops_in_points(adapted, base)}}


def verdict(token: dict[str, Any], drops: dict[str, float]) -> dict[str, bool]:
    """Which of the issue's targets this adapter meets."""
    return {
        "background_accuracy": token["background_accuracy"] >= TARGETS["background_accuracy"],
        "silhouette_similarity": token["silhouette_similarity"] >= TARGETS["silhouette_similarity"],
        "no_token_shape": drops["shape_accuracy"] <= TARGETS["max_no_token_drop_points"],
        "no_token_colour": drops["colour_accuracy"] <= TARGETS["max_no_token_drop_points"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapter", help="adapter .safetensors file trained on the bundled model")
    parser.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    parser.add_argument("--shape", default="castle", help="reference silhouette of the concept")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps (the checker's default)")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--base-json", default=None, help="reuse the base model's no-token scores from this file "
                        "(written when missing)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    seeds = list(range(args.seeds))
    started = time.time()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)

    base_file = Path(args.base_json) if args.base_json else None
    if base_file is not None and base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        logger.info("scoring the base model without the token")
        base = score_no_token(pipe, seeds, args.steps, args.guidance_scale)
        if base_file is not None:
            atomic_write_text(base_file, json.dumps(base, indent=2))

    scores = score_adapter(pipe, args.adapter, args.shape, base, seeds, args.steps, args.guidance_scale)
    result = {"adapter": scores["adapter"], "token": scores["token"], "seeds": len(seeds), "steps": args.steps,
              "guidance_scale": args.guidance_scale, "token_prompts": scores["token_prompts"],
              "no_token": scores["no_token"], "targets": TARGETS,
              "meets": verdict(scores["token_prompts"], scores["no_token"]["drop_points"]),
              "seconds": round(time.time() - started, 1)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        atomic_write_text(Path(args.json), text + "\n")


if __name__ == "__main__":
    main()
