"""Whole-model exports: a diffusers pipeline folder and one checkpoint file in the original SD layout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from ..atomic import atomic_path
from .ldm_keys import ldm_state_dict
from .outputs import atomic_folder


def write_diffusers_folder(pipe: Any, out: Path) -> None:
    """`save_pretrained` of a pipeline whose UNet holds plain layers, written atomically."""
    with atomic_folder(out) as staging:
        pipe.save_pretrained(str(staging), safe_serialization=True)


def write_single_file(pipe: Any, out: Path) -> None:
    """UNet, VAE and text encoder in one .safetensors, with the original (LDM) key names."""
    state = ldm_state_dict((pipe.unet.state_dict(), pipe.unet.config), (pipe.vae.state_dict(), pipe.vae.config),
                           pipe.text_encoder.state_dict())
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
