"""LoRA, LoHa, LoKr and OFT through peft, behind the `AdapterMethod` interface.

peft injects its layers (`inject_adapter_in_model`) on the filter-atom default targets; the
adapter file holds peft's own per-layer tensors under peft's key names ("<layer>.lora_A.weight",
"<layer>.hada_w1_a", ...). Fusing goes through peft's `merge`, but unfusing restores a copy of
the base weights taken before the merge, because peft's unmerge subtracts (LoRA) or inverts (OFT)
and is not bit-exact. With every adapter removed, the original layer objects are back in place.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn

from ..core.fuse_backup import NO_BACKUP, keep_fuse_backup, pop_fuse_backup
from ..core.layer import AdaptedLayer
from ..core.method import AdapterMethod
from ..core.targets import set_submodule
from ..errors import AdapterFormatError, ConfigError
from .options import LohaOptions, LokrOptions, LoraOptions, OftOptions, OptionsBacked, TargetOptions
from .targets import is_peft_layer, layer_targets, refuse_foreign_wrappers

PEFT_CONFIG_ATTR = "peft_config"


def adapters_on(layer: nn.Module) -> set[str]:
    """Names of the adapters a peft tuner layer holds."""
    names: set[str] = set()
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if isinstance(container, (nn.ModuleDict, nn.ParameterDict)):
            names.update(container.keys())
    return names


def tuner_chain(module: nn.Module) -> list[nn.Module]:
    """The peft layers wrapped around one base layer, outermost first (empty for a plain layer)."""
    chain = []
    while is_peft_layer(module):
        chain.append(module)
        module = module.base_layer
    return chain


def layer_tensors(layer: nn.Module, adapter_name: str) -> dict[str, Tensor]:
    """One adapter's tensors in one peft layer, keyed as in peft's state dict with the adapter name removed."""
    out: dict[str, Tensor] = {}
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr, None)
        if container is None or adapter_name not in container:
            continue
        item = container[adapter_name]
        if isinstance(item, nn.Parameter):
            out[attr] = item
        else:
            out.update({f"{attr}.{k}": v for k, v in item.state_dict(keep_vars=True).items()})
    return out


def set_registry(model: nn.Module, registry: dict[str, Any]) -> None:
    """Set the model's peft config registry; an empty one leaves no attribute behind."""
    if registry:
        setattr(model, PEFT_CONFIG_ATTR, registry)
    elif hasattr(model, PEFT_CONFIG_ATTR):
        delattr(model, PEFT_CONFIG_ATTR)


def activate_all(model: nn.Module) -> None:
    """Make every adapter of every peft layer active: loaded adapters add up (peft activates only the newest)."""
    for module in model.modules():
        if is_peft_layer(module):
            module.set_adapter(sorted(adapters_on(module)))


@contextlib.contextmanager
def kept_requires_grad(model: nn.Module) -> Iterator[None]:
    """Restore every existing parameter's requires_grad afterwards (peft toggles them); new ones end frozen."""
    before = {id(p): p.requires_grad for p in model.parameters()}
    try:
        yield
    finally:
        for p in model.parameters():
            p.requires_grad_(before.get(id(p), False))


