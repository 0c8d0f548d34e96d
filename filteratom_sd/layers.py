"""Layers that add weight updates to a frozen `nn.Conv2d` / `nn.Linear`.

An `AdaptedLayer` wraps one base layer and holds any number of named
`WeightDelta` modules. Its forward runs ONE convolution / matmul with the
effective weight W + sum_n s_n * dW_n, so an adapted layer costs one weight
build per step, never a second convolution. `merge` writes the effective
weight into the base layer (keeping an exact copy of W), `unmerge` restores it
bit for bit.

Where the cost goes (docs/performance.md has the measurements):
- training: each update adds itself to W in one fused kernel where it can
  (`WeightDelta.add_to`); the effective weight is kept from forward to backward,
  or, with `recompute_weights` (turned on by gradient checkpointing), rebuilt in
  the backward so that no layer holds a second weight-sized tensor while the rest
  of the network runs;
- sampling without fusing (eval mode, no gradient wanted): the effective weight is
  built once and reused until an update's tensors, its scale or the base weight
  change (`cache_weights`; keyed by the tensors' version counters);
- fused: the forward is the base layer's own.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .errors import ConfigError


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

    def attach(self, layer: "AdaptedLayer") -> None:
        """Called when the update is added to `layer`."""

    # Updates of k x k convs with dW = rows(W) T (a d x d transform of each filter's taps, or one
    # per input channel) set `supports_taps` and implement `tap_transform()` -> (1 or c_in, d, d).
    supports_taps: bool = False


class AdaptedLayer(nn.Module):
    """A frozen conv or linear layer plus named additive weight updates."""

    # Rebuild W_eff in the backward pass instead of keeping it from the forward: one copy of W per layer
    # less, for ~1.7x the step time on a GPU (docs/performance.md); `set_weight_recompute` turns it on.
    recompute_weights: bool = False
    # In eval mode without gradients, reuse W_eff until the updates, scales or base weight change.
    cache_weights: bool = True
    # Training path of a k x k conv whose updates all transform filter taps (`WeightDelta.tap_transform`):
    # "taps" feeds the update through the activations (no W_eff, no weight gradient), "weight" builds
    # W_eff, "auto" takes "taps" when the 9x-channel tap tensor is no larger than the weight.
    conv_path: str = "auto"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Conv2d, nn.Linear)):
            raise ConfigError(f"Only nn.Conv2d and nn.Linear can be adapted, not {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.merged: list[str] = []
        # Buffers, so that .to(device / dtype) moves them with the fused weight; never saved.
        self.register_buffer("_weight_backup", None, persistent=False)
        self.register_buffer("_bias_backup", None, persistent=False)
        self._cached: tuple[Any, Tensor, Tensor | None] | None = None
        self.train(base_layer.training)  # a wrapper added to an eval-mode model is in eval mode too

    def __setstate__(self, state: dict) -> None:
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
        self._cached = None

    def _active(self) -> list[str]:
        return [n for n in self.deltas if n not in self.merged and self.scales[n] != 0.0]

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

    def _run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if isinstance(self.base_layer, nn.Conv2d):
            return self.base_layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    def _trainable(self, names: list[str]) -> list[Tensor]:
        return [p for n in names for p in self.deltas[n].parameters() if p.requires_grad]

    def _can_recompute(self) -> bool:
        base = self.base_layer
        if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
            return False
        if isinstance(base, nn.Conv2d):
            return base.padding_mode == "zeros" and not isinstance(base.padding, str)
        return True

    def _use_taps(self, x: Tensor, names: list[str]) -> bool:
        base = self.base_layer
        if self.conv_path == "weight" or not isinstance(base, nn.Conv2d):
            return False
        if not all(getattr(self.deltas[n], "supports_taps", False) for n in names):
            return False
        if self.conv_path == "taps":
            return True
        taps = base.kernel_size[0] * base.kernel_size[1]
        return x.numel() * taps <= base.weight.numel() * base.stride[0] * base.stride[1]

    def tap_kernels(self, names: list[str]) -> Tensor:
        """Depthwise kernels (c_in * k^2, 1, k, k) of M = I + sum s_n T_n, in the updates' dtype."""
        weight = self.base_layer.weight
        c_in, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
        total = sum(self.scales[n] * self.deltas[n].tap_transform() for n in names)
        eye = torch.eye(kh * kw, dtype=total.dtype, device=total.device)
        return (total + eye).expand(c_in, kh * kw, kh * kw).reshape(c_in * kh * kw, 1, kh, kw)

    def _cache_key(self, names: list[str]) -> tuple | None:
        try:
            weight = self.base_layer.weight
            parts: list[Any] = [tuple(names), tuple(self.scales[n] for n in names), weight.dtype, weight.device]
            tensors = [weight, self.base_layer.bias, self._weight_backup]
            # the modules' own dicts: parameters()/buffers() generators cost more than the convolution on small layers
            tensors += [t for n in names for module in self.deltas[n].modules()
                        for t in itertools.chain(module._parameters.values(), module._buffers.values())]
            for t in tensors:
                # new storage (a cast, a move, a replaced tensor) changes the pointer; in-place edits the version
                parts.append(None if t is None else (t.data_ptr(), t._version))
            return tuple(parts)
        except RuntimeError:  # inference-mode tensors carry no version counter: do not cache
            return None

    def _frozen_weight_and_bias(self, names: list[str]) -> tuple[Tensor, Tensor | None]:
        if not (self.cache_weights and not self.training):
            with torch.no_grad():
                return self.effective_weight_and_bias(names)
        key = self._cache_key(names)
        if key is not None and self._cached is not None and self._cached[0] == key:
            return self._cached[1], self._cached[2]
        self._cached = None  # free the stale weight before building the new one
        with torch.no_grad():
            weight, bias = self.effective_weight_and_bias(names)
        if key is not None:
            self._cached = (key, weight, bias)
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        names = self._active()
        if not names:
            return self.base_layer(x)
        params = self._trainable(names) if torch.is_grad_enabled() else []
        if params:
            self._cached = None  # training: a cached weight would be stale after the next optimizer step
            if self._can_recompute() and self._use_taps(x, names):
                return _TapConvOp.apply(x, self, tuple(names), *params)
            if self.recompute_weights and self._can_recompute():
                return _RebuiltWeightOp.apply(x, self, tuple(names), *params)
            weight, bias = self.effective_weight_and_bias(names)
            return self._run(x, weight, bias)
        weight, bias = self._frozen_weight_and_bias(names)
        return self._run(x, weight, bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the active updates into the base weight; W is kept for an exact unmerge."""
        names = self._active()
        if not names:
            return
        weight, bias = self.effective_weight_and_bias(names)
        base = self.base_layer
        if self._weight_backup is None:
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
            return
        base = self.base_layer
        _restore(base.weight, self._weight_backup)
        if self._bias_backup is not None:
            _restore(base.bias, self._bias_backup)
        self._weight_backup = None
        self._bias_backup = None
        self.merged = []
        self.clear_cache()


def set_weight_recompute(model: nn.Module, enabled: bool) -> None:
    """Make every adapted layer in `model` rebuild its effective weight in the backward (saves memory)."""
    for module in model.modules():
        if isinstance(module, AdaptedLayer):
            module.recompute_weights = enabled


def _restore(param: Tensor, backup: Tensor) -> None:
    if backup.device == param.device and backup.dtype == param.dtype and backup.shape == param.shape:
        param.data = backup
    else:
        param.data.copy_(backup)


class _RebuiltWeightOp(torch.autograd.Function):
    """y = conv / linear(x, W_eff) where W_eff is built in forward, dropped, and rebuilt in backward.

    Plain autograd would save every adapted layer's W_eff from forward to backward (a second
    copy of all adapted weights); this saves only x and the update's parameters, and returns
    their gradients from the rebuilt W_eff's graph. Autocast is applied by hand, as F.conv2d
    would apply it, so the backward runs in the same dtype as the forward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: AdaptedLayer, names: tuple[str, ...], *params: Tensor) -> Tensor:
        weight, bias = layer.effective_weight_and_bias(list(names))
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            out = layer._run(x, weight, bias)
        ctx.layer, ctx.names, ctx.dtype = layer, names, dtype
        ctx.save_for_backward(x, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, *params = ctx.saved_tensors
        layer: AdaptedLayer = ctx.layer
        # rebuilt under the forward's autocast state, so it is the very weight the forward used
        autocast = torch.autocast(x.device.type, dtype=ctx.dtype, enabled=ctx.dtype is not None)
        with torch.enable_grad(), autocast:
            weight, bias = layer.effective_weight_and_bias(list(ctx.names))
        used = weight.detach() if ctx.dtype is None else weight.detach().to(ctx.dtype)
        bias_grad = bias is not None and bias.requires_grad
        grad_x, grad_w, grad_b = _op_backward(layer.base_layer, grad_out.to(used.dtype), x, used,
                                              ctx.needs_input_grad[0], bias_grad)
        outputs, grads = [], []
        if weight.requires_grad:  # bias-only updates (BitFit) leave the weight constant
            outputs.append(weight)
            grads.append(grad_w.to(weight.dtype))
        if bias_grad:
            outputs.append(bias)
            grads.append(grad_b.to(bias.dtype))
        wanted = ctx.needs_input_grad[3:]
        found = iter(torch.autograd.grad(outputs, [p for p, w in zip(params, wanted) if w], grads, allow_unused=True))
        return (grad_x, None, None, *[next(found) if w else None for w in wanted])


def _autocast_dtype(x: Tensor) -> torch.dtype | None:
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _TapConvOp(torch.autograd.Function):
    """A k x k conv whose updates transform every filter's taps: rows(W_eff) = rows(W) M, M = I + sum s T.

    conv(x, W_eff) = conv1x1(depthwise(x, M), W as c_out x (c_in k^2)): the frozen W is used as
    it is, so training never builds W_eff and never computes W's gradient; M's gradient comes
    from the depthwise part, whose cost scales with the activations (c_in k^4 per position).
    The kernels are built in the updates' dtype (fp32) and only then cast to the autocast dtype,
    so the identity part of M does not round away a small update.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: AdaptedLayer, names: tuple[str, ...], *params: Tensor) -> Tensor:
        base = layer.base_layer
        with torch.autocast(x.device.type, enabled=False):
            kernels = layer.tap_kernels(list(names))
        dtype = _autocast_dtype(x)
        c_out, c_in = base.weight.shape[:2]
        pointwise, bias = base.weight.reshape(c_out, -1, 1, 1), base.bias
        if dtype is not None:
            x, pointwise = x.to(dtype), pointwise.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            taps = F.conv2d(x, kernels.to(x.dtype), None, base.stride, base.padding, base.dilation, c_in)
            out = F.conv2d(taps, pointwise, bias)
        ctx.layer, ctx.names, ctx.dtype, ctx.taps_shape = layer, names, dtype, taps.shape
        ctx.save_for_backward(x, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, *params = ctx.saved_tensors
        base = ctx.layer.base_layer
        with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
            kernels = ctx.layer.tap_kernels(list(ctx.names))
        c_out, c_in = base.weight.shape[:2]
        pointwise = base.weight.reshape(c_out, -1, 1, 1).to(x.dtype)
        grad_out = grad_out.to(x.dtype)
        placeholder = grad_out.new_empty(1).expand(ctx.taps_shape)  # only its shape is read
        grad_taps = torch.ops.aten.convolution_backward(
            grad_out, placeholder, pointwise, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
        )[0]
        grad_x, grad_kernels, _ = torch.ops.aten.convolution_backward(
            grad_taps, x, kernels.detach().to(x.dtype), None, list(base.stride), list(base.padding),
            list(base.dilation), False, [0, 0], c_in, [ctx.needs_input_grad[0], True, False],
        )
        wanted = ctx.needs_input_grad[3:]
        found = iter(torch.autograd.grad([kernels], [p for p, w in zip(params, wanted) if w],
                                         [grad_kernels.to(kernels.dtype)], allow_unused=True))
        return (grad_x, None, None, *[next(found) if w else None for w in wanted])


def _op_backward(base: nn.Module, grad_out: Tensor, x: Tensor, weight: Tensor, need_x: bool, need_b: bool):
    """(grad_x, grad_weight, grad_bias) of conv2d / linear, computed in one call each."""
    if isinstance(base, nn.Conv2d):
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, [weight.shape[0]] if need_b else None, list(base.stride), list(base.padding),
            list(base.dilation), False, [0, 0], base.groups, [need_x, True, need_b],
        )
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
    grad_x = grad_out @ weight if need_x else None
    grad_w = grad_2d.mT @ x.reshape(-1, x.shape[-1])
    return grad_x, grad_w, grad_2d.sum(0) if need_b else None


def atom_update(alpha: Tensor, atoms0: Tensor, delta_atoms: Tensor, delta_alpha: Tensor | None = None) -> Tensor:
    """dW in coefficient/atom form: (alpha + dA) x (D0 + dD) - alpha x D0, expanded so it is exactly 0 at 0.

    alpha: (a, b, m), atoms (m, p, q); returns (a, b, p, q).
    """
    update = torch.einsum("abm,mpq->abpq", alpha, delta_atoms)
    if delta_alpha is not None:
        update = update + torch.einsum("abm,mpq->abpq", delta_alpha, atoms0 + delta_atoms)
    return update


def overcomplete_atom_change(atoms0: Tensor, delta_beta: Tensor, delta_atoms1: Tensor) -> Tensor:
    """D_il - D0_l per input channel i (i, m, k, k) for beta = 1/m1 + dB and D1 = D0 + dD1 (see below)."""
    m1 = delta_atoms1.shape[1]
    return (
        delta_atoms1.sum(1).unsqueeze(0) / m1
        + delta_beta.sum(2)[..., None, None] * atoms0.unsqueeze(0)
        + torch.einsum("imj,mjpq->impq", delta_beta, delta_atoms1)
    )


def overcomplete_update(
    alpha: Tensor, atoms0: Tensor, delta_beta: Tensor, delta_atoms1: Tensor, delta_alpha: Tensor | None = None
) -> Tensor:
    """dW for overcomplete atoms (section 3.2): D_il = sum_j beta_ilj D1_lj per input channel i.

    D1 starts as each atom repeated m1 times and beta as 1/m1, so with beta = 1/m1 + dB and
    D1 = D0 + dD1 the atom change expands to a sum of terms that are each exactly 0 at 0.
    Shapes: alpha (o, i, m), atoms0 (m, k, k), delta_beta (i, m, m1), delta_atoms1 (m, m1, k, k).
    """
    atom_change = overcomplete_atom_change(atoms0, delta_beta, delta_atoms1)
    update = torch.einsum("oim,impq->oipq", alpha, atom_change)
    if delta_alpha is not None:
        atoms_now = atoms0.unsqueeze(0) + atom_change
        update = update + torch.einsum("oim,impq->oipq", delta_alpha, atoms_now)
    return update


class AtomDelta(WeightDelta):
    """Filter-atom update of one layer: trains dD (and optionally d-alpha) with alpha frozen.

    `layout` "conv" treats a c_out x c_in x k x k kernel as c_out x c_in filters of k x k;
    "blocks" treats a linear / 1x1 weight as blocks of kc_out x kc (Kronecker form).
    `alpha` is a non-persistent buffer: it is rebuilt from the base weight, never saved.

    With `alpha=None` (conv layout only) alpha is the least-squares projection of the layer's
    weight onto the atoms, alpha = rows(W) pinv(D0), and is never stored: the update is
    applied as W + s rows(W) (pinv(D0) dD), a d x d matrix per layer, so for 3x3 kernels
    with m = 9 no tensor the size of W is kept besides W itself. `coefficient_shape`
    (c_out, c_in) is then required.
    """

    def __init__(
        self,
        alpha: Tensor | None,
        atoms0: Tensor,
        layout: str,
        m1: int | None = None,
        train_alpha: bool = False,
        dtype: torch.dtype = torch.float32,
        coefficient_shape: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if layout not in ("conv", "blocks"):
            raise ConfigError(f"Unknown atom layout '{layout}'.")
        if alpha is None and (layout != "conv" or train_alpha or coefficient_shape is None):
            raise ConfigError("Only frozen conv coefficients can be derived from the weight; pass alpha.")
        self.layout = layout
        self.coefficient_shape = tuple(int(v) for v in (coefficient_shape if alpha is None else alpha.shape[:2]))
        self.register_buffer("_alpha", None if alpha is None else alpha.to(dtype), persistent=False)
        self.register_buffer("atoms0", atoms0.to(dtype))
        m, p, q = atoms0.shape
        if m1 is None:
            self.delta_atoms = nn.Parameter(torch.zeros(m, p, q, dtype=dtype, device=atoms0.device))
        else:
            c_in = self.coefficient_shape[1]
            self.delta_beta = nn.Parameter(torch.zeros(c_in, m, m1, dtype=dtype, device=atoms0.device))
            self.delta_atoms1 = nn.Parameter(torch.zeros(m, m1, p, q, dtype=dtype, device=atoms0.device))
        self.delta_alpha = (
            nn.Parameter(torch.zeros(*self.coefficient_shape, m, dtype=dtype, device=atoms0.device)) if train_alpha else None
        )
        self._layer: weakref.ref | None = None
        self._pinv: tuple[Any, Tensor] | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_layer"] = None  # weak references do not pickle; the layer re-attaches on load
        return state

    def attach(self, layer: AdaptedLayer) -> None:
        self._layer = weakref.ref(layer)

    @property
    def overcomplete(self) -> bool:
        """True for the beta + D1 parametrisation."""
        return hasattr(self, "delta_atoms1")

    @property
    def derived(self) -> bool:
        """True when alpha is not stored but projected from the layer's weight."""
        return self._alpha is None

    @property
    def alpha(self) -> Tensor:
        """Coefficients (a, b, m): the stored buffer, or the projection of the attached layer's weight."""
        if self._alpha is not None:
            return self._alpha
        layer = self._layer() if self._layer is not None else None
        if layer is None:
            raise ConfigError("This atom update derives alpha from its layer's weight but is not attached to a layer.")
        return self.coefficients(layer.reference_weight())

    def coefficients(self, weight: Tensor) -> Tensor:
        """alpha for `weight`: the stored one, or rows(W) pinv(D0) (float64, then this update's dtype)."""
        if self._alpha is not None:
            return self._alpha
        m = self.atoms0.shape[0]
        rows = weight.detach().reshape(-1, self.atoms0[0].numel()).double()
        pinv = torch.linalg.pinv(self.atoms0.reshape(m, -1).double())
        return (rows @ pinv).to(self.atoms0.dtype).reshape(*self.coefficient_shape, m)

    @property
    def supports_taps(self) -> bool:  # type: ignore[override]
        """Derived alpha without trainable coefficients: dW = rows(W) T, a transform of the taps."""
        return self.derived and self.delta_alpha is None

    def tap_transform(self) -> Tensor:
        """T = pinv(D0) dD (1, d, d), or pinv(D0) (D_i - D0) per input channel (c_in, d, d) when overcomplete."""
        m, p, q = self.atoms0.shape
        if self.overcomplete:
            change = overcomplete_atom_change(self.atoms0, self.delta_beta, self.delta_atoms1)
            return self._projector() @ change.reshape(-1, m, p * q)
        return (self._projector() @ self.delta_atoms.reshape(m, p * q)).unsqueeze(0)

    def _projector(self) -> Tensor:
        # pinv(D0) (d x m), recomputed only when the atoms change (loading a state dict replaces them).
        atoms = self.atoms0
        key = (atoms.data_ptr(), atoms._version, atoms.dtype, atoms.device)
        if self._pinv is None or self._pinv[0] != key:
            pinv = torch.linalg.pinv(atoms.detach().reshape(atoms.shape[0], -1).double()).to(atoms.dtype)
            self._pinv = (key, pinv)
        return self._pinv[1]

    def delta_weight(self, weight: Tensor) -> Tensor:
        alpha = self.coefficients(weight)
        if self.overcomplete:
            update = overcomplete_update(alpha, self.atoms0, self.delta_beta, self.delta_atoms1, self.delta_alpha)
        else:
            update = atom_update(alpha, self.atoms0, self.delta_atoms, self.delta_alpha)
        if self.layout == "conv":
            return update
        return update.permute(0, 2, 1, 3).reshape(weight.shape)

    def add_to(self, accumulator: Tensor, weight: Tensor, scale: float) -> Tensor:
        if self.delta_alpha is not None or not accumulator.is_contiguous():
            return super().add_to(accumulator, weight, scale)
        m, p, q = self.atoms0.shape
        d = p * q
        dtype = accumulator.dtype
        if self.derived:
            # rows(W_eff) = rows(acc) + s rows(W) T: one fused multiply-add over W, alpha never built
            transform = self.tap_transform().to(dtype)
            if transform.shape[0] == 1:
                rows = weight.reshape(-1, d) if weight.is_contiguous() else weight.contiguous().reshape(-1, d)
                return torch.addmm(accumulator.reshape(-1, d), rows.to(dtype), transform[0], alpha=scale).reshape(
                    accumulator.shape)
            update = torch.einsum("oid,ide->oie", weight.reshape(*self.coefficient_shape, d).to(dtype), transform)
            return torch.add(accumulator, update.reshape(accumulator.shape), alpha=scale)
        if self.overcomplete:
            change = overcomplete_atom_change(self.atoms0, self.delta_beta, self.delta_atoms1).reshape(-1, m, d)
            update = torch.einsum("oim,imd->oid", self._alpha, change).to(dtype)
            return torch.add(accumulator, update.reshape(accumulator.shape), alpha=scale)
        delta = self.delta_atoms.reshape(m, d)
        alpha = self._alpha.reshape(-1, m)
        if self.layout == "conv":
            if alpha.dtype == dtype:
                return torch.addmm(accumulator.reshape(-1, d), alpha, delta, alpha=scale).reshape(accumulator.shape)
            return torch.add(accumulator, (alpha @ delta).to(dtype).reshape(accumulator.shape), alpha=scale)
        a, b = self.coefficient_shape
        update = (alpha @ delta).to(dtype).reshape(a, b, p, q).permute(0, 2, 1, 3)
        # accumulator first: the sum takes its (contiguous) layout, the update is read strided
        return torch.add(accumulator.reshape(a, p, b, q), update, alpha=scale).reshape(accumulator.shape)

