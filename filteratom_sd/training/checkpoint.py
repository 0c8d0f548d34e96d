"""Resumable training state: adapter parameters, optimizer and LR-scheduler state, step; and the adapter file.

Every checkpoint also holds the adapter at its step as a normal adapter file, so a checkpoint
folder can be sampled, inspected and loaded like the final adapter.

A checkpoint is a folder checkpoints/step-NNNNNN/ written under a temporary name and renamed
when complete, so a crash never leaves a half-written checkpoint under a final name. Random
numbers are derived from (seed, step), so no generator state needs saving.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import disk_full_error, is_disk_full
from ..errors import TrainingError, UserInputError

logger = logging.getLogger(__name__)

_PREFIX = "step-"


@dataclass
class TrainingState:
    """What a checkpoint restores."""

    step: int
    losses: list[float]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(folder: Path, step: int, params: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    losses: list[float], keep: int, run: dict | None = None,
                    write_adapter: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step` atomically, then drop the oldest ones beyond `keep`.

    `run` (the run's identity and settings) goes into state.json, for --resume to check against;
    `write_adapter(folder)` writes the adapter file into the checkpoint before it gets its final name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_PREFIX}{step:06d}"
    tmp = folder / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in params.items()}, str(tmp / "params.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}, tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, **(run or {})}))
        if write_adapter is not None:
            write_adapter(tmp)
        for file in tmp.iterdir():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.save reports a full disk as an internal error: judge by the space left for weights + AdamW moments
        if isinstance(exc, Exception) and is_disk_full(exc, folder, 12 * sum(v.numel() for v in params.values())):
            raise disk_full_error(folder) from exc
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path, params: dict[str, nn.Parameter], optimizer, lr_scheduler) -> TrainingState:
    """Restore parameters (in place), optimizer and scheduler; returns the step and loss history."""
    try:
        saved = load_file(str(path / "params.safetensors"))
        extra = torch.load(path / "optimizer.pt", weights_only=True)
        state = json.loads((path / "state.json").read_text())
    except Exception:  # a damaged checkpoint of any kind is reported the same way
        raise TrainingError(f"The checkpoint {path} is damaged; delete it to resume from an earlier one.") from None
    if set(saved) != set(params) or any(saved[n].shape != p.shape for n, p in params.items()):
        raise UserInputError(f"The checkpoint {path} was written for a different adapter configuration.")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(saved[name].to(param.dtype))
    optimizer.load_state_dict(extra["optimizer"])
    lr_scheduler.load_state_dict(extra["lr_scheduler"])
    return TrainingState(int(state["step"]), list(state["losses"]))
