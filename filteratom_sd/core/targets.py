"""Which layers of a UNet an adapter targets by default, and swapping modules in by dotted name."""

from __future__ import annotations

import re
from typing import Callable

from torch import nn

from .layer import base_layer_of

# Linear layers adapted by default: attention projections, feed-forward, proj_in/proj_out.
DEFAULT_LINEAR_PATTERN = re.compile(r"(attn\d*\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$")


def classify_layer(name: str, module: nn.Module) -> tuple[str | None, str]:
    """("conv" | "blocks" | None, reason): how the default rule treats a module."""
    module = base_layer_of(module)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None, "grouped convolution"
        if module.kernel_size == (1, 1):
            return "blocks", "1x1 convolution"
        return "conv", f"{module.kernel_size[0]}x{module.kernel_size[1]} convolution"
    if isinstance(module, nn.Linear):
        if DEFAULT_LINEAR_PATTERN.search(name):
            return "blocks", "attention / feed-forward / projection linear"
        return None, "linear layer outside attention, feed-forward and proj_in/proj_out"
    return None, ""


def select_layers(
    unet: nn.Module,
    target_modules: list[str] | None,
    exclude_modules: list[str],
    refuse: Callable[[str, str], str | None] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """(targets: name -> "conv" | "blocks", skipped: name -> reason) among the conv and linear layers.

    Explicit `target_modules` patterns pick any conv / linear layer they match; otherwise the
    default rule applies. `refuse(name, layout)` may give a method's own reason to skip a layer.
    Every conv or linear layer not chosen is reported with a reason.
    """
    patterns = [re.compile(p) for p in target_modules] if target_modules is not None else None
    excludes = [re.compile(p) for p in exclude_modules]
    targets: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, module in unet.named_modules():
        if hasattr(module, "deltas") or ".deltas." in name:
            continue  # an AdaptedLayer and its updates: its base_layer is visited by name below
        if name.endswith(".base_layer"):
            name = name[: -len(".base_layer")]
        layout, reason = classify_layer(name, module)
        if not isinstance(base_layer_of(module), (nn.Conv2d, nn.Linear)):
            continue
        if patterns is not None:
            if not any(p.search(name) for p in patterns):
                skipped[name] = "not matched by target_modules"
                continue
            if layout is None and reason == "grouped convolution":
                skipped[name] = reason
                continue
            layout = layout or "blocks"
        elif layout is None:
            skipped[name] = reason
            continue
        refused = "matched by exclude_modules" if any(p.search(name) for p in excludes) else None
        refused = refused or (refuse(name, layout) if refuse is not None else None)
        if refused:
            skipped[name] = refused
        else:
            targets[name] = layout
    return targets, skipped


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the module at dotted `name` under `root`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
