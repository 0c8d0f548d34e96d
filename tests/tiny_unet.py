"""A tiny UNet2DConditionModel with k x k convs, 1x1 convs and attention, built in well under a second."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

CROSS_DIM = 32


def make_unet(seed: int = 0) -> UNet2DConditionModel:
    """Same seed, same weights."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    ).eval()


def make_inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents, timesteps, text embeddings) for `make_unet`."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 500]),
            torch.randn(2, 7, CROSS_DIM, generator=gen))


def run(unet: UNet2DConditionModel, inputs: tuple) -> torch.Tensor:
    """UNet output for the given inputs, without autograd."""
    with torch.no_grad():
        return unet(*inputs).sample
