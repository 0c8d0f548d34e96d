"""Prior-preservation images: read from --class-images, generating the missing ones with the base model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from .data import load_concept_images
from .images import save_image

logger = logging.getLogger(__name__)


@torch.no_grad()
def prepare_class_images(pipe, settings, accelerator) -> list[Image.Image]:
    """Up to num_class_images images of the class prompt; missing ones are generated and saved first."""
    folder = Path(settings.class_images) if settings.class_images else settings.output_path / "class_images"
    existing = load_concept_images(folder) if folder.is_dir() and any(folder.iterdir()) else []
    missing = settings.num_class_images - len(existing)
    if missing > 0 and accelerator.is_main_process:
        logger.info("generating %d class images for %r", missing, settings.class_prompt)
        pipe.to(accelerator.device)
        generator = torch.Generator().manual_seed(settings.seed + 12345)
        for i in range(missing):
            image = pipe(settings.class_prompt, num_inference_steps=settings.validation_steps,
                         guidance_scale=settings.guidance_scale, generator=generator,
                         height=settings.resolution, width=settings.resolution).images[0]
            save_image(image, folder / f"class_{len(existing) + i:05d}.png")
    accelerator.wait_for_everyone()
    return [img.image for img in load_concept_images(folder)][: settings.num_class_images]
