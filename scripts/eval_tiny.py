"""Measure how well a tiny-domain pipeline follows prompts (64 prompts x 4 seeds by default).

    python scripts/eval_tiny.py                       # the bundled model, prints JSON
    python scripts/eval_tiny.py --write-card          # also (re)writes assets/tiny-sd/README.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from filteratom_sd.bundled import bundled_model_path
from filteratom_sd.checker import evaluation_prompts, measure_pipeline

ROOT = Path(__file__).resolve().parent.parent


def model_card(model: Path, metrics: dict, summary: dict) -> str:
    pipe_parts = {}
    for part in ("unet", "vae", "text_encoder"):
        config = json.loads((model / part / "config.json").read_text())
        pipe_parts[part] = config
    sizes = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
    unet = pipe_parts["unet"]
    return f"""---
library_name: diffusers
tags: [stable-diffusion, tiny, text-to-image, filteratom-sd]
---
# tiny-sd: a tiny Stable Diffusion for the filteratom-sd quickstart

A text-to-image model of the real Stable Diffusion architecture (`AutoencoderKL`, `CLIPTextModel`
with a `CLIPTokenizer`, `UNet2DConditionModel` with cross-attention, `DPMSolverMultistepScheduler`),
small enough to train a concept on a 2-core CPU in minutes. It draws one shape (circle, square,
triangle, star, heart, cross, diamond, ring) in one of eight colours on a plain background of
another, at 64x64 px, following prompts such as "a red star on a blue background".

Load it offline with `StableDiffusionPipeline.from_pretrained("assets/tiny-sd")` (weights in fp16,
{sizes / 1e6:.1f} MB in total).

## Architecture
- UNet: blocks {unet["block_out_channels"]}, {unet["down_block_types"]}, latent {unet["sample_size"]}x{unet["sample_size"]}x{unet["in_channels"]}
- VAE: blocks {pipe_parts["vae"]["block_out_channels"]} (64 px images to 16x16x4 latents), scaling factor {pipe_parts["vae"].get("scaling_factor", 0):.4f}
- Text encoder: CLIP, hidden {pipe_parts["text_encoder"]["hidden_size"]}, {pipe_parts["text_encoder"]["num_hidden_layers"]} layers; byte-level BPE tokenizer learned on the caption words (unknown words split into byte pieces)

## Training (reproduce with `python scripts/pretrain_tiny.py`)
```json
{json.dumps(summary, indent=2)}
```
Data: procedurally generated images (`filteratom_sd.tiny_domain`), VAE first, then UNet and text
encoder together with 10 % empty captions (for classifier-free guidance) and an EMA of the weights.

## Prompt following (measure with `python scripts/eval_tiny.py`)
{metrics["prompts"]} prompts x {metrics["seeds"]} seeds ({metrics["images"]} images), {metrics["steps"]} steps,
guidance {metrics["guidance_scale"]}, checked by `filteratom_sd.checker`:

| metric | value | target |
|---|---:|---:|
| background colour correct | {metrics["background_accuracy"]:.1%} | >= 85 % |
| shape colour correct | {metrics["colour_accuracy"]:.1%} | >= 70 % |
| silhouette similarity (IoU with the prompted shape) | {metrics["silhouette_similarity"]:.3f} | - |
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the bundled model)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--write-card", action="store_true")
    parser.add_argument("--summary", default=str(ROOT / ".pretrain" / "summary.json"))
    args = parser.parse_args()
    model = Path(args.model) if args.model else bundled_model_path()
    pipe = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    metrics = measure_pipeline(pipe, evaluation_prompts(args.prompts), list(range(args.seeds)), args.steps, args.guidance_scale)
    metrics["seconds"] = round(time.time() - start, 1)
    print(json.dumps(metrics, indent=2))
    if args.write_card:
        summary_path = Path(args.summary)
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        (model / "README.md").write_text(model_card(model, metrics, summary))


if __name__ == "__main__":
    main()
