"""Choosing the layers a baseline method adapts: the same default rule as filter atoms."""

from __future__ import annotations

from torch import nn

from ..core.targets import select_layers
from ..errors import ConfigError
from .options import TargetOptions


def is_peft_layer(module: nn.Module) -> bool:
    """True for a layer that peft has wrapped (a tuner layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(module, BaseTunerLayer)


def layer_targets(unet: nn.Module, options: TargetOptions) -> tuple[dict[str, str], dict[str, str]]:
    """(targets: name -> "conv" | "blocks", skipped: name -> reason): the layers filter atoms adapt by default.

    The default: every k x k and 1 x 1 convolution and the attention, feed-forward and
    proj_in / proj_out linears; explicit `target_modules` patterns pick any conv / linear.
    """
    targets, skipped = select_layers(unet, options.target_modules, list(options.exclude_modules))
    if not targets:
        raise ConfigError("No layer of this model matches the target and exclude patterns.")
    return targets, skipped


def refuse_foreign_wrappers(unet: nn.Module, targets: list[str], wrapper_test, family: str) -> None:
    """ConfigError when a target is already wrapped by a method family that cannot stack with `family`."""
    for target in targets:
        if wrapper_test(unet.get_submodule(target)):
            raise ConfigError(
                f"Layer {target!r} already carries an adapter of another kind; {family} adapters cannot be stacked on it."
            )
