"""The exact-unfuse backup of foreign wrappers (peft's layers) that we fuse: their base's weight and bias."""

from __future__ import annotations

from torch import Tensor, nn

FUSE_BACKUP_ATTR = "filteratom_fuse_backup"
# What unfusing says after `merge_and_unload`'s fuse, which keeps no backup.
NO_BACKUP = "This layer was fused without a backup of its base weight and cannot be unfused."


def keep_fuse_backup(module: nn.Module, base: nn.Module) -> None:
    """Store a copy of `base`'s weight and bias on a foreign wrapper before it is first fused."""
    if getattr(module, FUSE_BACKUP_ATTR, None) is None:
        bias = None if base.bias is None else base.bias.detach().clone()
        setattr(module, FUSE_BACKUP_ATTR, (base.weight.detach().clone(), bias))


def fuse_backup(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The backup `keep_fuse_backup` stored on `module` (None when there is none)."""
    return getattr(module, FUSE_BACKUP_ATTR, None)


def pop_fuse_backup(module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """Remove and return the backup `keep_fuse_backup` stored (None when there is none)."""
    backup = fuse_backup(module)
    if backup is not None:
        delattr(module, FUSE_BACKUP_ATTR)
    return backup
