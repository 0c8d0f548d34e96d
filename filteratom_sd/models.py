"""Base models: a Stable Diffusion pipeline from the bundled tiny model, a diffusers folder, a hub id or one
checkpoint file; a bare UNet from its config."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserInputError
from .tiny.bundled import BUNDLED_MODEL_ID, bundled_model_path

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def model_label(model: str | None) -> str:
    """How a base model is named in metadata and model cards."""
    return BUNDLED_MODEL_ID if model is None else str(model)


def _looks_like_a_path(model: str) -> bool:
    # hub ids are "name" or "owner/name"; anything else (absolute, relative, deeper) is a local path
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1


def _dtype_keyword() -> str:
    # diffusers renamed from_pretrained's `torch_dtype` to `dtype` (deprecating the old name) together with this message
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"


def load_pipeline(model: str | None, dtype: torch.dtype = torch.float32):
    """A StableDiffusionPipeline without safety checker, from `model` (None: the bundled tiny model)."""
    from diffusers import StableDiffusionPipeline

    kwargs = {_dtype_keyword(): dtype, "safety_checker": None, "requires_safety_checker": False}
    source = bundled_model_path() if model is None else Path(model)
    try:
        if source.suffix in SINGLE_FILE_SUFFIXES:
            if not source.is_file():
                raise UserInputError(f"The checkpoint file {source} does not exist.")
            pipe = StableDiffusionPipeline.from_single_file(str(source), **kwargs)
        elif source.is_dir():
            if not (source / "model_index.json").is_file():
                raise UserInputError(f"{source} is not a diffusers pipeline folder (no model_index.json).")
            pipe = StableDiffusionPipeline.from_pretrained(str(source), **kwargs)
        elif _looks_like_a_path(str(model)):
            raise UserInputError(f"The model folder {source} does not exist.")
        else:
            pipe = StableDiffusionPipeline.from_pretrained(str(model), **kwargs)  # a hub id
    except UserInputError:
        raise
    except (OSError, ValueError) as exc:
        raise UserInputError(f"Cannot load the base model {model_label(model)!r}: {str(exc).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_unet(config: str | os.PathLike | dict[str, Any], device: str | torch.device | None = None) -> nn.Module:
    """A UNet2DConditionModel from a config file or dict (keys starting with "_" ignored), with fresh weights.

    On the meta device it costs no memory: shapes only, for parameter counts and benchmarks.
    """
    from diffusers import UNet2DConditionModel

    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    if device is None:
        return UNet2DConditionModel(**kwargs)
    with torch.device(device):
        return UNet2DConditionModel(**kwargs)
