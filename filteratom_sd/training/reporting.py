"""What a training run reports besides its adapter: validation grids and accelerate's trackers."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ConfigError
from ..images import save_grid
from .settings import TrainingSettings

logger = logging.getLogger(__name__)


def validation_prompts(settings: TrainingSettings) -> list[str]:
    if settings.validation_prompts:
        return settings.validation_prompts
    return [settings.prompt_templates[0].format(settings.trigger)]


@torch.no_grad()
def validate(pipe, unet, settings: TrainingSettings, path: Path) -> Path:
    """Sample each validation prompt twice with fixed seeds and save one grid."""
    was_training = unet.training
    unet.eval()
    original_unet = pipe.unet
    pipe.unet = unet
    try:
        prompts = validation_prompts(settings)
        images = []
        for prompt in prompts:
            generator = torch.Generator().manual_seed(settings.seed)
            images += pipe([prompt] * 2, num_inference_steps=settings.validation_steps,
                           guidance_scale=settings.guidance_scale, generator=generator,
                           height=settings.resolution, width=settings.resolution).images
    finally:
        pipe.unet = original_unet
        unet.train(was_training)
    save_grid(images, path, columns=2)
    return path


def trackers(report_to: str) -> list[str]:
    """accelerate's trackers for --report-to (TensorBoard silently off where it is not installed)."""
    if report_to == "none":
        return []
    if report_to == "wandb":
        from accelerate.utils import is_wandb_available

        if not is_wandb_available():
            raise ConfigError("--report-to wandb needs the wandb package (pip install wandb).")
        return ["wandb"]
    try:
        import torch.utils.tensorboard  # noqa: F401  (an optional extra)
    except ImportError:
        logger.info("no TensorBoard logs: they need the tensorboard extra (pip install 'filteratom-sd[tensorboard]')")
        return []
    return ["tensorboard"]
