"""`fa-sd sample`: load a base pipeline, attach adapters through the public hook, generate and save."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .checks import MAX_ADAPTER_SCALE, MAX_GUIDANCE, MAX_SEED
from .core.api import load_adapter, merge_and_unload
from .errors import UserInputError
from .generation import truncate_prompt
from .images import save_grid, save_image
from .models import load_pipeline
from .output_paths import check_output_path

logger = logging.getLogger(__name__)

_DEFAULTS = {True: (20, 5.0), False: (30, 7.5)}  # (steps, guidance) for the bundled model / others


@dataclass
class SampleRequest:
    """Everything `fa-sd sample` was asked for."""

    prompts: list[str]
    adapters: list[str]
    scales: list[float]
    model: str | None = None
    num_images: int = 1
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    out: Path = Path("samples")
    grid: bool = False
    fuse: bool = False
    batch_size: int = 4

    def validate(self) -> None:
        """One-sentence errors before any model is loaded or file written."""
        if not self.prompts:
            raise UserInputError("Give at least one --prompt or a --prompts-file.")
        if self.scales and len(self.scales) != len(self.adapters):
            raise UserInputError("Give one --adapter-scale per --adapter, or none.")
        if self.num_images <= 0:
            raise UserInputError("--num-images must be positive.")
        if self.batch_size <= 0:
            raise UserInputError("--batch-size must be positive.")
        if self.steps is not None and self.steps <= 0:
            raise UserInputError("--steps must be positive.")
        for size in (self.height, self.width):
            if size is not None and (size <= 0 or size % 8):
                raise UserInputError("--height and --width must be positive multiples of 8.")
        for adapter in self.adapters:
            if not Path(adapter).exists():
                raise UserInputError(f"No adapter file or folder at {adapter}.")
        if not all(math.isfinite(s) and abs(s) <= MAX_ADAPTER_SCALE for s in self.scales):
            raise UserInputError(f"--adapter-scale must be a finite number from -{MAX_ADAPTER_SCALE:g} to "
                                 f"{MAX_ADAPTER_SCALE:g}, got {self.scales}.")
        if self.guidance_scale is not None and not 0 <= self.guidance_scale <= MAX_GUIDANCE:
            raise UserInputError(f"--guidance-scale must be between 0 and {MAX_GUIDANCE:g}, got {self.guidance_scale}.")
        if not 0 <= self.seed <= MAX_SEED - self.num_images:
            raise UserInputError(f"--seed must be an integer from 0 to 2**63 - 1 - --num-images, got {self.seed}.")
        check_output_path(self.out, "--out", folder=True)


def _slug(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "prompt"


def run_sampling(request: SampleRequest) -> list[Path]:
    """Generate num_images per prompt (seeds seed, seed+1, ...), batch_size per pipeline call; returns the written
    files. Image n always comes from its own generator, so the batch size changes no image beyond rounding."""
    request.validate()
    pipe = load_pipeline(request.model)
    pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    for i, adapter in enumerate(request.adapters):
        load_adapter(pipe, adapter, scale=request.scales[i] if request.scales else 1.0)
    if request.fuse:
        merge_and_unload(pipe)  # this process never unfuses: write into the weights' own storage, keep no backup
    steps, guidance = _DEFAULTS[request.model is None]
    written = []
    for index, prompt in enumerate(request.prompts):
        prompt = truncate_prompt(pipe.tokenizer, prompt)
        images = []
        for first in range(0, request.num_images, request.batch_size):
            count = min(request.batch_size, request.num_images - first)
            generators = [torch.Generator().manual_seed(request.seed + n) for n in range(first, first + count)]
            images += pipe([prompt] * count, num_inference_steps=request.steps or steps,
                           guidance_scale=request.guidance_scale if request.guidance_scale is not None else guidance,
                           generator=generators, height=request.height, width=request.width).images
        for n, image in enumerate(images):
            written.append(save_image(image, request.out / f"{index:02d}-{_slug(prompt)}-{n}.png"))
        if request.grid:
            written.append(save_grid(images, request.out / f"{index:02d}-{_slug(prompt)}-grid.png", columns=len(images)))
    return written
