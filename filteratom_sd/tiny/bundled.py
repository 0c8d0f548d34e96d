"""The bundled tiny Stable Diffusion (used when no --model is given): its name and folder."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserInputError
from ..resources import bundled_model_dir

BUNDLED_MODEL_ID = "filteratom-sd/tiny-sd"


def bundled_model_path() -> Path:
    """Folder of the bundled tiny model (a diffusers StableDiffusionPipeline folder)."""
    path = bundled_model_dir()
    if not (path / "model_index.json").is_file():
        raise UserInputError(f"The bundled tiny model is missing from {path}; pass --model or reinstall filteratom-sd.")
    return path
