"""Seeded image generation with a pipeline, and prompts cut to what its text encoder reads.

Image i of seed s is drawn with its own generator, seeded s * SEED_STRIDE + i, so batching
never changes an image and every caller (evaluation, the tiny checker, class images) agrees.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image

logger = logging.getLogger(__name__)

SEED_STRIDE = 100_003
# torch seeds are 64-bit: derived seeds wrap there (no change below it), so every --seed up to 2**63 - 1 works.
SEED_MODULUS = 2**64


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator of image `index` under `seed`."""
    return torch.Generator().manual_seed((seed * SEED_STRIDE + index) % SEED_MODULUS)


@torch.no_grad()
def generate_images(pipe: Any, prompts: list[str], seed: int, steps: int, guidance_scale: float,
                    batch_size: int, first_index: int = 0, size: int | None = None) -> list[Image.Image]:
    """One image per prompt, `batch_size` prompts per pipeline call; image i uses `image_generator(seed, first_index
    + i)`, at `size` x `size` pixels (default: the pipeline's own)."""
    images: list[Image.Image] = []
    sized = {} if size is None else {"height": size, "width": size}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        generators = [image_generator(seed, first_index + start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators,
                       output_type="pil", **sized).images
    return images


def truncate_prompt(tokenizer, prompt: str) -> str:
    """The prompt cut to what the text encoder reads (model_max_length tokens), with a warning when cut."""
    ids = tokenizer(prompt, truncation=False, add_special_tokens=False).input_ids
    limit = tokenizer.model_max_length - 2  # start and end tokens
    if len(ids) <= limit:
        return prompt
    logger.warning("prompt truncated to %d tokens (it has %d): %.60s...", limit, len(ids), prompt)
    return tokenizer.decode(ids[:limit], clean_up_tokenization_spaces=False)
