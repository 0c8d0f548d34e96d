"""Prompt-following checks for the tiny domain: colours of background and shape, and silhouettes.

The background colour is the palette colour nearest to the median of the border pixels; the
shape colour is the palette colour nearest to the median of the foreground's interior pixels;
the silhouette similarity is the IoU of the foreground mask with a reference shape after both
are cropped to their bounding boxes and resized to a common grid (position and scale invariant).
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..generation import generate_images
from .domain import PALETTE, SHAPES, draw_shape

_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32)
_GRID = 32
_FOREGROUND_DISTANCE = 35.0  # half the smallest distance between two palette colours (yellow, orange)
_MIN_PIXELS = 4


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


def _shift_and(mask: np.ndarray) -> np.ndarray:
    """3x3 erosion (a pixel stays set when it and its 8 neighbours are set; outside counts as unset)."""
    padded = np.pad(mask, 1)
    out = np.ones_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out &= padded[dy: dy + mask.shape[0], dx: dx + mask.shape[1]]
    return out


def _shift_or(mask: np.ndarray) -> np.ndarray:
    """3x3 dilation."""
    padded = np.pad(mask, 1)
    out = np.zeros_like(mask)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            out |= padded[dy: dy + mask.shape[0], dx: dx + mask.shape[1]]
    return out


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask (empty mask in, empty mask out)."""
    height, width = mask.shape
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_label else np.zeros_like(mask)


def analyse(image: Image.Image | np.ndarray) -> Analysis:
    """Background colour, shape colour (None when no shape is visible) and the shape's mask.

    Background: the palette colour nearest to the median border pixel. Shape colour: the palette
    colour nearest to the median of the foreground's interior pixels closest to the foreground's
    centre of mass (away from anti-aliased edges and from stray specks). Mask: pixels closer to the
    shape's colour than to the background's, cleaned by a 3x3 opening, largest connected region.
    """
    pixels = _as_array(image)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = nearest_colour(background_rgb)
    to_background = np.sqrt(((pixels - background_rgb) ** 2).sum(-1))
    candidate = to_background > _FOREGROUND_DISTANCE
    if candidate.sum() < _MIN_PIXELS:
        return Analysis(background, None, np.zeros(candidate.shape, dtype=bool))
    interior = _shift_and(candidate)
    chosen = interior if interior.sum() >= _MIN_PIXELS else candidate
    ys, xs = np.nonzero(chosen)
    cy, cx = np.nonzero(candidate)
    distance = (ys - cy.mean()) ** 2 + (xs - cx.mean()) ** 2
    central = np.argsort(distance, kind="stable")[: max(_MIN_PIXELS, len(ys) // 4)]
    shape_rgb = np.median(pixels[ys[central], xs[central]], axis=0)
    to_shape = np.sqrt(((pixels - shape_rgb) ** 2).sum(-1))
    mask = (to_shape < to_background) & candidate
    opened = _shift_or(_shift_and(mask))
    if opened.sum() >= _MIN_PIXELS:
        # The opening drops specks and thin bridges; give back the thin parts (star tips) next to the body.
        mask &= _shift_or(_shift_or(largest_component(opened)))
    mask = largest_component(mask)
    return Analysis(background, nearest_colour(shape_rgb), mask)


def normalise_mask(mask: np.ndarray) -> np.ndarray | None:
    """A foreground mask cropped to its bounding box and resized to the common grid; None when it is empty."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    crop = mask[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    resized = Image.fromarray(crop.astype(np.uint8) * 255).resize((_GRID, _GRID), Image.Resampling.BILINEAR)
    return np.asarray(resized) > 127


def normalised_similarity(own: np.ndarray | None, reference: np.ndarray | None) -> float:
    """IoU in [0, 1] of two masks already passed through `normalise_mask` (0 when either is empty)."""
    if own is None or reference is None:
        return 0.0
    return float(np.logical_and(own, reference).sum() / np.logical_or(own, reference).sum())


def mask_similarity(mask: np.ndarray, reference: np.ndarray) -> float:
    """IoU in [0, 1] of two foreground masks, each cropped to its bounding box and resized to a common grid."""
    return normalised_similarity(normalise_mask(mask), normalise_mask(reference))


@functools.lru_cache(maxsize=None)
def reference_masks(shape: str) -> tuple[np.ndarray, ...]:
    """Silhouettes of a shape at the rotations the generator uses (castles are never rotated)."""
    angles = [0.0] if shape == "castle" else [-0.5, -0.25, 0.0, 0.25, 0.5]
    masks = []
    for angle in angles:
        drawn = np.asarray(draw_shape(shape, (255, 255, 255), (0, 0, 0), size=0.8, angle=angle))[..., 0] > 127
        masks.append(normalise_mask(drawn))
    return tuple(masks)


def silhouette_similarity(mask: np.ndarray, shape: str) -> float:
    """Best IoU in [0, 1] between a foreground mask and the shape's reference silhouettes."""
    own = normalise_mask(mask)
    return max(normalised_similarity(own, ref) for ref in reference_masks(shape))


_TOKEN = re.compile(r"<[^<>\s]+>")
TOKEN_SHAPES: dict[str, str] = {"<castle>": "castle"}  # trigger token -> reference silhouette


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


def score_images(images: list[Image.Image], prompts: list[str], token_shapes: dict[str, str] | None = None) -> dict[str, Any]:
    """Prompt-following scores of image/prompt pairs.

    background_accuracy and colour_accuracy are fractions of images whose checked colour matches
    the prompt; silhouette_similarity is the mean IoU with the prompted shape; shape_accuracy is
    the fraction where the prompted shape fits the mask best among the eight pretraining shapes.
    A trigger token is scored as the shape `token_shapes` maps it to (default: <castle> -> castle).
    """
    token_shapes = TOKEN_SHAPES if token_shapes is None else token_shapes
    bg_hits, colour_hits, colour_total, silhouettes, shape_hits, shape_total = 0, 0, 0, [], 0, 0
    for image, prompt in zip(images, prompts, strict=True):
        spec = parse_prompt(prompt)
        seen = analyse(image)
        bg_hits += seen.background == spec.background
        if spec.colour is not None:
            colour_total += 1
            colour_hits += seen.colour == spec.colour
        shape = token_shapes.get(spec.shape, spec.shape) if spec.shape is not None else None
        if shape in SHAPES or shape == "castle":
            silhouettes.append(silhouette_similarity(seen.mask, shape))
        if shape in SHAPES:
            shape_total += 1
            scores = [silhouette_similarity(seen.mask, s) for s in SHAPES]
            shape_hits += SHAPES[int(np.argmax(scores))] == shape
    n = max(1, len(images))
    return {
        "images": len(images),
        "background_accuracy": bg_hits / n,
        "colour_accuracy": colour_hits / colour_total if colour_total else None,
        "silhouette_similarity": float(np.mean(silhouettes)) if silhouettes else None,
        "shape_accuracy": shape_hits / shape_total if shape_total else None,
    }


def measure_pipeline(
    pipe: Any,
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    steps: int = 25,
    guidance_scale: float = 5.0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Generate every prompt with every seed and score the images (default: 64 balanced prompts x seeds 0-3)."""
    prompts = evaluation_prompts(64) if prompts is None else list(prompts)
    seeds = [0, 1, 2, 3] if seeds is None else list(seeds)
    images, used = [], []
    for seed in seeds:
        images += generate_images(pipe, prompts, seed, steps, guidance_scale, batch_size)
        used += prompts
    return {**score_images(images, used), "prompts": len(prompts), "seeds": len(seeds), "steps": steps,
            "guidance_scale": guidance_scale}
