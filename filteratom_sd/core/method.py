"""The small interface every fine-tuning method implements (`AdapterMethod`).

A method knows how to patch a UNet (`inject`), which parameters it trains,
which tensors go into its adapter file (`adapter_state_dict`) and how to put
them back (`load_adapter_state_dict`). Methods built on `AdaptedLayer`
(filter atoms, LieRA, ...) get scale / fuse / unfuse / unload for free from
`LayerDeltaMethod`; others (peft-backed) override those four operations.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor, nn

from .layer import AdaptedLayer
from .targets import set_submodule


class AdapterMethod(ABC):
    """One fine-tuning method with its settings (a config object per instance)."""

    name: ClassVar[str]
    # The learning rate training uses unless --lr or the base model's config (lr_by_method) sets one.
    default_lr: ClassVar[float] = 1e-3

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.skipped: dict[str, str] = {}

    @abstractmethod
    def config_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings; `from_config_dict` rebuilds the method from them."""

    @classmethod
    @abstractmethod
    def from_config_dict(cls, config: dict[str, Any]) -> "AdapterMethod":
        """Rebuild the method from `config_dict()`'s output."""

    @abstractmethod
    def inject(self, unet: nn.Module, adapter_name: str, tensors: dict[str, Tensor] | None = None) -> None:
        """Patch the UNet in place; fills `self.targets` (and `self.skipped`: name -> reason).

        `tensors` are an adapter file's tensors when loading: a method builds its frozen parts
        from them (filter atoms rebuild alpha from the stored atoms) instead of from scratch.
        """

    @abstractmethod
    def trainable_parameters(self, unet: nn.Module, adapter_name: str) -> list[nn.Parameter]:
        """The parameters this adapter trains."""

    @abstractmethod
    def adapter_state_dict(self, unet: nn.Module, adapter_name: str) -> dict[str, Tensor]:
        """The tensors stored in the adapter file (keys are stable across runs)."""

    @abstractmethod
    def load_adapter_state_dict(self, unet: nn.Module, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        """Put tensors from `adapter_state_dict` back into an injected UNet."""

    def expected_shapes(self, unet: nn.Module, adapter_name: str) -> dict[str, tuple[int, ...]]:
        """Shapes `load_adapter_state_dict` accepts, checked before any tensor is used."""
        return {k: tuple(v.shape) for k, v in self.adapter_state_dict(unet, adapter_name).items()}

    @abstractmethod
    def set_scale(self, unet: nn.Module, adapter_name: str, scale: float) -> None:
        """Multiply this adapter's update by `scale`."""

    @abstractmethod
    def fuse(self, unet: nn.Module, backup: bool = True) -> None:
        """Write the active updates into the base weights (inference with no overhead).

        `backup=False` writes into the base weights' own storage and keeps nothing to unfuse with (`merge_and_unload`).
        """

    @abstractmethod
    def unfuse(self, unet: nn.Module) -> None:
        """Undo `fuse` exactly."""

    @abstractmethod
    def remove(self, unet: nn.Module, adapter_name: str) -> None:
        """Remove this adapter; when it was the last one, the UNet is its base again."""

    @abstractmethod
    def unload_fused(self, unet: nn.Module) -> None:
        """After `fuse`: replace this family's wrappers by their base layers, which keep the fused weights."""


class LayerDeltaMethod(AdapterMethod):
    """A method whose update is a `WeightDelta` on each targeted conv / linear layer."""

    def adapted_layers(self, unet: nn.Module) -> dict[str, AdaptedLayer]:
        """Target name -> AdaptedLayer for this method's targets."""
        return {t: unet.get_submodule(t) for t in self.targets}

    def wrapper_class(self, module: nn.Module) -> type[AdaptedLayer]:
        """The wrapper that adapts `module` (an `AdaptedLayer`; methods that adapt norms choose per module)."""
        return AdaptedLayer

    def wrap(self, unet: nn.Module, target: str) -> AdaptedLayer:
        """Return the AdaptedLayer at `target`, wrapping the base layer on first use."""
        module = unet.get_submodule(target)
        if isinstance(module, AdaptedLayer):
            return module
        wrapped = self.wrapper_class(module)(module)
        set_submodule(unet, target, wrapped)
        return wrapped

    def trainable_parameters(self, unet: nn.Module, adapter_name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for layer in self.adapted_layers(unet).values():
            params.extend(layer.deltas[adapter_name].parameters())
        return params

    def adapter_state_dict(self, unet: nn.Module, adapter_name: str) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for target, layer in self.adapted_layers(unet).items():
            for key, tensor in layer.deltas[adapter_name].state_dict().items():
                out[f"{target}.{key}"] = tensor.detach()
        return out

    def load_adapter_state_dict(self, unet: nn.Module, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        for target, layer in self.adapted_layers(unet).items():
            delta = layer.deltas[adapter_name]
            prefix = f"{target}."
            own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            delta.load_state_dict(own, strict=True)

    def set_scale(self, unet: nn.Module, adapter_name: str, scale: float) -> None:
        for layer in self.adapted_layers(unet).values():
            layer.set_scale(adapter_name, scale)

    def fuse(self, unet: nn.Module, backup: bool = True) -> None:
        for layer in self.adapted_layers(unet).values():
            layer.merge(backup)

    def unfuse(self, unet: nn.Module) -> None:
        for layer in self.adapted_layers(unet).values():
            layer.unmerge()

    def remove(self, unet: nn.Module, adapter_name: str) -> None:
        # Every layer holding this adapter, not only `targets`, and wrappers left empty: also cleans up a failed injection.
        holders = [(n, m) for n, m in unet.named_modules()
                   if isinstance(m, AdaptedLayer) and (adapter_name in m.deltas or len(m.deltas) == 0)]
        for target, layer in holders:
            if adapter_name in layer.deltas:
                layer.remove_delta(adapter_name)
            if len(layer.deltas) == 0:
                layer.unmerge()
                set_submodule(unet, target, layer.base_layer)

    def unload_fused(self, unet: nn.Module) -> None:
        # every wrapper, not only `targets`: other adapters of this family share the same layers
        for target, layer in [(n, m) for n, m in unet.named_modules() if isinstance(m, AdaptedLayer)]:
            set_submodule(unet, target, layer.base_layer)
