"""Checks made before a run loads any model: the output folder is free, writable and has room.

Every user mistake about the output is found here, before anything is written.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from ..errors import UserInputError
from .settings import TrainingSettings

CONFIG_NAME = "training_config.yaml"


def check_output_dir(settings: TrainingSettings, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an earlier run (ours or another concept's) unless asked to."""
    out = settings.output_path
    if out.exists() and not out.is_dir():
        raise UserInputError(f"The output path {out} exists and is not a folder.")
    config = out / CONFIG_NAME
    if not config.is_file():
        if resume:
            raise UserInputError(f"There is no run to resume in {out}.")
        return
    try:
        previous = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError:
        previous = {}
    concept = previous.get("concept") if isinstance(previous, dict) else None
    if resume:
        if concept != settings.concept:
            raise UserInputError(f"{out} holds a run for the concept {concept!r}, not {settings.concept!r}.")
        return
    if not overwrite:
        raise UserInputError(f"{out} already holds a run for the concept {concept!r}; pass --resume or --overwrite.")


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_writable(out: Path) -> None:
    """Refuse an output folder (or the folder it will be made in) that this user cannot write to."""
    place = _existing_ancestor(out)
    if not os.access(place, os.W_OK | os.X_OK):
        raise UserInputError(f"Cannot write to {place}: choose another --output-dir.")


def bytes_needed(trainable: int, settings: TrainingSettings) -> int:
    """Disk a run needs: the fp32 adapter, and checkpoints (weights + AdamW's two moments) kept at once."""
    # +1: a new checkpoint (or the one an interrupt saves) is written before the oldest is removed
    kept = min(settings.checkpoints_total_limit, settings.steps // settings.checkpoint_every) + 1
    # each checkpoint: weights and the two moments for resuming, and the adapter file
    return 4 * trainable + kept * 16 * trainable + 2**20  # 1 MiB for the card, settings, logs and samples


def check_free_space(out: Path, needed: int) -> None:
    """Refuse to start a run that the output disk cannot hold."""
    free = shutil.disk_usage(_existing_ancestor(out)).free
    if free < needed:
        raise UserInputError(
            f"Not enough free space for {out}: the run needs about {needed / 2**20:,.1f} MiB "
            f"(adapter and checkpoints), {free / 2**20:,.1f} MiB are free."
        )
