"""Full fine-tuning: every weight and bias of the UNet's conv, linear and norm layers trains.

The weights themselves stay frozen; a full-size zero-initialised delta per parameter trains
instead, so scale / fuse / unload behave as for every other method and the adapter file holds
the weight deltas (as large as the UNet).
"""

from __future__ import annotations

from torch import nn

from .additive import AdditiveMethod, LayerPlan


class FullMethod(AdditiveMethod):
    """All UNet weights, at the paper's learning rate for full fine-tuning."""

    name = "full"
    default_lr = 5e-6

    def layer_plan(self, name: str, module: nn.Module) -> LayerPlan | str:
        return LayerPlan(weight=True, bias=True)
