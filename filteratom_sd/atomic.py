"""Atomic file writes: a file appears under its final name complete, or not at all."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any
from pathlib import Path

from .errors import TrainingError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success it is fsynced and renamed to `path`."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes owner-only files, and writers that recreate the file keep that: the saved file gets the usual mode
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except Exception as exc:
        if is_disk_full(exc, final.parent):
            raise disk_full_error(final.parent) from exc
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def is_disk_full(exc: BaseException, folder: Path, needed: int = 0) -> bool:
    """Whether a write failed for lack of space: by errno, by the message of libraries that hide it, or free < needed."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if "No space left on device" in str(exc) or "os error 28" in str(exc):
        return True
    try:
        return shutil.disk_usage(folder).free < needed
    except OSError:
        return False


def disk_full_error(folder: Path) -> TrainingError:
    """The one-sentence error for a full disk."""
    return TrainingError(f"The disk holding {folder} is full; free some space and run again "
                         f"(a training run continues with --resume).")


def atomic_save_figure(figure: Any, path: str | os.PathLike) -> Path:
    """Save a matplotlib figure as PNG atomically, close it, and return the path."""
    import matplotlib.pyplot as plt  # matplotlib is loaded only by the commands that plot

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(path)