class PeftMethod(OptionsBacked, AdapterMethod):
    """A peft tuner as a method: subclasses give the options class and build the peft config."""

    options_class: ClassVar[type[TargetOptions]]

    @abstractmethod
    def peft_config(self, targets: list[str]) -> Any:
        """The peft config (LoraConfig, ...) adapting exactly `targets`."""

    def unsupported(self, module: nn.Module) -> str | None:
        """Why this tuner cannot adapt a layer, or None."""
        return None

    def _targets(self, unet: nn.Module) -> tuple[list[str], dict[str, str]]:
        targets, skipped = layer_targets(unet, self.options)
        wrappers = [n for n, m in unet.named_modules() if is_peft_layer(m)]

        def inside(name: str) -> bool:
            # peft's own sub-layers (lora_A.<name>, ...) are never targets of another adapter.
            return any(name.startswith(f"{w}.") for w in wrappers)

        skipped = {n: r for n, r in skipped.items() if not inside(n)}
        chosen = []
        for name in targets:
            if inside(name):
                continue
            module = unet.get_submodule(name)
            reason = self.unsupported(module.get_base_layer() if is_peft_layer(module) else module)
            if reason:
                skipped[name] = reason
            else:
                chosen.append(name)
        if not chosen:
            raise ConfigError(f"No layer of this model can take a {self.name} adapter with these target patterns.")
        return chosen, skipped

    def shapes_on_meta(self, unet: nn.Module, targets: list[str], adapter_name: str) -> dict[str, tuple[int, ...]]:
        """The tensor shapes this config gives `targets`, from peft injecting into meta-device copies of them."""
        from peft import inject_adapter_in_model

        skeleton = nn.Module()
        for target in targets:
            module = unet.get_submodule(target)
            _place(skeleton, target, _meta_copy(module.get_base_layer() if is_peft_layer(module) else module))
        inject_adapter_in_model(self.peft_config(targets), skeleton, adapter_name=adapter_name)
        return {f"{t}.{k}": tuple(v.shape) for t in targets
                for k, v in layer_tensors(skeleton.get_submodule(t), adapter_name).items()}

    def inject(self, unet: nn.Module, adapter_name: str, tensors: dict[str, Tensor] | None = None) -> None:
        from peft import inject_adapter_in_model

        targets, self.skipped = self._targets(unet)
        refuse_foreign_wrappers(unet, targets, lambda m: isinstance(m, AdaptedLayer), self.name)
        if any(layer.merged for t in targets for layer in tuner_chain(unet.get_submodule(t))):
            raise ConfigError("Unfuse the adapters before adding another one.")
        # A file's shapes are checked before anything is allocated: a crafted config cannot ask for huge tensors.
        if tensors is not None and self.shapes_on_meta(unet, targets, adapter_name) != {
                k: tuple(v.shape) for k, v in tensors.items()}:
            raise AdapterFormatError(f"The {self.name} adapter's tensors do not match the shapes its configuration gives.")
        config = self.peft_config(targets)
        # peft keeps a registry of configs on the model (and warns when one exists): we keep it ourselves.
        registry = dict(getattr(unet, PEFT_CONFIG_ATTR, {}))
        set_registry(unet, {})
        with kept_requires_grad(unet):
            try:
                inject_adapter_in_model(config, unet, adapter_name=adapter_name)
                registry[adapter_name] = config
            except ValueError as exc:
                raise ConfigError(f"peft cannot add a {self.name} adapter here: {str(exc).splitlines()[0]}") from None
            finally:
                set_registry(unet, registry)
            self.targets = targets
            activate_all(unet)

    def holders(self, unet: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
        """Target name -> the peft layer holding this adapter there."""
        out = {}
        for target in self.targets:
            for layer in tuner_chain(unet.get_submodule(target)):
                if adapter_name in adapters_on(layer):
                    out[target] = layer
        return out

    def _tensors(self, unet: nn.Module, adapter_name: str) -> dict[str, Tensor]:
        out = {}
        for target, layer in self.holders(unet, adapter_name).items():
            out.update({f"{target}.{k}": v for k, v in layer_tensors(layer, adapter_name).items()})
        return out

    def trainable_parameters(self, unet: nn.Module, adapter_name: str) -> list[nn.Parameter]:
        return [v for v in self._tensors(unet, adapter_name).values() if isinstance(v, nn.Parameter)]

    def adapter_state_dict(self, unet: nn.Module, adapter_name: str) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in self._tensors(unet, adapter_name).items()}

    @torch.no_grad()
    def load_adapter_state_dict(self, unet: nn.Module, adapter_name: str, tensors: dict[str, Tensor]) -> None:
        own = self._tensors(unet, adapter_name)
        if set(own) != set(tensors):
            wrong = sorted(set(own) ^ set(tensors))[0]
            raise AdapterFormatError(f"The {self.name} tensors do not match the injected layers (first: {wrong!r}).")
        for key, target in own.items():
            target.copy_(tensors[key].to(target.dtype))

    def set_scale(self, unet: nn.Module, adapter_name: str, scale: float) -> None:
        layers = self.holders(unet, adapter_name).values()
        if any(layer.merged for layer in layers):
            raise ConfigError("Unfuse the adapters before changing their scale.")
        for layer in layers:
            layer.set_scale(adapter_name, float(scale))

    @torch.no_grad()
    def fuse(self, unet: nn.Module, backup: bool = True) -> None:
        for target in self.targets:
            outer = unet.get_submodule(target)
            if backup:
                keep_fuse_backup(outer, outer.get_base_layer())
            for layer in tuner_chain(outer):
                if adapters_on(layer) - set(layer.merged_adapters):
                    layer.merge()

    @torch.no_grad()
    def unfuse(self, unet: nn.Module) -> None:
        for target in self.targets:
            self._restore(unet.get_submodule(target))

    @staticmethod
    def _restore(outer: nn.Module) -> None:
        backup = pop_fuse_backup(outer)
        if backup is None:
            if any(layer.merged_adapters for layer in tuner_chain(outer)):
                raise ConfigError(NO_BACKUP)
            return
        base = outer.get_base_layer()
        weight, bias = backup
        base.weight.data.copy_(weight)
        if bias is not None:
            base.bias.data.copy_(bias)
        for layer in tuner_chain(outer):
            layer.merged_adapters = []

    def remove(self, unet: nn.Module, adapter_name: str) -> None:
        # Every wrapped layer, not only `targets`: also cleans up a failed injection.
        wrapped = [n for n, m in unet.named_modules() if is_peft_layer(m) and not is_peft_layer(_parent(unet, n))]
        with kept_requires_grad(unet):
            for target in wrapped:
                outer = unet.get_submodule(target)
                chain = tuner_chain(outer)
                if not any(adapter_name in adapters_on(layer) for layer in chain):
                    continue
                self._restore(outer)
                for layer in chain:
                    if adapter_name in adapters_on(layer):
                        layer.delete_adapter(adapter_name)
                kept = [layer for layer in chain if adapters_on(layer)]
                base = outer.get_base_layer()
                for layer, inner in zip(kept, [*kept[1:], base]):
                    layer.base_layer = inner
                set_submodule(unet, target, kept[0] if kept else base)
            activate_all(unet)
        registry = dict(getattr(unet, PEFT_CONFIG_ATTR, {}))
        registry.pop(adapter_name, None)
        set_registry(unet, registry)

    def unload_fused(self, unet: nn.Module) -> None:
        wrapped = [n for n, m in unet.named_modules() if is_peft_layer(m) and not is_peft_layer(_parent(unet, n))]
        for target in wrapped:
            outer = unet.get_submodule(target)
            pop_fuse_backup(outer)
            set_submodule(unet, target, outer.get_base_layer())
        set_registry(unet, {})


