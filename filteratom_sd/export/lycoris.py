"""The LyCORIS "full" format: each layer's whole weight difference as `lora_unet_<name>.diff` (fp16).

ComfyUI and AUTOMATIC1111 add `diff` (and `diff_b` for biases) to the matching weight, times the
strength the user picks, so the file also applies to other SD 1.x checkpoints of the same architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..atomic import atomic_path
from .kohya import kohya_name, split_parameter_key

_SUFFIX = {"weight": "diff", "bias": "diff_b"}


def lycoris_full_tensors(deltas: dict[str, Tensor], dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
    """`lora_unet_<module>.diff` / `.diff_b` for every changed UNet weight / bias."""
    out = {}
    for key, delta in deltas.items():
        module, kind = split_parameter_key(key)
        out[f"{kohya_name(module)}.{_SUFFIX[kind]}"] = delta.to(dtype).contiguous()
    return out


def write_lycoris_full(deltas: dict[str, Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write the full differences as one .safetensors file, atomically."""
    header = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "full"}), **metadata}
    with atomic_path(out) as tmp:
        save_file(lycoris_full_tensors(deltas), str(tmp), metadata=header)
