"""Where an export writes: refuse to replace an existing output unless asked, and write folders atomically."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import UserInputError


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse an existing output path unless `overwrite`."""
    if path.exists() and not overwrite:
        raise UserInputError(f"{path} already exists; pass --overwrite to replace it.")


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Yield an empty folder beside `path`; on success it takes `path`'s place (an old folder there is removed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield staging
        if path.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            path.rename(old / path.name)
            staging.rename(path)
            shutil.rmtree(old)
        else:
            if path.exists():
                path.unlink()
            staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
