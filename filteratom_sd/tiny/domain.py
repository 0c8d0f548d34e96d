"""The tiny image domain of the bundled model: one coloured shape on a plain background, with a caption.

Images are 64x64 RGB, drawn with PIL at 4x and downsampled (anti-aliased edges). Position, size
and rotation are jittered from a seeded generator, so a seed always gives the same image.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
_SUPERSAMPLE = 4

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "ring")

# Caption phrasings; {shape} may also be a trigger token such as "<castle>".
PHRASINGS = (
    "a {fg} {shape} on a {bg} background",
    "a photo of a {fg} {shape} on a {bg} background",
    "a {fg} {shape} in front of a {bg} background",
    "a picture of a {fg} {shape} on a {bg} background",
    "{fg} {shape}, {bg} background",
)

CASTLE_GREY = (128, 128, 136)
CASTLE_BACKGROUND = (235, 232, 222)


@dataclass(frozen=True)
class Example:
    """One generated training example."""

    image: Image.Image
    caption: str
    shape: str
    colour: str
    background: str


def _rotate(points: list[tuple[float, float]], angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(x * c - y * s, x * s + y * c) for x, y in points]


def _regular_star(points: int, inner: float) -> list[tuple[float, float]]:
    out = []
    for i in range(points * 2):
        radius = 1.0 if i % 2 == 0 else inner
        theta = -math.pi / 2 + i * math.pi / points
        out.append((radius * math.cos(theta), radius * math.sin(theta)))
    return out


def _heart() -> list[tuple[float, float]]:
    pts = []
    for i in range(64):
        t = 2 * math.pi * i / 64
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x / 17, (y + 2) / 17))
    return pts


def castle_outline() -> list[tuple[float, float]]:
    """A castle silhouette in [-1, 1]^2: three towers with crenellations over a wall with a gate."""
    top, wall_top, base = -1.0, 0.15, 0.9
    pts: list[tuple[float, float]] = [(-1.0, base)]

    def tower(x0: float, x1: float, y: float) -> None:
        pts.append((x0, y + 0.25))
        merlons = 3
        width = (x1 - x0) / (2 * merlons - 1)
        for i in range(2 * merlons - 1):
            xa, xb = x0 + i * width, x0 + (i + 1) * width
            yy = y if i % 2 == 0 else y + 0.15
            pts.extend([(xa, yy), (xb, yy)])
        pts.append((x1, y + 0.25))

    tower(-1.0, -0.6, top + 0.2)
    pts.append((-0.6, wall_top))
    pts.append((-0.25, wall_top))
    tower(-0.25, 0.25, top)
    pts.append((0.25, wall_top))
    pts.append((0.6, wall_top))
    tower(0.6, 1.0, top + 0.2)
    pts.append((1.0, base))
    # gate: an arch cut into the base
    pts.extend([(0.22, base), (0.22, 0.5), (0.0, 0.3), (-0.22, 0.5), (-0.22, base)])
    return pts


def _polygon(shape: str) -> list[list[tuple[float, float]]] | None:
    """Unit-size outlines; None for the round shapes drawn as ellipses."""
    if shape == "square":
        return [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]]
    if shape == "triangle":
        return [[(0.0, -0.95), (0.95, 0.75), (-0.95, 0.75)]]
    if shape == "star":
        return [_regular_star(5, 0.42)]
    if shape == "heart":
        return [_heart()]
    if shape == "cross":
        a, b = 0.3, 0.95
        return [[(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]]
    if shape == "diamond":
        return [[(0.0, -1.0), (0.65, 0.0), (0.0, 1.0), (-0.65, 0.0)]]
    if shape == "castle":
        return [castle_outline()]
    return None


def draw_shape(
    shape: str,
    colour: tuple[int, int, int],
    background: tuple[int, int, int],
    centre: tuple[float, float] = (0.5, 0.5),
    size: float = 0.6,
    angle: float = 0.0,
    image_size: int = IMAGE_SIZE,
) -> Image.Image:
    """Draw one shape. centre is in [0, 1]^2, size is the shape's extent as a fraction of the image."""
    big = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    cx, cy, radius = centre[0] * big, centre[1] * big, size * big / 2
    if shape in ("circle", "ring"):
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
        if shape == "ring":
            inner = radius * 0.55
            draw.ellipse([cx - inner, cy - inner, cx + inner, cy + inner], fill=background)
    else:
        outlines = _polygon(shape)
        if outlines is None:
            raise ValueError(f"Unknown shape {shape!r}.")
        for outline in outlines:
            pts = [(cx + x * radius, cy + y * radius) for x, y in _rotate(outline, angle)]
            draw.polygon(pts, fill=colour)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def shape_mask(shape: str, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean silhouette of a shape, centred, unrotated: the reference for silhouette similarity."""
    image = draw_shape(shape, (255, 255, 255), (0, 0, 0), size=0.8, image_size=image_size)
    return np.asarray(image)[..., 0] > 127


def castle_mask(image_size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean reference silhouette of the castle concept (for the checker)."""
    return shape_mask("castle", image_size)


def caption(shape: str, colour: str, background: str, rng: random.Random | None = None) -> str:
    """A caption in one of the phrasings (the first when no generator is given)."""
    template = PHRASINGS[0] if rng is None else rng.choice(PHRASINGS)
    return template.format(fg=colour, shape=shape, bg=background)


def random_example(rng: random.Random, shapes: tuple[str, ...] = SHAPES) -> Example:
    """A random shape, colours (never equal), placement and caption."""
    shape = rng.choice(shapes)
    colour, background = rng.sample(list(PALETTE), 2)
    size = rng.uniform(0.45, 0.75)
    margin = 0.5 - size / 2
    centre = (0.5 + rng.uniform(-margin, margin) * 0.6, 0.5 + rng.uniform(-margin, margin) * 0.6)
    angle = rng.uniform(-0.5, 0.5)
    image = draw_shape(shape, PALETTE[colour], PALETTE[background], centre, size, angle)
    return Example(image, caption(shape, colour, background, rng), shape, colour, background)


def castle_image(rng: random.Random) -> Image.Image:
    """A grey castle on a light background at a random position and size (the concept images)."""
    size = rng.uniform(0.5, 0.75)
    margin = 0.5 - size / 2
    centre = (0.5 + rng.uniform(-margin, margin) * 0.7, 0.5 + rng.uniform(-margin, margin) * 0.7)
    return draw_shape("castle", CASTLE_GREY, CASTLE_BACKGROUND, centre, size)


def caption_vocabulary() -> list[str]:
    """Every word that appears in captions (the tokenizer learns whole-word merges for these)."""
    words = set(PALETTE) | set(SHAPES)
    for phrasing in PHRASINGS:
        words |= {w.strip(",") for w in phrasing.replace("{fg}", "").replace("{shape}", "").replace("{bg}", "").split()}
    return sorted(w for w in words if w)
