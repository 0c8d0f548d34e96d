"""The layers a filter-atom config adapts, and the check that its block size fits them."""

from __future__ import annotations

from torch import nn

from ..core.layer import base_layer_of
from ..core.targets import select_layers
from ..errors import ConfigError
from .config import FilterAtomConfig


def select_targets(unet: nn.Module, config: FilterAtomConfig) -> tuple[dict[str, str], dict[str, str]]:
    """(targets: name -> layout, skipped: name -> reason) for a filter-atom config.

    The default rule of `select_layers`; strategy "D" keeps only the k x k convolutions.
    """
    def conv_only(name: str, layout: str) -> str | None:
        return "strategy D tunes k x k convolutions only" if layout == "blocks" and config.strategy == "D" else None

    return select_layers(unet, config.target_modules, config.exclude_modules, refuse=conv_only)


def check_block_size(unet: nn.Module, targets: dict[str, str], kc: int) -> None:
    """Refuse a kc that divides no channel count of any block-form target."""
    blocks = [unet.get_submodule(n) for n, layout in targets.items() if layout == "blocks"]
    if not blocks:
        return
    channels = {dim for module in blocks for dim in base_layer_of(module).weight.shape[:2]}
    if not any(c % kc == 0 for c in channels):
        raise ConfigError(f"kc={kc} divides none of the channel counts of the linear and 1x1 layers it targets.")
