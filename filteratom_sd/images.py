"""Image grids for validation samples, model cards and `fa-sd sample --grid`."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from .atomic import atomic_path


def make_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile same-size images row by row (columns default to a near-square layout)."""
    if not images:
        raise ValueError("make_grid needs at least one image.")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), (255, 255, 255))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def save_image(image: Image.Image, path: Path) -> Path:
    """Save a PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def save_grid(images: list[Image.Image], path: Path, columns: int | None = None) -> Path:
    """Save a grid of images as one PNG, atomically."""
    return save_image(make_grid(images, columns), path)
