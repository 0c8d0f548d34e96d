"""kohya-format LoRA files (`lora_down.weight`, `lora_up.weight`, `alpha`) from an adapter's weight differences.

Every layer's difference is factored by truncated SVD, at one rank or at the smallest rank per
layer that meets a relative error; a `--method lora` adapter's own factors are written as they are.
Every layer gets the same `alpha` (the largest rank) and `up` carries rank / alpha: diffusers'
kohya conversion loses the alphas of attention layers and applies its most common alpha instead,
which is then the right one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..core.adapter_file import AdapterFile
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
    report = LoraReport()
    found: dict[str, tuple[Tensor, LowRankFactors]] = {}
    for key, delta in sorted(deltas.items()):
        module, kind = split_parameter_key(key)
        if kind != "weight" or delta.dim() not in (2, 4):
            report.dropped.append(key)
            continue
        found[module] = delta, (_own_factors(adapter, module, delta, dtype) if own
                                else low_rank_factors(delta, rank, max_error, dtype))
    alpha = float(max((factors.rank for _, factors in found.values()), default=1))
    tensors: dict[str, Tensor] = {}
    for module, (delta, factors) in found.items():
        # kohya applies (alpha / rank) * up @ down
        up = (factors.up.double() * (factors.rank / alpha)).to(dtype).contiguous()
        name = kohya_name(module)
        tensors[f"{name}.lora_down.weight"] = factors.down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        report.layers.append(LayerError(module, factors.rank, relative_error(delta, factors.down, up, alpha / factors.rank)))
    lost = sum(deltas[f"{layer.name}.weight"].double().square().sum().item() * layer.error ** 2
               for layer in report.layers)
    lost += sum(deltas[key].double().square().sum().item() for key in report.dropped)
    total = sum(delta.double().square().sum().item() for delta in deltas.values())
    report.overall_error = math.sqrt(lost / total) if total > 0 else 0.0
    return tensors, report


def write_lora(tensors: dict[str, Tensor], out: Path, metadata: dict[str, str]) -> None:
    """Write the kohya tensors as one .safetensors file, atomically."""
    header = {"ss_network_module": "networks.lora", **metadata}
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata=header)
