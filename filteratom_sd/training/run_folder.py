"""The output folder of a training run: who may write to it, what counts as a run, what a new run clears first.

One `fa-sd train` at a time holds the folder's lock (an flock on `.fa-sd.lock`, which the kernel releases
when the process dies, so a killed run's lock is stale at once; the file names the holder's pid and host
for the message). Leftovers of writes cut short by a kill are removed by the next run that holds the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from ..errors import UserInputError
from .preflight import CONFIG_NAME

logger = logging.getLogger(__name__)

LOCK_NAME = ".fa-sd.lock"
TRASH_PREFIX = ".fa-sd-trash-"
# What a run writes at the top of its folder, besides `<concept>.safetensors`; --overwrite clears these.
# Checkpoints go first and the settings last: a kill part-way leaves nothing that --resume would take up.
RUN_OUTPUTS = ("checkpoints", "samples", "logs", "class_images", "monitor.json", "README.md", CONFIG_NAME)
# Subfolders where atomic writes leave temporary files when killed.
_WRITE_FOLDERS = (".", "samples", "checkpoints", "class_images")
# atomic_path's temporary files (.<name>.<8 random characters>.tmp) and save_checkpoint's folders (.step-NNNNNN.tmp).
_LEFTOVER = re.compile(r"^\.(.+\.[A-Za-z0-9_]{8}|step-\d+)\.tmp$")


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` holds a run of ours (its settings file, or the lock of a run that never got to write it)."""
    return (folder / CONFIG_NAME).is_file() or (folder / LOCK_NAME).is_file()


def check_not_foreign(folder: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder that is not a run of ours, unless --overwrite (then only our outputs are replaced)."""
    if overwrite or not folder.is_dir() or is_run_folder(folder) or not any(folder.iterdir()):
        return
    raise UserInputError(f"{folder} is not empty and is not a fa-sd run; choose another --output-dir, "
                         f"or pass --overwrite to replace its README.md and any other file a run writes.")


class RunLock:
    """An exclusive lock on a run folder, held for the whole run (creating the folder if needed)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.created: list[Path] = []  # folders made by acquire(), deepest last
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise UserInputError naming the process that holds it."""
        missing = [p for p in [self.folder, *self.folder.parents] if not p.exists()]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.created = missing[::-1]
        path = self.folder / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                raise UserInputError(f"{self.folder} is in use by {_holder(path)}; wait for it to finish "
                                     f"or choose another --output-dir.") from None
            # a holder that released meanwhile may have removed the file we locked: lock the one on disk
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
            os.close(fd)
        previous = os.read(fd, 4096)
        if previous:
            logger.warning("taking over the stale lock of %s, which stopped without releasing it", _describe(previous))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        self._fd = fd
        return self

    def release(self, remove_created: bool = False) -> None:
        """Drop the lock (and remove the lock file); with remove_created, also the folders acquire() made."""
        if self._fd is None:
            return
        remove = remove_created and self.folder in self.created
        if remove:  # emptied while still locked, so no other run's files can be among what goes
            for entry in self.folder.iterdir():
                if entry.name != LOCK_NAME:
                    _remove(entry)
        try:
            os.unlink(self.folder / LOCK_NAME)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        if remove:
            for folder in reversed(self.created):
                try:
                    folder.rmdir()  # only while empty: another run may have taken the folder meanwhile
                except OSError:
                    break
        self.created = []

    def keep_folders(self) -> None:
        """The run has started writing: release() leaves the folders acquire() made."""
        self.created = []


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()


def _describe(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"process {int(holder['pid'])} on {holder['host']}"
    except (ValueError, KeyError, TypeError):
        return "an earlier fa-sd train"


def _holder(path: Path) -> str:
    try:
        return _describe(path.read_bytes()[:4096])
    except OSError:
        return "another fa-sd train"


def clean_interrupted_writes(folder: Path) -> int:
    """Remove temporary files and folders left by writes that a kill cut short; returns how many."""
    removed = 0
    for sub in _WRITE_FOLDERS:
        place = folder / sub
        if not place.is_dir():
            continue
        for entry in place.iterdir():
            leftover = _LEFTOVER.match(entry.name) or (sub == "." and entry.name.startswith(TRASH_PREFIX))
            if not leftover:
                continue
            _remove(entry)
            removed += 1
    if removed:
        logger.info("removed %d temporary file(s) left by an interrupted run in %s", removed, folder)
    return removed


def clear_previous_run(folder: Path, concepts: set[str]) -> list[str]:
    """Move the outputs of an earlier run aside in one rename each, then delete them; returns their names.

    A kill while deleting leaves a hidden trash folder (removed by the next run), never a mix of an old
    and a new run under final names.
    """
    adapters = [f"{c}.safetensors" for c in sorted(concepts)]
    names = [n for n in (RUN_OUTPUTS[0], *adapters, *RUN_OUTPUTS[1:]) if (folder / n).exists()]
    if not names:
        return []
    trash = Path(tempfile.mkdtemp(prefix=TRASH_PREFIX, dir=folder))
    for name in names:
        os.replace(folder / name, trash / name)
    shutil.rmtree(trash)
    logger.info("--overwrite: removed the earlier run's %s", ", ".join(names))
    return names

