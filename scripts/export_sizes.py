"""Print the size of each `fa-sd export` format for a filter-atom adapter on SD v1.4 (no weights needed).

Usage: python scripts/export_sizes.py [--unet-config UNET_CONFIG.json] [--ranks 4,16,64]
The pipeline formats count the SD v1.4 UNet, VAE and CLIP text encoder in fp32; the adapter formats
count the filter-atom default targets (every conv, the attention / feed-forward / projection linears).
"""

from __future__ import annotations

import argparse
import math

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel

from filteratom_sd.filter_atoms.config import FilterAtomConfig
from filteratom_sd.filter_atoms.targets import select_targets
from filteratom_sd.models import build_unet
from filteratom_sd.resources import shipped_config


def sd14_vae_and_text_encoder() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The SD v1.4 VAE and CLIP ViT-L/14 text encoder, weightless."""
    with torch.device("meta"):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77))
    return vae, text


def count(module: torch.nn.Module) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet-config", default=str(shipped_config("model", "sd-v1-4-unet")))
    parser.add_argument("--ranks", default="4,16,64", help="comma-separated LoRA ranks")
    args = parser.parse_args()
    unet = build_unet(args.unet_config, device="meta")
    vae, text = sd14_vae_and_text_encoder()
    pipeline = 4 * (count(unet) + count(vae) + count(text))
    targets, _ = select_targets(unet, FilterAtomConfig.preset("C2"))
    weights = [unet.get_submodule(name).weight for name in targets]
    full = 2 * sum(w.numel() for w in weights)
    print("| format | size on SD v1.4 |\n|---|---|")
    print(f"| diffusers (fp32 folder) | {pipeline / 1e9:.2f} GB |")
    print(f"| single-file (fp32) | {pipeline / 1e9:.2f} GB |")
    print(f"| lycoris-full (fp16, {len(weights)} layers) | {full / 1e6:.0f} MB |")
    for rank in (int(r) for r in args.ranks.split(",")):
        # kohya factors: down r x (c_in k k), up c_out x r, fp16; the rank cannot exceed either side
        size = 2 * sum(min(rank, w.shape[0], math.prod(w.shape[1:])) * (w.shape[0] + math.prod(w.shape[1:]))
                       for w in weights)
        print(f"| lora --rank {rank} (fp16) | {size / 1e6:.1f} MB |")


if __name__ == "__main__":
    main()
