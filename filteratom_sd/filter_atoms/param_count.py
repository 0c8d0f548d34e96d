"""Trainable-parameter counts from layer shapes alone (Table 6 of the paper; works on the meta device)."""

from __future__ import annotations

from torch import nn

from ..core.layer import base_layer_of
from .config import FilterAtomConfig
from .method import parameter_shapes
from .targets import select_targets


def filter_atom_parameters(unet: nn.Module, config: FilterAtomConfig) -> int:
    """What `add_filter_atoms` would train: every tensor of `parameter_shapes` but the fixed atoms."""
    targets, _ = select_targets(unet, config)
    total = 0
    for name, layout in targets.items():
        shape = tuple(base_layer_of(unet.get_submodule(name)).weight.shape)
        for key, tensor_shape in parameter_shapes(config, layout, shape).items():
            if key != "atoms0":
                total += _numel(tensor_shape)
    return total


def lora_parameters(unet: nn.Module, targets: list[str], rank: int) -> int:
    """LoRA on the same layers: r * (c_out + c_in * k * k) per layer (k = 1 for linears)."""
    total = 0
    for name in targets:
        shape = base_layer_of(unet.get_submodule(name)).weight.shape
        total += rank * (shape[0] + _numel(shape[1:]))
    return total


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
