"""Attaching and detaching named adapters; the model's record of what is attached."""

from __future__ import annotations

import logging
import re
from collections import Counter

from torch import nn

from ..errors import ConfigError
from .method import AdapterMethod

logger = logging.getLogger(__name__)

ADAPTERS_ATTR = "_filteratom_adapters"
# Adapter names key the layers' ModuleDicts (and peft's): no dots, no attribute names of a module.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def check_adapter_name(name: object) -> None:
    """ConfigError unless `name` can key a layer's updates: 1-64 letters, digits, '_' or '-', not reserved."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise ConfigError(f"The adapter name {name!r} must be 1 to 64 letters, digits, '_' or '-', "
                          "starting with a letter or digit.")
    if hasattr(nn.ModuleDict(), name):
        raise ConfigError(f"The adapter name {name!r} is reserved (an attribute of torch modules); choose another.")


def attached_adapters(model: nn.Module) -> dict[str, AdapterMethod]:
    """The adapters attached to a UNet, by adapter name (empty when none)."""
    return getattr(model, ADAPTERS_ATTR, {})


def record_adapter(model: nn.Module, adapter_name: str, method: AdapterMethod | None) -> None:
    """Add (or, with `method` None, drop) one entry of the model's adapter record: its only writer."""
    adapters = dict(attached_adapters(model))
    if method is None:
        adapters.pop(adapter_name, None)
    else:
        adapters[adapter_name] = method
    setattr(model, ADAPTERS_ATTR, adapters)


def add_adapter(unet: nn.Module, method: AdapterMethod, adapter_name: str = "default") -> int:
    """Inject `method` under `adapter_name`, freeze everything else, return the trainable count."""
    check_adapter_name(adapter_name)
    if adapter_name in attached_adapters(unet):
        raise ConfigError(f"An adapter named '{adapter_name}' is already attached.")
    method.inject(unet, adapter_name)
    for name, reason in sorted(method.skipped.items()):
        logger.debug("not adapted: %s (%s)", name, reason)
    reasons = Counter(method.skipped.values())
    for reason, times in sorted(reasons.items()):
        logger.info("not adapted: %d layer(s): %s (listed with --verbose)", times, reason)
    unet.requires_grad_(False)
    params = method.trainable_parameters(unet, adapter_name)
    for p in params:
        p.requires_grad_(True)
    record_adapter(unet, adapter_name, method)
    count = sum(p.numel() for p in params)
    logger.info("adapter '%s': %d targets, %d skipped, %d trainable parameters", adapter_name, len(method.targets), len(method.skipped), count)
    return count


def remove_adapter(unet: nn.Module, adapter_name: str) -> None:
    """Detach one adapter; the last one removed leaves the original modules in place."""
    adapters = attached_adapters(unet)
    if adapter_name not in adapters:
        raise ConfigError(f"No adapter named '{adapter_name}' is attached.")
    adapters[adapter_name].remove(unet, adapter_name)
    record_adapter(unet, adapter_name, None)
