"""Load an exported file with diffusers alone, as a user without filteratom-sd would, and save what it gives.

Run as a script in its own process: `python plain_diffusers_load.py FORMAT EXPORT BASE_FOLDER INPUTS OUT`.
It writes to OUT the UNet's output on the saved INPUTS and the UNet's weights after loading, plus
whether filteratom_sd was imported (it must not be).
"""

from __future__ import annotations

import sys

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file


def apply_full_diffs(unet: torch.nn.Module, path: str) -> None:
    """Add `lora_unet_<name>.diff` / `.diff_b` to the weights, with ComfyUI's key map (diffusers key, '.' -> '_')."""
    params = dict(unet.named_parameters())
    key_map = {}
    for key in params:
        module, _, kind = key.rpartition(".")
        key_map[f"lora_unet_{module.replace('.', '_')}.{'diff' if kind == 'weight' else 'diff_b'}"] = key
    diffs = load_file(path)
    unknown = sorted(set(diffs) - set(key_map))
    if unknown:
        raise SystemExit(f"keys no layer matches: {unknown[:3]}")
    with torch.no_grad():
        for name, diff in diffs.items():
            params[key_map[name]].add_(diff.to(torch.float32))


def load(fmt: str, export: str, base: str) -> StableDiffusionPipeline:
    """The pipeline the export gives in plain diffusers."""
    if fmt == "diffusers":
        return StableDiffusionPipeline.from_pretrained(export, safety_checker=None, requires_safety_checker=False)
    if fmt == "single-file":
        return StableDiffusionPipeline.from_single_file(export, config=base, local_files_only=True, safety_checker=None,
                                                        requires_safety_checker=False)
    pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    if fmt == "lycoris-full":
        apply_full_diffs(pipe.unet, export)
    else:
        pipe.load_lora_weights(export)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    return pipe


def main(fmt: str, export: str, base: str, inputs_path: str, out: str) -> None:
    pipe = load(fmt, export, base)
    unet = pipe.unet.to(torch.float32).eval()
    inputs = load_file(inputs_path)
    with torch.no_grad():
        output = unet(inputs["latents"], inputs["timesteps"], inputs["text"]).sample
    weights = {f"unet.{k}": v.contiguous() for k, v in unet.state_dict().items()}
    imported = torch.tensor(int(any(name.startswith("filteratom_sd") for name in sys.modules)))
    save_file({"output": output, "filteratom_sd_imported": imported, **weights}, out)


if __name__ == "__main__":
    main(*sys.argv[1:6])
