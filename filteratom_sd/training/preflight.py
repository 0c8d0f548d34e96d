"""Checks made before a run loads any model: the output folder is free, writable and has room.

Every user mistake about the output is found here, before anything is written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from ..errors import UserInputError
from ..output_paths import check_output_path, existing_ancestor
from .settings import TrainingSettings

CONFIG_NAME = "training_config.yaml"


def previous_concept(out: Path) -> str | None:
    """The concept of the run whose settings `out` holds (None when there is none or it is unreadable)."""
    try:
        previous = yaml.safe_load((out / CONFIG_NAME).read_text()) or {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    concept = previous.get("concept") if isinstance(previous, dict) else None
    return concept if isinstance(concept, str) else None


def check_output_dir(settings: TrainingSettings, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run (ours or another concept's) unless asked to."""
    out = settings.output_path
    if out.exists() and not out.is_dir():
        raise UserInputError(f"The output path {out} exists and is not a folder.")
    if resume and overwrite:
        raise UserInputError("--resume and --overwrite contradict each other; pass only one.")
    if not (out / CONFIG_NAME).is_file():
        if resume:
            raise UserInputError(f"There is no run to resume in {out}.")
        return
    concept = previous_concept(out)
    if resume:
        if concept != settings.concept:
            raise UserInputError(f"{out} holds a run for the concept {concept!r}, not {settings.concept!r}.")
        return
    if not overwrite:
        raise UserInputError(f"{out} already holds a run for the concept {concept!r}; pass --resume or --overwrite.")


def check_output_writable(out: Path) -> None:
    """Refuse an output folder that is a file, lies under one, or that this user cannot write to."""
    check_output_path(out, "--output-dir", folder=True)


def check_class_images_folder(images: str, class_images: str | None) -> None:
    """Refuse --class-images that would put generated images among the concept's own photos."""
    if class_images is None:
        return
    concept, generated = Path(images).resolve(), Path(class_images).resolve()
    if generated == concept or concept in generated.parents:
        raise UserInputError(f"--class-images {class_images} is inside the concept's --images folder; "
                             f"generated class images would mix with the photos, so choose another folder.")


# each checkpoint: fp32 weights and AdamW's two moments for resuming, and the step's adapter file
CHECKPOINT_BYTES_PER_PARAMETER = 16


def bytes_needed(trainable: int, settings: TrainingSettings) -> int:
    """Disk a run needs: the fp32 adapter, and checkpoints (weights + AdamW's two moments) kept at once."""
    # +1: a new checkpoint (or the one an interrupt saves) is written before the oldest is removed
    kept = min(settings.checkpoints_total_limit, settings.steps // settings.checkpoint_every) + 1
    return 4 * trainable + kept * CHECKPOINT_BYTES_PER_PARAMETER * trainable + 2**20  # 1 MiB for the card, settings, logs and samples


def bytes_reused(out: Path, trainable: int, settings: TrainingSettings) -> int:
    """Disk the run's own checkpoints already hold (rotated away as new ones come), counted once, not twice."""
    kept = min(settings.checkpoints_total_limit, settings.steps // settings.checkpoint_every)
    folder = out / "checkpoints"
    held = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
    return min(held, kept * CHECKPOINT_BYTES_PER_PARAMETER * trainable)


def check_free_space(out: Path, needed: int) -> None:
    """Refuse to start a run that the output disk cannot hold."""
    free = shutil.disk_usage(existing_ancestor(out)).free
    if free < needed:
        raise UserInputError(
            f"Not enough free space for {out}: the run needs about {needed / 2**20:,.1f} MiB "
            f"(adapter and checkpoints), {free / 2**20:,.1f} MiB are free."
        )
