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


# The UNet's own blocks: loralib-style LoRA counts every layer in them, time_emb_proj included.
_UNET_BLOCKS = ("down_blocks", "mid_block", "up_blocks")


def _layer_shapes(unet: nn.Module, blocks_only: bool) -> list[tuple[int, int, int]]:
    """(c_out, c_in, k*k) of every conv and linear layer (in the UNet's blocks only, when asked)."""
    shapes = []
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if blocks_only and name.split(".")[0] not in _UNET_BLOCKS:
            continue
        w = module.weight.shape
        shapes.append((w[0], w[1], w[2] * w[3] if len(w) == 4 else 1))
    return shapes


def loralib_lora_parameters(unet: nn.Module, rank: int) -> int:
    """loralib's LoRA count: r * k^2 * (c_in + c_out) per conv, r * (c_in + c_out) per linear, over every
    layer in the down, mid and up blocks (conv_in, conv_out and the time embedding left out)."""
    return sum(rank * k2 * (c_in + c_out) for c_out, c_in, k2 in _layer_shapes(unet, blocks_only=True))


def lycoris_loha_parameters(unet: nn.Module, rank: int) -> int:
    """LyCORIS's LoHa count without Tucker factors: 2 * r * (c_out + c_in * k^2) over every conv and linear."""
    return sum(2 * rank * (c_out + c_in * k2) for c_out, c_in, k2 in _layer_shapes(unet, blocks_only=False))


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total
