"""Names of the original Stable Diffusion (LDM / CompVis) checkpoint for diffusers' SD 1.x state-dict keys.

The single file A1111 and ComfyUI open as a checkpoint holds the UNet under `model.diffusion_model.`,
the VAE under `first_stage_model.` and the CLIP text encoder under `cond_stage_model.transformer.`,
with the block numbering of the original code. These functions rename one key at a time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..errors import ConfigError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, table: Mapping[str, str]) -> str:
    """Rename the leading module path of `rest` ("conv1.weight") through `table`, longest match first."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    return rest


def _unsupported(key: str, part: str) -> ConfigError:
    return ConfigError(f"The {part} key {key!r} has no place in the original Stable Diffusion checkpoint layout.")


def unet_key(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of a diffusers UNet2DConditionModel key, for the SD 1.x block layout."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise ConfigError("Only UNets with the same layers_per_block in every block can be written as one checkpoint.")
    renamed = _rename_head(key, _UNET_TOP)
    if renamed != key:
        return renamed
    if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        position = 1 + block * (per_block + 1) + index
        return f"input_blocks.{position}." + (f"0.{_rename_head(rest, _UNET_RESNET)}" if kind == "resnets" else f"1.{rest}")
    if match := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(match[1]) + 1) * (per_block + 1)}.0.op.{match[2]}"
    if match := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(match[1])}.{_rename_head(match[2], _UNET_RESNET)}"
    if match := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{match[1]}"
    if match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
        position = block * (per_block + 1) + index
        return f"output_blocks.{position}." + (f"0.{_rename_head(rest, _UNET_RESNET)}" if kind == "resnets" else f"1.{rest}")
    if match := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        block = int(match[1])
        # the upsampler follows the block's last resnet, and its attention when the block has one
        slot = 2 if "CrossAttn" in config["up_block_types"][block] else 1
        return f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{match[2]}"
    raise _unsupported(key, "UNet")


def vae_key(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without prefix) of a diffusers AutoencoderKL key."""
    if re.fullmatch(r"(post_)?quant_conv\.\w+|(encoder|decoder)\.conv_(in|out)\.\w+", key):
        return key
    if match := re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(\w+)", key):
        return f"{match[1]}.norm_out.{match[2]}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{match[1]}.block.{match[2]}.{_rename_head(match[3], _VAE_RESNET)}"
    if match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"encoder.down.{match[1]}.downsample.conv.{match[2]}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        # the original decoder numbers its levels from the lowest resolution up
        level = len(config["up_block_types"]) - 1 - int(match[1])
        return f"decoder.up.{level}.block.{match[2]}.{_rename_head(match[3], _VAE_RESNET)}"
    if match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        level = len(config["up_block_types"]) - 1 - int(match[1])
        return f"decoder.up.{level}.upsample.conv.{match[2]}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{match[1]}.mid.block_{int(match[2]) + 1}.{_rename_head(match[3], _VAE_RESNET)}"
    if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{match[1]}.mid.attn_1.{_rename_head(match[2], _VAE_ATTENTION)}"
    raise _unsupported(key, "VAE")


def text_encoder_key(key: str) -> str:
    """The checkpoint name (without prefix) of a CLIPTextModel key: inside `text_model.`, as transformers 4 nested it."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


def ldm_state_dict(unet: tuple[Mapping[str, Tensor], Mapping[str, Any]],
                   vae: tuple[Mapping[str, Tensor], Mapping[str, Any]],
                   text_encoder: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One checkpoint state dict from the (state dict, config) of the UNet and VAE and the text encoder's state dict."""
    out: dict[str, Tensor] = {}
    unet_tensors, unet_config = unet
    for key, tensor in unet_tensors.items():
        out[UNET_PREFIX + unet_key(key, unet_config)] = tensor
    vae_tensors, vae_config = vae
    for key, tensor in vae_tensors.items():
        name = vae_key(key, vae_config)
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # the original VAE attention projections are 1x1 convolutions
        out[VAE_PREFIX + name] = tensor
    for key, tensor in text_encoder.items():
        out[TEXT_ENCODER_PREFIX + text_encoder_key(key)] = tensor
    return out
