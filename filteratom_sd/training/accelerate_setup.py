"""The run's accelerate object (precision, accumulation, trackers, output folder) and the UNet under --compile."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..core.fast_paths import compiled, prepare_compile
from ..errors import ConfigError
from .reporting import trackers
from .settings import TrainingSettings

logger = logging.getLogger(__name__)


def make_accelerator(settings: TrainingSettings) -> Any:
    """An `accelerate.Accelerator` for these settings (its own dynamo config stays accelerate's; see `compile_unet`)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    prepare_compile()  # also when `accelerate launch` compiles: the adapted layers then trace without graph breaks
    try:
        return Accelerator(mixed_precision=settings.mixed_precision,
                           gradient_accumulation_steps=settings.gradient_accumulation_steps,
                           log_with=trackers(settings.report_to) or None,
                           project_config=ProjectConfiguration(project_dir=str(settings.output_path),
                                                               logging_dir=str(settings.output_path / "logs")))
    except ValueError as exc:
        raise ConfigError(f"Mixed precision {settings.mixed_precision!r} is not available here: {exc}") from None


def compile_unet(settings: TrainingSettings, unet: nn.Module) -> nn.Module:
    """The prepared UNet under torch.compile when `settings.compile` names a mode, else the UNet itself.

    Compiled here rather than through accelerate's dynamo plugin: accelerate keeps the first Accelerator's plugin for
    the whole process, so a second run in one process (compare, frontier, a notebook) would silently stay eager.
    """
    if settings.compile is None:
        return unet
    logger.info("torch.compile (%s, mode %s): the first step compiles the UNet", settings.compile_backend,
                settings.compile)
    return compiled(unet, settings.compile, settings.compile_backend)


def plain_model(accelerator: Any, model: nn.Module) -> nn.Module:
    """The UNet without accelerate's wrappers or torch.compile's: monitor probes, validation and saving run it eagerly.

    A compiled module would compile again for every new batch shape and for eval mode.
    """
    return accelerator.unwrap_model(model, keep_torch_compile=False)
