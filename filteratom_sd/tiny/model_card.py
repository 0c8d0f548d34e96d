"""The bundled model's card (its README.md): architecture, training, and prompt following as measured.

`evaluate` measures a tiny-domain pipeline with the checker; `model_card` writes the text.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checker import evaluation_prompts, measure_pipeline

MEASURE_COMMAND = "python scripts/eval_tiny.py"
PRETRAIN_COMMAND = "python scripts/pretrain_tiny.py"


def evaluate(model: Path, prompts: int = 64, seeds: int = 4, steps: int = 25, guidance_scale: float = 5.0,
             threads: int = 0) -> dict[str, Any]:
    """Load a pipeline folder in fp32 on the CPU and measure it with the tiny checker."""
    from diffusers import StableDiffusionPipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(str(model), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    start = time.time()
    metrics = measure_pipeline(pipe, evaluation_prompts(prompts), list(range(seeds)), steps, guidance_scale)
    metrics["seconds"] = round(time.time() - start, 1)
    return metrics


def _parameters(model: Path) -> dict[str, int]:
    """Parameter count of each model part, read from the safetensors headers."""
    counts = {}
    for part in ("unet", "vae", "text_encoder"):
        total = 0
        for file in sorted((model / part).glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                for key in handle.keys():
                    total += _numel(handle.get_slice(key).get_shape())
        counts[part] = total
    return counts


def _numel(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def model_card(model: Path, metrics: dict[str, Any], summary: dict[str, Any]) -> str:
    """The README.md of the bundled model: architecture, training settings and time, measured scores."""
    configs = {part: json.loads((model / part / "config.json").read_text()) for part in ("unet", "vae", "text_encoder")}
    size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file() and f.name != "README.md")
    params = _parameters(model)
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    minutes = summary.get("train_seconds")
    time_line = f"{minutes / 60:.0f} minutes" if minutes else "see .pretrain/log.txt"
    silhouette = metrics["silhouette_similarity"]
    return f"""---
library_name: diffusers
tags: [stable-diffusion, tiny, text-to-image, filteratom-sd]
---
# tiny-sd: a tiny Stable Diffusion for the filteratom-sd quickstart

A text-to-image model of the real Stable Diffusion architecture (`AutoencoderKL`, `CLIPTextModel`
with a `CLIPTokenizer`, `UNet2DConditionModel` with cross-attention, `{scheduler["_class_name"]}`),
small enough to train a concept on a 2-core CPU in minutes. It draws one shape (circle, square,
triangle, star, heart, cross, diamond, ring) in one of eight colours on a plain background of
another, at 64x64 px, following prompts such as "a red star on a blue background".
Pretrained from scratch by `scripts/pretrain_tiny.py` on procedurally generated images; no other data or weights.

It ships inside the `filteratom-sd` package ({size / 1e6:.1f} MB: the UNet and VAE stored in fp16, which
diffusers loads in fp32, the small text encoder in fp32; no safety checker) and loads offline with a
plain `from_pretrained`, on a CPU too:

```python
import torch
from diffusers import StableDiffusionPipeline
from filteratom_sd.tiny.bundled import bundled_model_path

pipe = StableDiffusionPipeline.from_pretrained(str(bundled_model_path()))
image = pipe("a red star on a blue background", num_inference_steps=25, guidance_scale=5.0,
             generator=torch.Generator().manual_seed(0)).images[0]
image.save("red-star.png")
```

## Architecture
| part | configuration | parameters |
|---|---|---:|
| UNet | blocks {unet["block_out_channels"]}, {", ".join(unet["down_block_types"])} / {", ".join(unet["up_block_types"])}, {unet["layers_per_block"]} layer per block, cross-attention dim {unet["cross_attention_dim"]}, head dim {unet["attention_head_dim"]}; latents {unet["sample_size"]}x{unet["sample_size"]}x{unet["in_channels"]} | {params["unet"]:,} |
| VAE | blocks {vae["block_out_channels"]} (64 px images to 16x16x4 latents), scaling factor {vae.get("scaling_factor", 0):.4f} | {params["vae"]:,} |
| Text encoder | CLIP, hidden {text["hidden_size"]}, {text["num_hidden_layers"]} layers, {text["num_attention_heads"]} heads, {text["max_position_embeddings"]} positions | {params["text_encoder"]:,} |
| Tokenizer | CLIP byte-level BPE, merges learned on the caption words (unknown words such as `<castle>` split into smaller pieces), max length {text["max_position_embeddings"]} | - |

Scheduler: {scheduler["_class_name"]}, {scheduler["num_train_timesteps"]} training steps, {scheduler["beta_schedule"]} betas {scheduler["beta_start"]}-{scheduler["beta_end"]}, {scheduler["prediction_type"]} prediction.

## Training
Reproduce (seeded, resumable from `.pretrain/`) with `{PRETRAIN_COMMAND}`; training time on 2 CPU cores: {time_line}.
Stage 1: the VAE (reconstruction + 1e-3 KL) on freshly generated images. Stage 2: a fixed, seeded set of
captioned images encoded once. Stage 3: the UNet and the text encoder together on the noise-prediction
loss with 10 % empty captions (for classifier-free guidance); the shipped weights are an EMA of both.
```json
{json.dumps(summary, indent=2)}
```

## Prompt following
Measure with `{MEASURE_COMMAND}` ({metrics["seconds"]:.0f} s on 2 CPU cores): {metrics["prompts"]} balanced prompts x
{metrics["seeds"]} seeds = {metrics["images"]} images, {metrics["steps"]} steps, guidance {metrics["guidance_scale"]}, scored by `filteratom_sd.tiny.checker`:

| metric | value | target |
|---|---:|---:|
| background colour correct | {_pct(metrics["background_accuracy"])} | >= 85 % |
| shape colour correct | {_pct(metrics["colour_accuracy"])} | >= 70 % |
| shape recognised (prompted shape fits best of the 8) | {_pct(metrics["shape_accuracy"])} | - |
| silhouette similarity (IoU with the prompted shape, 0-1) | {"n/a" if silhouette is None else f"{silhouette:.3f}"} | - |
"""
