"""Prior-preservation images: read from --class-images, generating the missing ones with the base model."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..generation import image_generator
from ..images import save_image
from .data import ConceptImage, load_concept_images

logger = logging.getLogger(__name__)


@torch.no_grad()
def prepare_class_images(pipe, settings, accelerator) -> list[ConceptImage]:
    """Up to num_class_images class images with their captions; missing ones are generated and saved first.

    Image i is generated from class prompt i modulo their count and saved with a same-name .txt
    caption, so several class prompts (e.g. one per background) each keep their own prior.
    """
    folder = Path(settings.class_images) if settings.class_images else settings.output_path / "class_images"
    existing = load_concept_images(folder) if folder.is_dir() and any(folder.iterdir()) else []
    missing = settings.num_class_images - len(existing)
    prompts = settings.class_prompts
    if missing > 0 and accelerator.is_main_process:
        logger.info("generating %d class images for %d class prompt(s)", missing, len(prompts))
        pipe.to(accelerator.device)
        for i in range(len(existing), settings.num_class_images):
            generator = image_generator(settings.seed, 12_345 + i)  # apart from the indices evaluation uses
            prompt = prompts[i % len(prompts)]
            image = pipe(prompt, num_inference_steps=settings.validation_steps, guidance_scale=settings.guidance_scale,
                         generator=generator, height=settings.resolution, width=settings.resolution).images[0]
            atomic_write_text(folder / f"class_{i:05d}.txt", prompt)  # caption first: an image never lacks its own
            save_image(image, folder / f"class_{i:05d}.png")
    accelerator.wait_for_everyone()
    found = load_concept_images(folder)[: settings.num_class_images]
    return [ConceptImage(img.path, img.image, img.caption or prompts[0]) for img in found]
