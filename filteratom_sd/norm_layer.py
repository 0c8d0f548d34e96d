"""`AdaptedNorm`: a frozen GroupNorm / LayerNorm plus named additive updates of its affine weight and bias.

It is an `AdaptedLayer` (same deltas, scales, merge / unmerge with an exact backup), so the
methods, the fingerprint and `LayerDeltaMethod.remove` treat it like an adapted conv or linear.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError
from .layers import AdaptedLayer


def is_affine_norm(module: nn.Module) -> bool:
    """A GroupNorm or LayerNorm with a learnable weight."""
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and getattr(module, "weight", None) is not None


class AdaptedNorm(AdaptedLayer):
    """A normalisation layer whose affine parameters get named additive updates."""

    def __init__(self, base_layer: nn.Module) -> None:
        if not is_affine_norm(base_layer):
            raise ConfigError(f"Only GroupNorm and LayerNorm with affine parameters can be adapted, not {base_layer!r}.")
        # AdaptedLayer.__init__ accepts conv / linear only; these are the fields it sets.
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.merged: list[str] = []
        self._weight_backup: Tensor | None = None
        self._bias_backup: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self._active():
            return self.base_layer(x)
        weight, bias = self.effective_weight_and_bias()
        base = self.base_layer
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, weight, bias, base.eps)
        return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)
