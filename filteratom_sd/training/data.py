"""Concept images and their prompts.

Images are read with Pillow directly rather than through `datasets`' imagefolder loader: a concept
is 4-9 files, and reading them one by one lets a corrupt file be skipped with a warning that
names it (the loader would fail the whole folder). Captions follow the imagefolder convention
(metadata.jsonl with file_name/text) or a same-name .txt file; otherwise prompt templates.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError
from ..user_files import MAX_CAPTION_BYTES, MAX_CAPTIONS_FILE_BYTES, read_text

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif"}
NORMAL_COUNT = (3, 20)
# Training resizes the short side to the resolution before cropping: a longer ratio makes a huge intermediate image.
MAX_ASPECT_RATIO = 16


@dataclass
class ConceptImage:
    """One readable training image (RGB) and its caption, if it has its own."""

    path: Path
    image: Image.Image
    caption: str | None
    mask: Image.Image | None = None  # "L": the alpha channel, when the file had transparency


def to_rgb(image: Image.Image) -> Image.Image:
    """Honour EXIF orientation; flatten transparency onto white; 16-bit, CMYK, palette, grey -> RGB."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: rescale to 8 bits instead of clipping everything to white
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 / max(float(array.max()), 1.0)
        image = Image.fromarray((array * scale).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def alpha_mask(image: Image.Image) -> Image.Image | None:
    """The alpha channel as an "L" image when `image` has real transparency, else None."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA"):
        return None
    alpha = image.getchannel("A")
    return alpha if alpha.getextrema()[0] < 255 else None


def _read_image(path: Path) -> tuple[Image.Image, Image.Image | None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as handle:
            handle.seek(0)  # animated GIF/WebP: the first frame
            handle.load()
            return to_rgb(handle), alpha_mask(handle)


def _captions(folder: Path) -> dict[str, str]:
    captions: dict[str, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        text = read_text(metadata, MAX_CAPTIONS_FILE_BYTES, "captions file", DataError)
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                entry = None
            if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) \
                    or not isinstance(entry.get("text"), str):
                raise DataError(f"{metadata} line {number} is not a JSON object with file_name and text strings.")
            if len(entry["text"].encode()) > MAX_CAPTION_BYTES:
                raise DataError(f"{metadata} line {number} has a caption larger than {MAX_CAPTION_BYTES // 1024} KiB.")
            captions[entry["file_name"]] = entry["text"]
    return captions


def list_image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name (no recursion, so link loops cannot trap us)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        raise DataError(f"Cannot read the image folder {folder}.") from None
    files = []
    for entry in entries:
        path = Path(entry.path)
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            files.append(path)
    return files


def load_concept_images(folder: str | os.PathLike) -> list[ConceptImage]:
    """Read every usable image of a concept folder, skipping unreadable files with a warning."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"The image folder {folder} does not exist.")
    files = list_image_files(folder)
    if not files:
        raise DataError(f"The image folder {folder} holds no .jpg, .png, .webp or .gif images.")
    captions = _captions(folder)
    images = []
    for path in files:
        try:
            image, mask = _read_image(path)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning,
                EOFError) as exc:
            logger.warning("skipping %s: not a readable image (%s)", path.name, type(exc).__name__)
            continue
        if min(image.size) < 8:
            logger.warning("skipping %s: %dx%d is too small to train on", path.name, *image.size)
            continue
        caption = captions.get(path.name)
        text_file = path.with_suffix(".txt")
        if caption is None and text_file.is_file():
            caption = read_text(text_file, MAX_CAPTION_BYTES, "caption file", DataError).strip() or None
        images.append(ConceptImage(path, image, caption, mask))
    if not images:
        raise DataError(f"None of the {len(files)} image files in {folder} could be read.")
    if not NORMAL_COUNT[0] <= len(images) <= NORMAL_COUNT[1]:
        logger.warning("%d images: concept training usually uses %d-%d", len(images), *NORMAL_COUNT)
    return images


def check_image_shapes(images: list[ConceptImage], resolution: int) -> None:
    """DataError naming the first image too elongated to resize to `resolution` on its short side."""
    for item in images:
        width, height = item.image.size
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            scale = resolution / min(width, height)
            raise DataError(f"{item.path.name} is {width}x{height}: at --resolution {resolution} it would be resized "
                            f"to {round(width * scale)}x{round(height * scale)} before cropping; crop it around the "
                            f"concept to at most {MAX_ASPECT_RATIO}:1.")


def instance_prompts(images: list[ConceptImage], token: str, templates: list[str]) -> list[str]:
    """Each image's caption, or a template with the token, cycling through the templates."""
    return [img.caption or templates[i % len(templates)].format(token) for i, img in enumerate(images)]


def _view_geometry(size: tuple[int, int], resolution: int, center_crop: bool,
                   generator: torch.Generator | None) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(resized size, crop box) that resize the short side to `resolution` and crop a square."""
    width, height = size
    scale = resolution / min(width, height)
    resized = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if center_crop or generator is None:
        left, top = (resized[0] - resolution) // 2, (resized[1] - resolution) // 2
    else:
        left = int(torch.randint(0, resized[0] - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, resized[1] - resolution + 1, (1,), generator=generator))
    return resized, (left, top, left + resolution, top + resolution)


def _to_tensor(image: Image.Image, resized: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    array = np.asarray(image.resize(resized, Image.Resampling.BICUBIC).crop(box), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1).contiguous()


def image_to_tensor(image: Image.Image, resolution: int, center_crop: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square (centre or random), scale to [-1, 1] CHW."""
    return _to_tensor(image, *_view_geometry(image.size, resolution, center_crop, generator))


def training_views(
    images: list[Image.Image], resolution: int, center_crop: bool, flip: bool, seed: int, crops_per_image: int = 4,
    masks: list[Image.Image | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """All augmented views to encode once: crops (one, or several random ones) and their mirror images.

    Returns the stacked views (N x 3 x r x r), their masks (N x 1 x r x r in [0, 1], all ones for
    images without a mask; cropped and flipped with their view) and each view's source image.
    """
    generator = torch.Generator().manual_seed(seed)
    views, view_masks, owners = [], [], []
    crops = 1 if center_crop else crops_per_image
    masks = masks or [None] * len(images)
    for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
        for _ in range(crops):
            geometry = _view_geometry(image.size, resolution, center_crop, generator)
            view = _to_tensor(image, *geometry)
            # the mask gets exactly its view's resize, crop and flip
            view_mask = (_to_tensor(mask, *geometry) + 1) / 2 if mask is not None else torch.ones(1, *view.shape[1:])
            pairs = [(view, view_mask), (view.flip(-1), view_mask.flip(-1))] if flip else [(view, view_mask)]
            for v, m in pairs:
                views.append(v)
                view_masks.append(m.clamp(0, 1))
                owners.append(index)
    return torch.stack(views), torch.stack(view_masks), owners
