"""The public API on an existing diffusers pipeline (or a bare UNet): load, scale, fuse, unfuse, unload.

A UNet wrapped by torch.compile is unwrapped here, so every function takes the compiled one as well; one whose
weights sequential CPU offload moved to the meta device is refused (load and merge adapters before offloading).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from ..checks import check_bool, check_scale
from ..errors import AdapterFormatError, BaseModelMismatchError, ConfigError
from ..methods.registry import method_class
from .adapter_file import AdapterFile, read_adapter
from .fingerprint import fingerprint, mismatched_layers
from .inject import attached_adapters, check_adapter_name, record_adapter, remove_adapter
from .layer import OFFLOADED, AdaptedLayer, base_layer_of
from .method import AdapterMethod, LayerDeltaMethod
from .targets import pinned_to_targets
from .token_embedding import attach_token, detach_token, release_token

logger = logging.getLogger(__name__)


def _unet(pipe_or_unet: Any) -> nn.Module:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    # torch.compile wraps the UNet in an OptimizedModule whose layer names carry an "_orig_mod." prefix
    unet = getattr(unet, "_orig_mod", unet)
    if not isinstance(unet, nn.Module):
        raise ConfigError("Expected a diffusers pipeline with a .unet or a UNet module.")
    if any(p.is_meta for p in unet.parameters()):
        raise ConfigError(OFFLOADED)
    return unet


def _is_fused(unet: nn.Module) -> bool:
    return any(getattr(m, "merged", None) for m in unet.modules())


def _default_name(adapter: AdapterFile, unet: nn.Module) -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", adapter.path.stem).lstrip("_-")[:56] or "adapter"
    if hasattr(nn.ModuleDict(), name):  # a file named training.safetensors
        name = f"adapter_{name}"
    taken = attached_adapters(unet)
    candidate, index = name, 1
    while candidate in taken:
        index += 1
        candidate = f"{name}_{index}"
    return candidate


def _check_targets(adapter: AdapterFile, unet: nn.Module) -> None:
    modules = dict(unet.named_modules())
    missing = [t for t in adapter.targets if t not in modules]
    if missing:
        raise BaseModelMismatchError(
            f"{adapter.path.name} adapts layer {missing[0]!r} which this model does not have "
            f"({len(missing)} missing layers): it was made for a different architecture."
        )
    # a listed container (the root "", "down_blocks") has no weight to fingerprint or adapt
    blocks = [t for t in adapter.targets if not isinstance(getattr(base_layer_of(modules[t]), "weight", None), Tensor)]
    if blocks:
        raise AdapterFormatError(f"{adapter.path.name} lists {blocks[0]!r} as a target, which is not a layer with weights.")


def _refuse_shared_layers(adapter: AdapterFile, method: AdapterMethod, unet: nn.Module) -> None:
    # our wrapper cannot sit on a peft layer (its forward would skip the LoRA), nor peft's on ours
    if not isinstance(method, LayerDeltaMethod):
        return  # peft-backed methods stack with other peft adapters
    modules = dict(unet.named_modules())
    shared = [t for t in adapter.targets if hasattr(modules[t], "base_layer") and not isinstance(modules[t], AdaptedLayer)]
    if shared:
        raise ConfigError(
            f"{adapter.path.name} adapts {shared[0]!r}, which already carries a peft adapter (a LoRA from "
            "load_lora_weights or add_adapter): unload that LoRA, load this adapter and call merge_and_unload(pipe), "
            "then load the LoRA again, or export this adapter with `fa-sd export --format lora`."
        )


def load_adapter(
    pipe: Any, path: str | os.PathLike, adapter_name: str | None = None, scale: float = 1.0, check_base: bool = True
) -> str:
    """Load an adapter file into a pipeline's UNet (or a bare UNet); returns the adapter's name.

    The base weights must match the adapter's fingerprint unless `check_base` is False. An adapter trained with
    its token's embedding adds that token to the pipeline's tokenizer and text encoder (unloading removes it).
    Several adapters can be loaded under different names; their updates add. A diffusers / peft LoRA on
    other layers stacks in either order; on the same layers, load this adapter, `merge_and_unload`, then the LoRA.
    """
    unet = _unet(pipe)
    scale = check_scale(scale)
    check_bool("check_base", check_base)  # None or 0 must not skip the base check by accident
    adapter = read_adapter(Path(path))
    name = _default_name(adapter, unet) if adapter_name is None else adapter_name
    check_adapter_name(name)
    if name in attached_adapters(unet):
        raise ConfigError(f"An adapter named '{name}' is already loaded; pass another adapter_name.")
    if _is_fused(unet):
        raise ConfigError("Unfuse the loaded adapters before loading another one.")
    _check_targets(adapter, unet)
    try:
        # the file's own patterns never run: the layers it lists are selected by their exact names
        method = method_class(adapter.method).from_config_dict(pinned_to_targets(adapter.config, adapter.targets))
    except ConfigError as exc:
        raise AdapterFormatError(f"{adapter.path.name} has an invalid configuration: {exc}") from None
    _refuse_shared_layers(adapter, method, unet)
    if check_base:
        bad = mismatched_layers(adapter.base_fingerprint, fingerprint(unet, adapter.targets))
        if bad:
            base = repr(adapter.metadata.get("base_model") or "another base model")
            raise BaseModelMismatchError(
                f"{adapter.path.name} was made for {base}; {len(bad)} of its {len(adapter.targets)} layers "
                f"differ from this model's weights (first: {bad[0]!r})."
            )
    try:
        method.inject(unet, name, tensors=adapter.tensors)
        if sorted(method.targets) != sorted(adapter.targets):
            raise AdapterFormatError(f"{adapter.path.name} lists targets that its configuration does not select.")
        expected = method.expected_shapes(unet, name)
        got = {k: tuple(v.shape) for k, v in adapter.tensors.items()}
        if expected != got:
            wrong = sorted(set(expected.items()) ^ set(got.items()))[0][0]
            raise AdapterFormatError(f"{adapter.path.name} has missing, extra or misshapen tensors (first: {wrong!r}).")
        method.load_adapter_state_dict(unet, name, adapter.tensors)
        if adapter.token_embedding is not None:  # last: nothing after it can fail and leave the token behind
            attach_token(pipe, unet, name, adapter.token, adapter.token_embedding)
    except BaseException:  # KeyboardInterrupt included: leave the model exactly as it was
        method.remove(unet, name)
        raise
    record_adapter(unet, name, method)
    for param in method.trainable_parameters(unet, name):
        param.requires_grad_(False)
    method.set_scale(unet, name, scale)
    logger.info("loaded adapter '%s' (%s, %d layers) from %s", name, adapter.method, len(method.targets), adapter.path)
    return name


def _selected(unet: nn.Module, adapter_name: str | None) -> list[str]:
    adapters = attached_adapters(unet)
    if adapter_name is None:
        return list(adapters)
    if adapter_name not in adapters:
        raise ConfigError(f"No adapter named '{adapter_name}' is loaded.")
    return [adapter_name]


def set_adapter_scale(pipe: Any, scale: float, adapter_name: str | None = None) -> None:
    """Set the scale of one adapter (or of all when `adapter_name` is None)."""
    unet = _unet(pipe)
    scale = check_scale(scale)
    if _is_fused(unet):
        raise ConfigError("Unfuse the adapters before changing their scale.")
    for name in _selected(unet, adapter_name):
        attached_adapters(unet)[name].set_scale(unet, name, scale)


def fuse_adapter(pipe: Any) -> None:
    """Write every loaded adapter into the base weights: sampling then costs exactly the base UNet."""
    unet = _unet(pipe)
    for method in attached_adapters(unet).values():
        method.fuse(unet)


def unfuse_adapter(pipe: Any) -> None:
    """Restore the base weights exactly (the adapters stay loaded, unfused)."""
    unet = _unet(pipe)
    for method in attached_adapters(unet).values():
        method.unfuse(unet)


def unload_adapter(pipe: Any, adapter_name: str | None = None) -> None:
    """Remove one adapter (or all); with none left the UNet is bit for bit its base again.

    Adapters that were fused and stay loaded are fused again.
    """
    unet = _unet(pipe)
    names = _selected(unet, adapter_name)
    fused = _is_fused(unet)
    if fused:
        unfuse_adapter(unet)
    for name in names:
        remove_adapter(unet, name)
        detach_token(pipe, unet, name)
    if fused and attached_adapters(unet):
        fuse_adapter(unet)


def merge_and_unload(pipe: Any) -> None:
    """Fuse every loaded adapter, then put the plain layers holding the fused weights back in place.

    The UNet is then an ordinary diffusers model (its `save_pretrained` writes the standard keys, so
    plain diffusers loads the adapted model); the adapters are gone and cannot be unfused. Tokens the
    adapters added stay in the tokenizer: the merged weights need them.
    """
    unet = _unet(pipe)
    for method in attached_adapters(unet).values():
        method.fuse(unet, backup=False)  # in the base weights' own storage: no second copy of the UNet's weights
    for name, method in list(attached_adapters(unet).items()):
        method.unload_fused(unet)
        record_adapter(unet, name, None)
        release_token(unet, name)
