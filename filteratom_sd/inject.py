"""Walking a UNet: choosing filter-atom targets, attaching and detaching adapters."""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import TYPE_CHECKING

from torch import nn

from .errors import ConfigError
from .methods.base import ADAPTERS_ATTR, AdapterMethod, attached_adapters

if TYPE_CHECKING:
    from .config import FilterAtomConfig

logger = logging.getLogger(__name__)

# Linear layers that get D_c by default: attention projections, feed-forward, proj_in/proj_out.
DEFAULT_LINEAR_PATTERN = re.compile(r"(attn\d*\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$")


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def classify_layer(name: str, module: nn.Module) -> tuple[str | None, str]:
    """("conv" | "blocks" | None, reason): how the default rule treats a module."""
    module = _base(module)
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


def select_targets(unet: nn.Module, config: "FilterAtomConfig") -> tuple[dict[str, str], dict[str, str]]:
    """(targets: name -> layout, skipped: name -> reason) for a filter-atom config.

    Explicit `target_modules` patterns pick any conv / linear layer they match; otherwise the
    default rule applies. Every conv or linear layer not chosen is reported with a reason.
    """
    patterns = [re.compile(p) for p in config.target_modules] if config.target_modules is not None else None
    excludes = [re.compile(p) for p in config.exclude_modules]
    targets: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for name, module in unet.named_modules():
        if hasattr(module, "deltas") or ".deltas." in name:
            continue  # an AdaptedLayer and its updates: its base_layer is visited by name below
        if name.endswith(".base_layer"):
            name = name[: -len(".base_layer")]
        layout, reason = classify_layer(name, module)
        if not isinstance(_base(module), (nn.Conv2d, nn.Linear)):
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
        if any(p.search(name) for p in excludes):
            skipped[name] = "matched by exclude_modules"
        elif layout == "blocks" and config.strategy == "D":
            skipped[name] = "strategy D tunes k x k convolutions only"
        else:
            targets[name] = layout
    return targets, skipped


def check_block_size(unet: nn.Module, targets: dict[str, str], kc: int) -> None:
    """Refuse a kc that divides no channel count of any block-form target."""
    blocks = [unet.get_submodule(n) for n, layout in targets.items() if layout == "blocks"]
    if not blocks:
        return
    channels = {dim for module in blocks for dim in _base(module).weight.shape[:2]}
    if not any(c % kc == 0 for c in channels):
        raise ConfigError(f"kc={kc} divides none of the channel counts of the linear and 1x1 layers it targets.")


def add_adapter(unet: nn.Module, method: AdapterMethod, adapter_name: str = "default") -> int:
    """Inject `method` under `adapter_name`, freeze everything else, return the trainable count."""
    adapters = attached_adapters(unet)
    if adapter_name in adapters:
        raise ConfigError(f"An adapter named '{adapter_name}' is already attached.")
    method.inject(unet, adapter_name)
    for name, reason in sorted(method.skipped.items()):
        logger.debug("not adapted: %s (%s)", name, reason)
    reasons = Counter(method.skipped.values())
    for reason, times in sorted(reasons.items()):
        logger.info("not adapted: %d layer(s): %s (listed with --verbose)", times, reason)
    unet.requires_grad_(False)
    params = method.trainable_parameters(unet, adapter_name)
    for p in params:
        p.requires_grad_(True)
    setattr(unet, ADAPTERS_ATTR, {**adapters, adapter_name: method})
    count = sum(p.numel() for p in params)
    logger.info("adapter '%s': %d targets, %d skipped, %d trainable parameters", adapter_name, len(method.targets), len(method.skipped), count)
    return count


def remove_adapter(unet: nn.Module, adapter_name: str) -> None:
    """Detach one adapter; the last one removed leaves the original modules in place."""
    adapters = dict(attached_adapters(unet))
    if adapter_name not in adapters:
        raise ConfigError(f"No adapter named '{adapter_name}' is attached.")
    adapters.pop(adapter_name).remove(unet, adapter_name)
    setattr(unet, ADAPTERS_ATTR, adapters)


def add_filter_atoms(unet: nn.Module, config: "FilterAtomConfig", adapter_name: str = "default") -> int:
    """Swap filter-atom layers into `unet` (see `FilterAtomConfig`); returns the trainable count."""
    from .methods.filter_atoms import FilterAtomMethod

    return add_adapter(unet, FilterAtomMethod(config), adapter_name)
