"""Where a command will write, checked before any model loads: a failure after minutes of work helps nobody."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserInputError


def existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, else its nearest existing parent (absolute)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_path(path: Path, option: str, folder: bool) -> None:
    """UserInputError unless `path` can be written as a folder (`folder`) or a file, by this user."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserInputError(f"{option} {path} exists and is not a folder; give a folder for the output.")
    if not folder and path.is_dir():
        raise UserInputError(f"{option} {path} is a folder; give the file to write, such as {path / 'eval.json'}.")
    place = existing_ancestor(path if folder else path.parent)
    if not place.is_dir():
        raise UserInputError(f"{option} {path} lies under {place}, which is a file, not a folder.")
    if not os.access(place, os.W_OK | os.X_OK):
        raise UserInputError(f"Cannot write to {place}: choose another {option}.")
