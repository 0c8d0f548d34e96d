"""Print trainable-parameter counts of filter atoms C1-C4, LoRA and the other methods on the SD v1.4 UNet (no weights needed).

Usage: python scripts/param_counts.py [--unet-config UNET_CONFIG.json] [--json]   (default: the shipped SD v1.4 config)
"""

from __future__ import annotations

import argparse
import json

from filteratom_sd.core.inject import add_adapter
from filteratom_sd.filter_atoms.config import PRESETS, FilterAtomConfig
from filteratom_sd.filter_atoms.param_count import (
    filter_atom_parameters,
    lora_parameters,
    loralib_lora_parameters,
    lycoris_loha_parameters,
)
from filteratom_sd.filter_atoms.targets import select_targets
from filteratom_sd.methods.registry import method_class
from filteratom_sd.models import build_unet
from filteratom_sd.resources import shipped_config

PAPER_TABLE_2 = {"C1": 0.05, "C2": 0.75, "C3": 2.39, "C4": 587, "C2 kc=8": 0.75, "C4 kc=8": 587,
                 "LoRA r=1, loralib formula, all block layers": 1.42, "LoRA r=4, loralib formula, all block layers": 5.67,
                 "LoRA r=16, loralib formula, all block layers": 22.67, "LoHa r=4, LyCORIS formula, all layers": 8.47,
                 "LoHa r=4": 8.47, "LoKr r=4, factor 4": 1.06, "OFT block 32": 11.75, "DiffFit": 0.58, "BitFit": 0.34,
                 "full": 860}
# The other methods with their default options, counted by injecting them into a weightless UNet.
OTHER_METHODS = {"LieRA r=4": "liera", "LoHa r=4": "loha", "LoKr r=4, factor 4": "lokr", "OFT block 32": "oft",
                 "BitFit": "bitfit", "DiffFit": "difffit", "full": "full"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet-config", default=str(shipped_config("model", "sd-v1-4-unet")))
    parser.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    args = parser.parse_args()
    unet = build_unet(args.unet_config, device="meta")
    total = sum(p.numel() for p in unet.parameters())
    rows = {}
    for preset in PRESETS:
        rows[preset] = filter_atom_parameters(unet, FilterAtomConfig.preset(preset))
    for preset in ("C2", "C4"):
        rows[f"{preset} kc=8"] = filter_atom_parameters(unet, FilterAtomConfig.preset(preset, kc=8))
    targets = list(select_targets(unet, FilterAtomConfig.preset("C2"))[0])
    for rank in (1, 4, 16):
        rows[f"LoRA r={rank}"] = lora_parameters(unet, targets, rank)
    # How the paper's baseline rows were counted: its LoRA and LoHa numbers come out exactly.
    for rank in (1, 4, 16):
        rows[f"LoRA r={rank}, loralib formula, all block layers"] = loralib_lora_parameters(unet, rank)
    rows["LoHa r=4, LyCORIS formula, all layers"] = lycoris_loha_parameters(unet, 4)
    for label, method in OTHER_METHODS.items():
        rows[label] = add_adapter(build_unet(args.unet_config, device="meta"), method_class(method).from_config_dict({}))
    if args.json:
        print(json.dumps({"unet_parameters": total, "targets": len(targets), "counts": rows}, indent=2))
        return
    print(f"UNet parameters: {total / 1e6:.2f}M; layers targeted by C2/LoRA: {len(targets)}\n")
    print("| method | ours (M) | paper Table 2/9 (M) |")
    print("|---|---:|---:|")
    for name, count in rows.items():
        print(f"| {name} | {count / 1e6:.3f} | {PAPER_TABLE_2.get(name, '-')} |")


if __name__ == "__main__":
    main()
