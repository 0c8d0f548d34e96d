"""What --resume continues from: the checkpoint it picks and what that checkpoint records about its run."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import TrainingError, UserInputError
from .checkpoint import list_checkpoints
from .run_identity import check_identity, safe_changes

logger = logging.getLogger(__name__)

LATEST = "latest"


@dataclass
class CheckpointRecord:
    """A checkpoint's folder, step, and the identity and settings of the run that wrote it (None if not recorded)."""

    path: Path
    step: int
    identity: dict[str, Any] | None
    settings: dict[str, Any] | None


def find_checkpoint(checkpoints: Path, resume: bool | str | os.PathLike) -> Path:
    """The newest checkpoint for `--resume`, or the one `--resume PATH` names (its folder or a file in it)."""
    if resume is True or resume == LATEST:
        found = list_checkpoints(checkpoints)
        if not found:
            raise UserInputError(f"There is no checkpoint to resume in {checkpoints.parent}, so nothing was changed; "
                                 f"pass --overwrite instead of --resume to train it again from the start.")
        return found[-1]
    path = Path(resume)
    folder = path if path.is_dir() else path.parent
    if not folder.name.startswith("step-") or not (folder / "state.json").is_file():
        raise UserInputError(f"{path} is not a checkpoint (a checkpoints/step-NNNNNN folder, or a file in one).")
    return folder


def read_record(path: Path) -> CheckpointRecord:
    """Read a checkpoint's state.json without loading its tensors."""
    try:
        state = json.loads((path / "state.json").read_text())
        return CheckpointRecord(path, int(state["step"]), state.get("identity"), state.get("settings"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise TrainingError(f"The checkpoint {path} is damaged; delete it to resume from an earlier one.") from None


def check_resumable(record: CheckpointRecord, identity: dict[str, Any], settings: dict[str, Any]) -> None:
    """Refuse a checkpoint of a different run; log the safe changes it accepts."""
    if record.identity is None:
        logger.warning("%s records no run identity (an older version wrote it); its settings cannot be checked",
                       record.path)
    check_identity(record.identity, identity, record.path)
    changes = safe_changes(record.settings or {}, settings) if record.settings is not None else []
    if changes:
        logger.info("resuming with changed settings that keep the trained weights the same: %s", "; ".join(changes))
