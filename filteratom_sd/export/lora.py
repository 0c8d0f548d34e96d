"""kohya-format LoRA files (`lora_down.weight`, `lora_up.weight`, `alpha`) from an adapter's weight differences.

Every layer's difference is factored by truncated SVD, at one rank or at the smallest rank per
layer that meets a relative error; a `--method lora` adapter's own factors are written as they are.
`alpha` always equals the layer's rank (scale 1): the scale of a LoRA adapter is folded into `up`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..adapter_io import AdapterFile
from ..atomic import atomic_path
from .kohya import kohya_name, split_parameter_key
from .low_rank import LowRankFactors, low_rank_factors, relative_error


@dataclass
class LayerError:
    """One layer of an extracted LoRA: its rank and relative Frobenius error."""

    name: str
    rank: int
    error: float


@dataclass
class LoraReport:
    """Per-layer and overall relative error of a LoRA file against the adapter's exact differences."""

    layers: list[LayerError] = field(default_factory=list)
    # tensors a LoRA cannot carry (biases, norm weights), whose difference is lost whole
    dropped: list[str] = field(default_factory=list)
    overall_error: float = 0.0


def _own_factors(adapter: AdapterFile, module: str, delta: Tensor, dtype: torch.dtype) -> LowRankFactors:
    down = adapter.tensors[f"{module}.lora_A.weight"]
    up = adapter.tensors[f"{module}.lora_B.weight"] * (float(adapter.config["alpha"]) / down.shape[0])
    down, up = down.to(dtype).contiguous(), up.to(dtype).contiguous()
    return LowRankFactors(down, up, relative_error(delta, down, up))


def lora_tensors(adapter: AdapterFile, deltas: dict[str, Tensor], rank: int | None, max_error: float | None,
                 dtype: torch.dtype = torch.float16) -> tuple[dict[str, Tensor], LoraReport]:
    """The kohya tensors and the error report; a LoRA adapter with no rank or error given keeps its own factors."""
    own = adapter.method == "lora" and rank is None and max_error is None
    tensors: dict[str, Tensor] = {}
    report = LoraReport()
    lost = total = 0.0
    for key, delta in sorted(deltas.items()):
        norm2 = delta.double().square().sum().item()
        total += norm2
        module, kind = split_parameter_key(key)
        if kind != "weight" or delta.dim() not in (2, 4):
            report.dropped.append(key)
            lost += norm2
            continue
        factors = _own_factors(adapter, module, delta, dtype) if own else low_rank_factors(delta, rank, max_error, dtype)
        name = kohya_name(module)
        tensors[f"{name}.lora_down.weight"] = factors.down
        tensors[f"{name}.lora_up.weight"] = factors.up
        tensors[f"{name}.alpha"] = torch.tensor(float(factors.rank))
        report.layers.append(LayerError(module, factors.rank, factors.error))
        lost += factors.error ** 2 * norm2
    report.overall_error = math.sqrt(lost / total) if total > 0 else 0.0
    return tensors, report


def write_lora(tensors: dict[str, Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write the kohya tensors as one .safetensors file, atomically."""
    header = {"ss_network_module": "networks.lora", **metadata}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=header)