def _parent(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name.rpartition(".")[0])


def _meta_copy(layer: nn.Module) -> nn.Module:
    """A weightless copy of a conv / linear layer (same shapes and settings, tensors on the meta device)."""
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, layer.out_features, bias=has_bias, device="meta")
    return nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, has_bias, layer.padding_mode, device="meta")


def _place(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted `name` under `root`, creating empty parents on the way."""
    *parents, leaf = name.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(leaf, module)


class LoraMethod(PeftMethod):
    """LoRA (Hu et al. 2021): dW = alpha / r · B·A; on a conv, A is a k x k conv to r channels, B a 1x1 conv."""

    name = "lora"
    options_class = LoraOptions

    def peft_config(self, targets: list[str]) -> Any:
        from peft import LoraConfig

        o = self.options
        return LoraConfig(r=o.rank, lora_alpha=o.alpha, lora_dropout=o.dropout, target_modules=targets)


class LohaMethod(PeftMethod):
    """LoHa (Yeh et al. 2023): dW = (B1·A1) ⊙ (B2·A2) · alpha / r."""

    name = "loha"
    options_class = LohaOptions

    def peft_config(self, targets: list[str]) -> Any:
        from peft import LoHaConfig

        o = self.options
        return LoHaConfig(r=o.rank, alpha=o.alpha, use_effective_conv2d=o.effective_conv2d, target_modules=targets)


class LokrMethod(PeftMethod):
    """LoKr (Yeh et al. 2023): dW = W1 ⊗ (B·A) · alpha / r, split by `factor`."""

    name = "lokr"
    options_class = LokrOptions

    def peft_config(self, targets: list[str]) -> Any:
        from peft import LoKrConfig

        o = self.options
        return LoKrConfig(r=o.rank, alpha=o.alpha, decompose_factor=o.factor, decompose_both=o.decompose_both,
                          use_effective_conv2d=o.effective_conv2d, target_modules=targets)


class OftMethod(PeftMethod):
    """OFT / COFT (Qiu et al. 2023): W' = R·W with R block-diagonal orthogonal (Cayley form), on linear and 1x1 layers."""

    name = "oft"
    options_class = OftOptions

    def peft_config(self, targets: list[str]) -> Any:
        from peft import OFTConfig

        o = self.options
        return OFTConfig(oft_block_size=o.block_size, coft=o.coft, eps=o.eps, use_cayley_neumann=o.cayley_neumann,
                         target_modules=targets)

    def unsupported(self, module: nn.Module) -> str | None:
        if isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1):
            # Its forward folds overlapping k x k patches back by summation: not W' = R·W, not even identity at R = I.
            return "peft's OFT forward is wrong on k x k convolutions"
        return None

    def set_scale(self, unet: nn.Module, adapter_name: str, scale: float) -> None:
        # peft's OFT layers have no scale (their set_scale fails), so 1 is the only value.
        if float(scale) != 1.0:
            raise ConfigError("An OFT rotation has no scale; only scale 1 is supported.")
