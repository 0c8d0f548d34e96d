"""kohya / LyCORIS layer names: `lora_unet_` plus the diffusers module path with '.' replaced by '_'.

kohya sd-scripts names SD 1.x UNet layers this way (it trains the diffusers-named UNet), ComfyUI
maps every diffusers weight key to the same name, and diffusers' `load_lora_weights` converts
these names back to module paths.
"""

from __future__ import annotations

UNET_PREFIX = "lora_unet_"


def kohya_name(module: str) -> str:
    """`lora_unet_<module with '.' -> '_'>` for a UNet module path such as `down_blocks.0.resnets.0.conv1`."""
    return UNET_PREFIX + module.replace(".", "_")


def split_parameter_key(key: str) -> tuple[str, str]:
    """(module path, "weight" | "bias") of a state-dict key."""
    module, _, kind = key.rpartition(".")
    return module, kind
