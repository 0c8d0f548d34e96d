"""Layers that add weight updates to a frozen `nn.Conv2d` / `nn.Linear`.

An `AdaptedLayer` wraps one base layer and holds any number of named
`WeightDelta` modules. Its forward runs ONE convolution / matmul, with the
effective weight W + sum_n s_n * dW_n or (training, see below) with W and the
updates applied to its input, never a second convolution. `merge` writes the effective
weight into the base layer (keeping an exact copy of W), `unmerge` restores it
bit for bit.

Where the cost goes (docs/performance.md has the measurements):
- training: where the updates' form allows it and it costs less (few activation rows: small latents,
  the time embedding), the update goes through the activations and W_eff is never built
  (`fast_paths.activation_op`); otherwise each update adds itself to W in one fused kernel where it
  can (`WeightDelta.add_to`) and the effective weight is kept from forward to backward,
  or, with `set_weight_recompute` (turned on by gradient checkpointing), rebuilt in
  the backward so that no layer holds a second weight-sized tensor while the rest
  of the network runs (the autograd ops are in `fast_paths`);
- sampling without fusing (no gradient wanted): on the CPU, the same activation paths where
  they cost less; otherwise the effective weight is built once and reused until an update's
  parameters, its scale or the base weight change (`set_weight_cache`; keyed by the parameters' storage and
  version counters; torch.compile traces the build into its graph instead);
- fused: the forward is the base layer's own.

`AdaptedNorm` is the same wrapper around a GroupNorm / LayerNorm's affine parameters.
The switches are per layer, set model-wide by `set_weight_recompute`, `set_weight_cache`
and `set_train_path`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .fast_paths import TRAIN_PATHS, RebuiltWeightOp, activation_op, is_compiling, weight_path_only
from .fuse_backup import NO_BACKUP, fuse_backup
from .weight_cache import forget_sources, state_key

OFFLOADED = ("This UNet's weights are on the meta device, where sequential CPU offload keeps them: load adapters and call "
             "merge_and_unload(pipe) before pipe.enable_sequential_cpu_offload(), or call pipe.remove_all_hooks() first.")


def base_layer_of(module: nn.Module) -> nn.Module:
    """The layer an adapter wrapper (ours or peft's) holds, or the module itself when unwrapped."""
    return getattr(module, "base_layer", module)


def is_affine_norm(module: nn.Module) -> bool:
    """A GroupNorm or LayerNorm with a learnable weight."""
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and getattr(module, "weight", None) is not None


class WeightDelta(nn.Module):
    """One adapter's update of one layer; subclasses compute dW from the frozen W."""

    def delta_weight(self, weight: Tensor) -> Tensor:
        """Return dW with the shape of `weight` (the unscaled update)."""
        raise NotImplementedError

    def delta_bias(self, bias: Tensor | None) -> Tensor | None:
        """Return the bias update, or None when the method leaves the bias alone."""
        return None

    def add_to(self, accumulator: Tensor, weight: Tensor, scale: float) -> Tensor:
        """`accumulator + scale * dW(weight)` as a new tensor in the accumulator's dtype.

        `weight` is the layer's unmerged base weight; subclasses fuse the sum into fewer kernels.
        """
        return torch.add(accumulator, self.delta_weight(weight).to(accumulator.dtype), alpha=scale)

    def add_in_place(self, weight: Tensor, scale: float) -> bool:
        """Add `scale * dW(weight)` into `weight`'s own storage, the bits `add_to(weight, weight, scale)` gives.

        Returns False, with `weight` untouched, where this update cannot; the caller then adds a new tensor.
        """
        return False

    def attach(self, layer: "AdaptedLayer") -> None:
        """Called when the update is added to `layer`."""

    def grouped_weight(self, layer: "AdaptedLayer", name: str) -> Tensor | None:
        """W + s dW for training, built together with other layers where the update knows how, or None to build it here."""
        return None

    # Updates of k x k convs with dW = rows(W) T (a d x d transform of each filter's taps, or one
    # per input channel) set `supports_taps` and implement `tap_transform()` -> (1 or c_in, d, d).
    supports_taps: bool = False
    # Updates of linear / 1x1 layers with dW = sum_l alpha_l kron dD_l and alpha frozen set `supports_blocks`
    # and implement `block_factors()` -> (alpha as an (a, m b) matrix, dD (m, p, q)).
    supports_blocks: bool = False


class AdaptedLayer(nn.Module):
    """A frozen conv or linear layer plus named additive weight updates."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self._check_base(base_layer)
        # Rebuild W_eff in the backward pass instead of keeping it from the forward: one copy of W per layer
        # less, for ~1.7x the step time on a GPU (docs/performance.md).
        self.recompute_weights = False
        # In eval mode without gradients, reuse W_eff until the updates, scales or base weight change.
        self.cache_weights = True
        # Training path: "activations" feeds the updates through the activations when their form allows it
        # (`fast_paths.activation_op`: no W_eff, no weight gradient), "weight" builds W_eff, "auto" picks the cheaper.
        self.train_path = "auto"
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.merged: list[str] = []
        # Buffers, so that .to(device / dtype) moves them with the fused weight; never saved.
        self.register_buffer("_weight_backup", None, persistent=False)
        self.register_buffer("_bias_backup", None, persistent=False)
        self._cached: tuple[Any, Tensor, Tensor | None, bool] | None = None  # key, W_eff, bias, right for any input
        self.train(base_layer.training)  # a wrapper added to an eval-mode model is in eval mode too

    @staticmethod
    def _check_base(base_layer: nn.Module) -> None:
        if not isinstance(base_layer, (nn.Conv2d, nn.Linear)):
            raise ConfigError(f"Only nn.Conv2d and nn.Linear can be adapted, not {type(base_layer).__name__}.")

    def __setstate__(self, state: dict) -> None:
        forget_sources(state)
        super().__setstate__(state)
        for delta in self.deltas.values():
            delta.attach(self)

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (diffusers and peft read `.weight` of modules)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def reference_weight(self) -> Tensor:
        """The unmerged base weight W (its exact copy while merged)."""
        return self._weight_backup if self._weight_backup is not None else self.base_layer.weight

    def add_delta(self, name: str, delta: WeightDelta, scale: float = 1.0) -> None:
        """Register a named update; names must be unique on this layer."""
        if name in self.deltas:
            raise ConfigError(f"An adapter named '{name}' is already on this layer.")
        if self.merged:
            raise ConfigError("Unfuse the adapters before adding another one.")
        self.deltas[name] = delta
        self.scales[name] = float(scale)
        delta.attach(self)
        self.clear_cache()

    def remove_delta(self, name: str) -> None:
        """Drop a named update (unmerging first if it is merged)."""
        if name in self.merged:
            self.unmerge()
        del self.deltas[name]
        del self.scales[name]
        self.clear_cache()

    def set_scale(self, name: str, scale: float) -> None:
        """Set the multiplier of one update; a merged layer must be unmerged first."""
        if name not in self.deltas:
            raise ConfigError(f"No adapter named '{name}' is on this layer.")
        if self.merged:
            raise ConfigError("Unfuse the adapters before changing their scale.")
        self.scales[name] = float(scale)
        self.clear_cache()

    def clear_cache(self) -> None:
        """Forget the cached effective weight (it is also re-validated on every use)."""
        if self._cached is not None:  # nn.Module's __setattr__ costs microseconds; training calls this every step
            self._cached = None

    def _active(self) -> list[str]:
        # `scales` has the keys of `deltas`, in the same order, without nn.Module's attribute lookup
        return [n for n, scale in self.scales.items() if scale != 0.0 and n not in self.merged]

    def delta_weight(self, names: list[str] | None = None) -> Tensor:
        """Sum of s_n * dW_n over the given (default: active unmerged) updates."""
        names = self._active() if names is None else names
        weight = self.reference_weight()
        total = torch.zeros_like(weight)
        for n in names:
            total = self.deltas[n].add_to(total, weight, self.scales[n])
        return total

    def _delta_bias(self, names: list[str]) -> Tensor | None:
        bias = self.base_layer.bias
        total = None
        for n in names:
            db = self.deltas[n].delta_bias(bias)
            if db is not None:
                db = self.scales[n] * db
                total = db if total is None else total + db
        return total

    def effective_weight_and_bias(self, names: list[str] | None = None) -> tuple[Tensor, Tensor | None]:
        """W + sum s_n dW_n and the matching bias, for the active unmerged updates."""
        names = self._active() if names is None else names
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if not names:
            return weight, bias
        reference = self.reference_weight()
        for n in names:
            weight = self.deltas[n].add_to(weight, reference, self.scales[n])
        if weight.dim() == 4 and not weight.is_contiguous(memory_format=torch.channels_last) and \
                reference.is_contiguous(memory_format=torch.channels_last) and not reference.is_contiguous():
            weight = weight.contiguous(memory_format=torch.channels_last)  # keep the base's layout for cuDNN
        db = self._delta_bias(names)
        if db is not None:
            bias = db.to(weight.dtype) if bias is None else bias + db.to(bias.dtype)
        return weight, bias

    def run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The base layer's operation with the given weight and bias."""
        base = self._modules["base_layer"]
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def _trainable(self, names: list[str]) -> list[Tensor]:
        # an update without submodules: its own parameter dict, not `parameters()`' module walk (every layer, every step)
        found = (d.parameters() if d._modules else d._parameters.values() for d in map(self.deltas._modules.get, names))
        return [p for params in found for p in params if p is not None and p.requires_grad]

    def _can_recompute(self) -> bool:
        base = self.base_layer
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return False
        if isinstance(base, nn.Conv2d):
            return base.padding_mode == "zeros" and not isinstance(base.padding, str)
        return True

    def _frozen_weight_and_bias(self, names: list[str], compiling: bool, any_input: bool) -> tuple[Tensor, Tensor | None]:
        # under torch.compile the weight build joins the graph: the cache's data-pointer check would break it
        if not (self.cache_weights and not self.training) or compiling:
            with torch.no_grad():
                return self.effective_weight_and_bias(names)
        key = state_key(self)
        cached = self._cached
        if key is not None and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        self._cached = None  # free the stale weight before building the new one
        with torch.no_grad():
            weight, bias = self.effective_weight_and_bias(names)
        if key is not None:
            self._cached = (key, weight, bias, any_input)
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            cached = self._cached
            # sampling with a W_eff cached for any input: one check, then the base operation (every layer, every step)
            if cached is not None and cached[3] and self.cache_weights and not self.training and not is_compiling() and \
                    cached[0] == state_key(self):
                return self.run(x, cached[1], cached[2])
        names = self._active()
        base = self._modules["base_layer"]
        if not names:
            return base(x)
        if base.weight.is_meta:  # offload hooks fill in weights only inside the base layer's own call
            raise ConfigError(OFFLOADED)
        params = self._trainable(names) if torch.is_grad_enabled() else []
        compiling = is_compiling()
        # without gradients only on the CPU, where im2col + GEMM outran oneDNN at small sizes and no W_eff stays resident
        consult = bool(params) or (x.is_cpu and not compiling)
        if consult:
            through_activations = activation_op(self, x, names)
            if through_activations is not None and self._can_recompute():
                self.clear_cache()
                return through_activations(x, self, names)
        if params:
            self.clear_cache()  # training: a cached weight would be stale after the next optimizer step
            if self.recompute_weights and self._can_recompute():
                return RebuiltWeightOp.apply(x, self, tuple(names), *params)
            if len(names) == 1 and (weight := self.deltas[names[0]].grouped_weight(self, names[0])) is not None:
                return self.run(x, weight, base.bias)
            weight, bias = self.effective_weight_and_bias(names)
            return self.run(x, weight, bias)
        weight, bias = self._frozen_weight_and_bias(names, compiling, not consult or weight_path_only(self))
        return self.run(x, weight, bias)

    @torch.no_grad()
    def merge(self, backup: bool = True) -> None:
        """Write the active updates into the base weight; W is kept for an exact unmerge.

        `backup=False` overwrites W in its own storage (one layer's W_eff is the only extra memory) and the layer can
        no longer be unmerged: for `merge_and_unload`, which drops the wrapper next.
        """
        names = self._active()
        if not names:
            return
        base = self.base_layer
        if not backup and self._weight_backup is None and len(names) == 1 and \
                self.deltas[names[0]].add_in_place(base.weight.data, self.scales[names[0]]):
            db = self._delta_bias(names)
            if db is not None and base.bias is not None:
                base.bias.data.add_(db.to(base.bias.dtype))
            self.merged.extend(names)
            self.clear_cache()
            return
        weight, bias = self.effective_weight_and_bias(names)
        if self._weight_backup is None and backup:
            # W_eff is a new tensor: hand it to the parameter and keep W's own storage as the backup (no copies).
            self._weight_backup = base.weight.data
            base.weight.data = weight.detach()
            if base.bias is not None and bias is not base.bias:
                self._bias_backup = base.bias.data
                base.bias.data = bias.detach().to(base.bias.dtype)
        else:
            base.weight.data.copy_(weight)
            if bias is not None and base.bias is not None:
                base.bias.data.copy_(bias)
        self.merged.extend(names)
        self.clear_cache()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit."""
        if self._weight_backup is None:
            if self.merged:
                raise ConfigError(NO_BACKUP)
            return
        base = self.base_layer
        _restore(base.weight, self._weight_backup)
        if self._bias_backup is not None:
            _restore(base.bias, self._bias_backup)
        self._weight_backup = None
        self._bias_backup = None
        self.merged = []
        self.clear_cache()


def _restore(param: Tensor, backup: Tensor) -> None:
    if backup.device == param.device and backup.dtype == param.dtype and backup.shape == param.shape:
        param.data = backup
    else:
        param.data.copy_(backup)


class AdaptedNorm(AdaptedLayer):
    """A frozen GroupNorm / LayerNorm whose affine weight and bias get named additive updates.

    The same deltas, scales and exact merge / unmerge as an adapted conv or linear, so methods,
    the fingerprint and `LayerDeltaMethod.remove` treat it alike; its forward is the norm's own.
    """

    @staticmethod
    def _check_base(base_layer: nn.Module) -> None:
        if not is_affine_norm(base_layer):
            raise ConfigError(f"Only GroupNorm and LayerNorm with affine parameters can be adapted, not {base_layer!r}.")

    def forward(self, x: Tensor) -> Tensor:
        if not self._active():
            return self.base_layer(x)
        weight, bias = self.effective_weight_and_bias()
        base = self.base_layer
        if isinstance(base, nn.GroupNorm):
            return F.group_norm(x, base.num_groups, weight, bias, base.eps)
        return F.layer_norm(x, base.normalized_shape, weight, bias, base.eps)


def adapted_layers(model: nn.Module) -> list[AdaptedLayer]:
    """Every adapted layer (and norm) in `model`."""
    return [m for m in model.modules() if isinstance(m, AdaptedLayer)]


def set_weight_recompute(model: nn.Module, enabled: bool) -> None:
    """Make every adapted layer in `model` rebuild its effective weight in the backward (saves memory)."""
    for layer in adapted_layers(model):
        layer.recompute_weights = bool(enabled)


def set_weight_cache(model: nn.Module, enabled: bool) -> None:
    """Let the adapted layers of `model` reuse their effective weight in eval mode (on by default)."""
    for layer in adapted_layers(model):
        layer.cache_weights = bool(enabled)
        layer.clear_cache()


def set_train_path(model: nn.Module, path: str) -> None:
    """Training path of the adapted layers of `model`: "auto" (default), "activations" or "weight"."""
    if path not in TRAIN_PATHS:
        raise ConfigError(f"Unknown training path {path!r}; choose one of: {', '.join(TRAIN_PATHS)}.")
    for layer in adapted_layers(model):
        layer.train_path = path


def unmerged_weight(module: nn.Module) -> Tensor:
    """The base weight before any fuse: what an adapter is made for (ours, peft's, or none)."""
    if isinstance(module, AdaptedLayer):
        return module.reference_weight()
    backup = fuse_backup(module)
    if backup is not None:
        return backup[0]
    return base_layer_of(module).weight
