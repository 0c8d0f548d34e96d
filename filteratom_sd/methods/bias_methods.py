"""BitFit (biases only) and DiffFit (biases, norm affine parameters, per-block scales gamma).

Both train zero-initialised additive updates (gamma = 1 + gamma_delta), so the patched model
equals its base at step 0; `additive.py` holds the shared machinery.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..checks import check_patterns
from ..core.layer import is_affine_norm
from .additive import AdditiveMethod, LayerPlan, has_bias
from .options import ExcludeOptions

# Ends of residual branches, where DiffFit's gamma scales a block's contribution: a ResNet block's
# conv2, each attention / feed-forward output of a transformer block, a transformer's proj_out.
DEFAULT_GAMMA_MODULES = [r"resnets\.\d+\.conv2$", r"attn\d*\.to_out\.0$", r"ff\.net\.2$", r"attentions\.\d+\.proj_out$"]


@dataclass
class DiffFitOptions(ExcludeOptions):
    """Also gamma_modules: regular expressions of the conv / linear layers whose output channels get gamma."""

    gamma_modules: list[str] = field(default_factory=lambda: list(DEFAULT_GAMMA_MODULES))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_patterns("gamma_modules", self.gamma_modules)


class BitFitMethod(AdditiveMethod):
    """BitFit: every bias of the UNet's conv, linear and norm layers."""

    name = "bitfit"

    def layer_plan(self, name: str, module: nn.Module) -> LayerPlan | str:
        if not has_bias(module):
            return "no bias"
        return LayerPlan(bias=True)


class DiffFitMethod(AdditiveMethod):
    """DiffFit: biases, norm weights and biases, and a per-channel scale gamma at each residual-branch end."""

    name = "difffit"
    options_class = DiffFitOptions

    def layer_plan(self, name: str, module: nn.Module) -> LayerPlan | str:
        if is_affine_norm(module):
            return LayerPlan(weight=True, bias=has_bias(module))
        gamma = any(re.search(p, name) for p in self.options.gamma_modules)
        if not gamma and not has_bias(module):
            return "no bias and not a gamma layer"
        return LayerPlan(bias=has_bias(module), gamma=gamma)
