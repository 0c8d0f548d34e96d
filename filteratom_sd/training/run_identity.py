"""A run's identity: every setting and input that changes the trained weights, stored with each checkpoint.

`--resume` compares the checkpoint's identity with the command's and refuses any difference, except for
the settings in SAFE_TO_CHANGE, which only decide how long the run goes on, how often it saves and what it
shows (an uninterrupted run with the new values would have passed through the same weights).
Images, class images and the base model enter by content (file hashes, the base-weight fingerprint),
so renaming or moving them is fine and editing them is not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..errors import UserInputError

# More --steps continues from the checkpoint, as diffusers' scripts do (a schedule that depends on the total, such
# as cosine, then follows the new total's curve from that step on); the others only change when checkpoints,
# validation grids and logs are written, or how the gradients and class images are computed (class images enter by
# content; torch.compile and the training path round differently, as another device would).
SAFE_TO_CHANGE = ("steps", "checkpoint_every", "checkpoints_total_limit", "validation_prompts", "validation_every",
                  "validation_steps", "guidance_scale", "on_nan", "gradient_checkpointing", "output_dir",
                  "sample_batch_size", "compile", "compile_backend", "train_path")
# Settings replaced by what they resolve to: the effective learning rate, and inputs by their content.
_RESOLVED = ("lr", "lr_by_method", "model", "images", "class_images", "token")
_NAMES = {"images": "the images or their captions", "class_images": "the class images",
          "base_model": "the base model's weights"}


def content_hash(files: list[Path], captions: list[str | None]) -> str:
    """SHA-256 over each file's name and bytes and its caption, in order."""
    digest = hashlib.sha256()
    for path, caption in zip(files, captions, strict=True):
        digest.update(path.name.encode() + b"\0" + Path(path).read_bytes() + b"\0" + repr(caption).encode() + b"\0")
    return digest.hexdigest()


def run_identity(settings: dict[str, Any], lr: float, images: str, class_images: str | None,
                 base_fingerprint: str) -> dict[str, Any]:
    """The identity of a run from its settings (as a dict) and what they resolve to."""
    identity = {k: v for k, v in settings.items() if k not in SAFE_TO_CHANGE and k not in _RESOLVED}
    if identity.get("method") != "filter-atoms":
        identity["preset"] = None  # only filter atoms read the preset
    identity.update(lr=float(lr), token=settings.get("token") or f"<{settings['concept']}>", images=images,
                    class_images=class_images, base_model=base_fingerprint)
    return json.loads(json.dumps(identity, sort_keys=True))  # tuples become lists, as after a round trip


def changed_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Descriptions of what differs, e.g. "seed (0 -> 9)" or "the images or their captions"."""
    changes = []
    for key in sorted(set(saved) | set(current)):
        before, after = saved.get(key), current.get(key)
        if before == after:
            continue
        changes.append(_NAMES.get(key, f"{key} ({_short(before)} -> {_short(after)})"))
    return changes


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def check_identity(saved: dict[str, Any] | None, current: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume `checkpoint` when its run differs from the current one in anything that changes the result."""
    if saved is None:
        return
    changes = changed_settings(saved, current)
    if changes:
        raise UserInputError(f"Cannot resume {checkpoint}: {', '.join(changes)} changed since it was written; "
                             f"undo the change, or start a new run with --overwrite or another --output-dir.")


def safe_changes(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings from SAFE_TO_CHANGE that differ, as "name: old -> new"."""
    return [f"{k}: {_short(previous.get(k))} -> {_short(current.get(k))}" for k in SAFE_TO_CHANGE
            if k != "output_dir" and previous.get(k) != current.get(k)]


def check_resume_steps(checkpoint_step: int, steps: int, checkpoint: Path) -> None:
    """Refuse --steps below the checkpoint's step: the weights would be labelled with fewer steps than they had."""
    if steps < checkpoint_step:
        raise UserInputError(f"Cannot resume {checkpoint} at step {checkpoint_step} with --steps {steps}; "
                             f"pass --steps {checkpoint_step} or more, or --resume an earlier checkpoint.")
