"""Updates of a layer's own parameters (bias, norm affine, whole weight) and per-channel output scales.

BitFit, DiffFit and full fine-tuning all add a zero-initialised tensor to existing parameters:
expressed as `WeightDelta`s on `AdaptedLayer` / `AdaptedNorm`, they get exact merge / unmerge /
unload, scaling and the adapter file from the same code as filter atoms.
"""

from __future__ import annotations

import re
from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.layer import AdaptedLayer, AdaptedNorm, WeightDelta, is_affine_norm
from ..core.method import LayerDeltaMethod
from ..errors import ConfigError
from .options import ExcludeOptions, OptionsBacked
from .targets import is_peft_layer


@dataclass(frozen=True)
class LayerPlan:
    """What one layer trains: its whole weight, its bias, a per-output-channel scale gamma."""

    weight: bool = False
    bias: bool = False
    gamma: bool = False


def _per_channel(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


class ParamDelta(WeightDelta):
    """dW = weight_delta + gamma_delta ⊙ W, db = bias_delta + gamma_delta ⊙ b (gamma = 1 + gamma_delta).

    Every tensor starts at zero, so the layer starts as its base; each part is optional.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None, plan: LayerPlan) -> None:
        super().__init__()
        channels = weight.shape[0]
        kwargs = dict(dtype=torch.float32, device=weight.device)
        self.weight_delta = nn.Parameter(torch.zeros(weight.shape, **kwargs)) if plan.weight else None
        self.bias_delta = nn.Parameter(torch.zeros(channels, **kwargs)) if plan.bias and bias is not None else None
        self.gamma_delta = nn.Parameter(torch.zeros(channels, **kwargs)) if plan.gamma else None

    def delta_weight(self, weight: Tensor) -> Tensor:
        update = self.weight_delta if self.weight_delta is not None else torch.zeros_like(weight)
        if self.gamma_delta is not None:
            update = update + _per_channel(self.gamma_delta, weight) * weight
        return update

    def delta_bias(self, bias: Tensor | None) -> Tensor | None:
        update = self.bias_delta
        if self.gamma_delta is not None and bias is not None:
            scaled = self.gamma_delta * bias
            update = scaled if update is None else update + scaled
        return update


def has_bias(module: nn.Module) -> bool:
    """True when the module has a bias parameter."""
    return isinstance(getattr(module, "bias", None), nn.Parameter)


def is_adaptable(module: nn.Module) -> bool:
    """A conv, linear or affine norm layer: what `AdaptedLayer` / `AdaptedNorm` can wrap."""
    return isinstance(module, (nn.Conv2d, nn.Linear)) or is_affine_norm(module)


def parameter_owners(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that owns parameters directly, seen through adapter wrappers."""
    owners = []
    for name, module in unet.named_modules():
        if isinstance(module, AdaptedLayer):
            owners.append((name, module.base_layer))
        elif ".deltas." in name or name.endswith((".deltas", ".base_layer")):
            continue  # an adapter's own tensors, or a base layer already listed under its wrapper's name
        elif any(True for _ in module.parameters(recurse=False)):
            owners.append((name, module))
    return owners


class AdditiveMethod(OptionsBacked, LayerDeltaMethod):
    """A method defined by which parameters of which layers get an additive update."""

    options_class: ClassVar[type[ExcludeOptions]] = ExcludeOptions

    @abstractmethod
    def layer_plan(self, name: str, module: nn.Module) -> LayerPlan | str:
        """What a conv, linear or norm layer trains, or why it is skipped."""

    def plan(self, unet: nn.Module) -> tuple[dict[str, LayerPlan], dict[str, str]]:
        """(layer name -> what it trains, skipped layer name -> reason)."""
        excludes = [re.compile(p) for p in self.options.exclude_modules]
        plans: dict[str, LayerPlan] = {}
        skipped: dict[str, str] = {}
        for name, module in parameter_owners(unet):
            if any(p.search(name) for p in excludes):
                found: LayerPlan | str = "matched by exclude_modules"
            elif not is_adaptable(module):
                found = f"{type(module).__name__} is not a conv, linear or norm layer"
            else:
                found = self.layer_plan(name, module)
            if isinstance(found, str):
                skipped[name] = found
            else:
                plans[name] = found
        return plans, skipped

    def wrapper_class(self, module: nn.Module) -> type[AdaptedLayer]:
        return AdaptedNorm if is_affine_norm(module) else AdaptedLayer

    def inject(self, unet: nn.Module, adapter_name: str, tensors: dict[str, Tensor] | None = None) -> None:
        if any(is_peft_layer(m) for m in unet.modules()):
            raise ConfigError(f"A {self.name} adapter cannot be added to a model carrying peft adapters; unload them first.")
        plans, self.skipped = self.plan(unet)
        for target, layer_plan in plans.items():
            layer = self.wrap(unet, target)
            base = layer.base_layer
            layer.add_delta(adapter_name, ParamDelta(base.weight, base.bias, layer_plan))
        self.targets = list(plans)
