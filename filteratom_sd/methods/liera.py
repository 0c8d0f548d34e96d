"""LieRA: a multiplicative update W' = W ⊙ exp(ΔW) with ΔW = s·B·A low-rank (Lie group of Hadamard products).

The update inherits W's structure (each filter's spatial pattern, its zeros) instead of adding an
unstructured reshaped low-rank matrix. With B = 0 at start, exp(0) = 1 and the model is its base.
`first_order` uses W + W ⊙ ΔW (exp(x) ≈ 1 + x), as the reference code does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_bool
from ..core.layer import WeightDelta
from ..core.method import LayerDeltaMethod
from ..errors import AdapterFormatError
from .options import LowRankOptions, OptionsBacked
from .targets import is_peft_layer, layer_targets, refuse_foreign_wrappers


def lie_update(weight: Tensor, log_delta: Tensor, first_order: bool = False) -> Tensor:
    """What LieRA adds to W: W ⊙ (exp(ΔW) − 1), or W ⊙ ΔW in first order."""
    return weight * (log_delta if first_order else torch.expm1(log_delta))


def low_rank_log_delta(lora_b: Tensor, lora_a: Tensor, scaling: float, shape: torch.Size) -> Tensor:
    """ΔW = s·B·A reshaped to the kernel's shape (B: c_out x r, A: r x c_in·k·k)."""
    return (scaling * (lora_b @ lora_a)).reshape(shape)


class LieDelta(WeightDelta):
    """LieRA's update of one conv / linear layer; trains A and B."""

    def __init__(self, weight: Tensor, rank: int, scaling: float, first_order: bool) -> None:
        super().__init__()
        fan_in = weight[0].numel()
        kwargs = dict(dtype=torch.float32, device=weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, fan_in, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], rank, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # LoRA's initialisation of A
        self.scaling = scaling
        self.first_order = first_order

    def delta_weight(self, weight: Tensor) -> Tensor:
        log_delta = low_rank_log_delta(self.lora_B, self.lora_A, self.scaling, weight.shape)
        return lie_update(weight, log_delta, self.first_order)


@dataclass
class LieraOptions(LowRankOptions):
    """rank r and alpha (ΔW = alpha / r · B·A), exact exp or first order, target patterns."""

    first_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("first_order", self.first_order)


class LieraMethod(OptionsBacked, LayerDeltaMethod):
    """LieRA on the filter-atom default layers (convolutions, attention, feed-forward, projections)."""

    name = "liera"
    options_class = LieraOptions

    def _shapes(self, unet: nn.Module, targets: list[str]) -> dict[str, tuple[int, ...]]:
        out = {}
        for target in targets:
            weight = unet.get_submodule(target).weight
            out[f"{target}.lora_A"] = (self.options.rank, weight[0].numel())
            out[f"{target}.lora_B"] = (weight.shape[0], self.options.rank)
        return out

    def expected_shapes(self, unet: nn.Module, adapter_name: str) -> dict[str, tuple[int, ...]]:
        return self._shapes(unet, self.targets)

    def inject(self, unet: nn.Module, adapter_name: str, tensors: dict[str, Tensor] | None = None) -> None:
        targets, self.skipped = layer_targets(unet, self.options)
        refuse_foreign_wrappers(unet, list(targets), is_peft_layer, self.name)
        # A file's shapes are checked before anything is allocated: a crafted rank cannot ask for huge tensors.
        if tensors is not None and self._shapes(unet, list(targets)) != {k: tuple(v.shape) for k, v in tensors.items()}:
            raise AdapterFormatError("The LieRA adapter's tensors do not match the shapes its configuration gives.")
        opts = self.options
        for target in targets:
            layer = self.wrap(unet, target)
            layer.add_delta(adapter_name, LieDelta(layer.base_layer.weight, opts.rank, opts.scaling, opts.first_order))
        self.targets = list(targets)
