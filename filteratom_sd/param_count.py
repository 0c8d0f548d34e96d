"""Trainable-parameter counts from layer shapes alone (works on the meta device, no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .config import FilterAtomConfig
from .decompose import block_size
from .inject import select_targets

SD_V1_4_UNET_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "models" / "sd-v1-4-unet.json"


def build_unet_on_meta(config_path: str | Path = SD_V1_4_UNET_CONFIG) -> nn.Module:
    """A UNet2DConditionModel from a config file, with meta tensors (no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in json.loads(Path(config_path).read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


def _weight(unet: nn.Module, name: str) -> torch.Tensor:
    module = unet.get_submodule(name)
    return getattr(module, "base_layer", module).weight


def filter_atom_parameters(unet: nn.Module, config: FilterAtomConfig) -> int:
    """What `add_filter_atoms` would train, from Table 6's formulas and the target shapes."""
    targets, _ = select_targets(unet, config)
    total = 0
    for name, layout in targets.items():
        shape = _weight(unet, name).shape
        c_out, c_in = shape[0], shape[1]
        if layout == "conv":
            k2 = shape[2] * shape[3]
            if config.strategy == "beta+D1+Dc":
                total += config.m * config.m1 * k2 + c_in * config.m * config.m1
            else:
                total += config.m * k2
            alpha = c_out * c_in * config.m
        else:
            kc_in = block_size(c_in, config.kc)
            kc_o = block_size(c_out, config.kc if config.kc_out is None else config.kc_out)
            total += config.m * kc_o * kc_in
            alpha = (c_out // kc_o) * (c_in // kc_in) * config.m
        if config.train_alpha:
            total += alpha
    return total


def lora_parameters(unet: nn.Module, targets: list[str], rank: int) -> int:
    """LoRA on the same layers: r * (c_out + c_in * k * k) per layer (k = 1 for linears)."""
    total = 0
    for name in targets:
        shape = _weight(unet, name).shape
        fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        total += rank * (shape[0] + fan_in)
    return total
