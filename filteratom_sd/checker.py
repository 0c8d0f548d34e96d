"""Prompt-following checks for the tiny domain: colours of background and shape, and silhouettes.

The background colour is the palette colour nearest to the median of the border pixels; the
shape colour is the palette colour nearest to the median of the foreground's interior pixels;
the silhouette similarity is the IoU of the foreground mask with a reference shape after both
are cropped to their bounding boxes and resized to a common grid (position and scale invariant).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .tiny_domain import PALETTE, SHAPES, draw_shape

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)
_GRID = 32
_FOREGROUND_DISTANCE = 60.0


@dataclass
class Analysis:
    """What the checker sees in one image."""

    background: str
    colour: str | None
    mask: np.ndarray


@dataclass
class PromptSpec:
    """What a prompt asks for: shape (or trigger token), shape colour, background colour."""

    shape: str | None
    colour: str | None
    background: str | None


def nearest_colour(rgb: np.ndarray) -> str:
    """Palette name nearest (Euclidean in RGB) to one colour."""
    return _NAMES[int(np.argmin(((_RGB - np.asarray(rgb, dtype=np.float32)) ** 2).sum(1)))]


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return image.astype(np.float32)


def analyse(image: Image.Image | np.ndarray) -> Analysis:
    """Background colour, shape colour (None when no shape is visible) and foreground mask."""
    pixels = _as_array(image)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    mask = np.sqrt(((pixels - background_rgb) ** 2).sum(-1)) > _FOREGROUND_DISTANCE
    # Interior pixels (all 4 neighbours foreground) avoid anti-aliased edges.
    interior = mask.copy()
    interior[1:] &= mask[:-1]
    interior[:-1] &= mask[1:]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    chosen = interior if interior.sum() >= 4 else mask
    colour = nearest_colour(np.median(pixels[chosen], axis=0)) if chosen.sum() >= 4 else None
    return Analysis(nearest_colour(background_rgb), colour, mask)


def _normalise(mask: np.ndarray) -> np.ndarray | None:
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    crop = mask[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize((_GRID, _GRID), Image.Resampling.BILINEAR)
    return np.asarray(resized) > 127


def reference_masks(shape: str) -> list[np.ndarray]:
    """Silhouettes of a shape at the rotations the generator uses (castles are never rotated)."""
    angles = [0.0] if shape == "castle" else [-0.5, -0.25, 0.0, 0.25, 0.5]
    masks = []
    for angle in angles:
        drawn = np.asarray(draw_shape(shape, (255, 255, 255), (0, 0, 0), size=0.8, angle=angle))[..., 0] > 127
        masks.append(_normalise(drawn))
    return masks


def silhouette_similarity(mask: np.ndarray, shape: str) -> float:
    """Best IoU in [0, 1] between a foreground mask and the shape's reference silhouettes."""
    own = _normalise(mask)
    if own is None:
        return 0.0
    best = 0.0
    for ref in reference_masks(shape):
        union = np.logical_or(own, ref).sum()
        best = max(best, float(np.logical_and(own, ref).sum() / union) if union else 0.0)
    return best


_TOKEN = re.compile(r"<[^<>\s]+>")


def parse_prompt(prompt: str) -> PromptSpec:
    """Read shape, shape colour and background colour from a tiny-domain prompt."""
    words = re.findall(r"<[^<>\s]+>|[a-z]+", prompt.lower())
    shape = next((w for w in words if w in SHAPES or _TOKEN.fullmatch(w)), None)
    background = None
    for i, word in enumerate(words):
        if word == "background" and i > 0 and words[i - 1] in PALETTE:
            background = words[i - 1]
    colour = None
    if shape is not None:
        i = words.index(shape)
        if i > 0 and words[i - 1] in PALETTE:
            colour = words[i - 1]
    return PromptSpec(shape, colour, background)


def evaluation_prompts(count: int = 64, seed: int = 0) -> list[str]:
    """A fixed, balanced prompt set: in each block of 64, every shape meets every background once."""
    rng = random.Random(seed)
    names = list(PALETTE)
    prompts = []
    for i in range(count):
        shape, background = SHAPES[i % 8], names[(i // 8 + 3 * (i % 8)) % 8]
        colour = rng.choice([n for n in names if n != background])
        prompts.append(f"a {colour} {shape} on a {background} background")
    return prompts


def score_images(images: list[Image.Image], prompts: list[str]) -> dict[str, Any]:
    """Accuracy of background and shape colour, and mean silhouette similarity, for image/prompt pairs."""
    bg_hits, colour_hits, colour_total, silhouettes = 0, 0, 0, []
    for image, prompt in zip(images, prompts):
        spec = parse_prompt(prompt)
        seen = analyse(image)
        bg_hits += seen.background == spec.background
        if spec.colour is not None:
            colour_total += 1
            colour_hits += seen.colour == spec.colour
        if spec.shape is not None and not _TOKEN.fullmatch(spec.shape):
            silhouettes.append(silhouette_similarity(seen.mask, spec.shape))
    n = max(1, len(images))
    return {
        "images": len(images),
        "background_accuracy": bg_hits / n,
        "colour_accuracy": colour_hits / max(1, colour_total),
        "silhouette_similarity": float(np.mean(silhouettes)) if silhouettes else None,
    }


def measure_pipeline(pipe: Any, prompts: list[str], seeds: list[int], steps: int = 25, guidance_scale: float = 5.0) -> dict[str, Any]:
    """Generate every prompt with every seed and score the images."""
    import torch

    images, used = [], []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        out = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator).images
        images += out
        used += prompts
    return {**score_images(images, used), "prompts": len(prompts), "seeds": len(seeds), "steps": steps,
            "guidance_scale": guidance_scale}
