"""Prior-preservation images: read from --class-images, generating the missing ones with the base model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..generation import generate_images
from ..images import save_image
from .data import ConceptImage, load_concept_images

logger = logging.getLogger(__name__)

# Class image i is drawn from generator index CLASS_IMAGE_SEEDS + i: apart from the indices evaluation uses.
CLASS_IMAGE_SEEDS = 12_345


@torch.no_grad()
def prepare_class_images(pipe, settings, accelerator) -> list[ConceptImage]:
    """Up to num_class_images class images with their captions; missing ones are generated and saved first.

    Image i is generated from class prompt i modulo their count and saved with a same-name .txt
    caption, so several class prompts (e.g. one per background) each keep their own prior. They are drawn
    sample_batch_size at a time, image i always from its own seeded generator, and saved batch by batch, so
    an interrupted run keeps what it made.
    """
    folder = Path(settings.class_images) if settings.class_images else settings.output_path / "class_images"
    existing = load_concept_images(folder) if folder.is_dir() and any(folder.iterdir()) else []
    missing = settings.num_class_images - len(existing)
    prompts = settings.class_prompts
    if missing > 0 and accelerator.is_main_process:
        logger.info("generating %d class images for %d class prompt(s)", missing, len(prompts))
        pipe.to(accelerator.device)
        for start in range(len(existing), settings.num_class_images, settings.sample_batch_size):
            indices = range(start, min(start + settings.sample_batch_size, settings.num_class_images))
            batch = [prompts[i % len(prompts)] for i in indices]
            images = generate_images(pipe, batch, settings.seed, settings.validation_steps, settings.guidance_scale,
                                     len(batch), first_index=CLASS_IMAGE_SEEDS + start, size=settings.resolution)
            for i, prompt, image in zip(indices, batch, images):
                atomic_write_text(folder / f"class_{i:05d}.txt", prompt)  # caption first: an image never lacks its own
                save_image(image, folder / f"class_{i:05d}.png")
    accelerator.wait_for_everyone()
    found = load_concept_images(folder)[: settings.num_class_images]
    return [ConceptImage(img.path, img.image, img.caption or prompts[0]) for img in found]
