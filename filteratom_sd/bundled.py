"""The tiny Stable Diffusion shipped in assets/tiny-sd (used when no --model is given)."""

from __future__ import annotations

from pathlib import Path

from .errors import UserInputError

BUNDLED_MODEL_ID = "filteratom-sd/tiny-sd"
_ASSETS = Path(__file__).resolve().parent.parent / "assets"


def bundled_model_path() -> Path:
    """Folder of the bundled tiny model (a diffusers StableDiffusionPipeline folder)."""
    path = _ASSETS / "tiny-sd"
    if not (path / "model_index.json").is_file():
        raise UserInputError(f"The bundled tiny model is missing from {path}; pass --model or reinstall from a full clone.")
    return path


def bundled_concept_path(name: str = "castle") -> Path:
    """Folder of a bundled concept image set, such as assets/concepts/castle."""
    path = _ASSETS / "concepts" / name
    if not path.is_dir():
        raise UserInputError(f"There is no bundled concept set named {name!r}.")
    return path
