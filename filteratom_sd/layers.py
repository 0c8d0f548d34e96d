"""Layers that add weight updates to a frozen `nn.Conv2d` / `nn.Linear`.

An `AdaptedLayer` wraps one base layer and holds any number of named
`WeightDelta` modules. Its forward runs ONE convolution / matmul with the
effective weight W + sum_n s_n * dW_n, so an adapted layer costs one weight
build per step, never a second convolution. `merge` writes the effective
weight into the base layer (keeping an exact copy of W), `unmerge` restores it
bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError


class WeightDelta(nn.Module):
    """One adapter's update of one layer; subclasses compute dW from the frozen W."""

    def delta_weight(self, weight: Tensor) -> Tensor:
        """Return dW with the shape of `weight` (the unscaled update)."""
        raise NotImplementedError

    def delta_bias(self, bias: Tensor | None) -> Tensor | None:
        """Return the bias update, or None when the method leaves the bias alone."""
        return None


class AdaptedLayer(nn.Module):
    """A frozen conv or linear layer plus named additive weight updates."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Conv2d, nn.Linear)):
            raise ConfigError(f"Only nn.Conv2d and nn.Linear can be adapted, not {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.deltas = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        self.merged: list[str] = []
        self._weight_backup: Tensor | None = None
        self._bias_backup: Tensor | None = None

    @property
    def weight(self) -> Tensor:
        """The base layer's weight (diffusers and peft read `.weight` of modules)."""
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        """The base layer's bias."""
        return self.base_layer.bias

    def add_delta(self, name: str, delta: WeightDelta, scale: float = 1.0) -> None:
        """Register a named update; names must be unique on this layer."""
        if name in self.deltas:
            raise ConfigError(f"An adapter named '{name}' is already on this layer.")
        if self.merged:
            raise ConfigError("Unfuse the adapters before adding another one.")
        self.deltas[name] = delta
        self.scales[name] = float(scale)

    def remove_delta(self, name: str) -> None:
        """Drop a named update (unmerging first if it is merged)."""
        if name in self.merged:
            self.unmerge()
        del self.deltas[name]
        del self.scales[name]

    def set_scale(self, name: str, scale: float) -> None:
        """Set the multiplier of one update; a merged layer must be unmerged first."""
        if self.merged:
            raise ConfigError("Unfuse the adapters before changing their scale.")
        self.scales[name] = float(scale)

    def _active(self) -> list[str]:
        return [n for n in self.deltas if n not in self.merged and self.scales[n] != 0.0]

    def delta_weight(self, names: list[str] | None = None) -> Tensor:
        """Sum of s_n * dW_n over the given (default: active unmerged) updates."""
        names = self._active() if names is None else names
        weight = self.base_layer.weight
        total = torch.zeros_like(weight)
        for n in names:
            total = total + self.scales[n] * self.deltas[n].delta_weight(weight).to(weight.dtype)
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

    def effective_weight_and_bias(self) -> tuple[Tensor, Tensor | None]:
        """W + sum s_n dW_n and the matching bias, for the active unmerged updates."""
        names = self._active()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        if not names:
            return weight, bias
        weight = weight + self.delta_weight(names)
        db = self._delta_bias(names)
        if db is not None:
            bias = db.to(weight.dtype) if bias is None else bias + db.to(bias.dtype)
        return weight, bias

    def forward(self, x: Tensor) -> Tensor:
        if not self._active():
            return self.base_layer(x)
        weight, bias = self.effective_weight_and_bias()
        if isinstance(self.base_layer, nn.Conv2d):
            return self.base_layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Write the active updates into the base weight; W is kept for an exact unmerge."""
        names = self._active()
        if not names:
            return
        weight, bias = self.effective_weight_and_bias()
        if self._weight_backup is None:
            self._weight_backup = self.base_layer.weight.detach().clone()
            if self.base_layer.bias is not None:
                self._bias_backup = self.base_layer.bias.detach().clone()
        self.base_layer.weight.data.copy_(weight)
        if bias is not None and self.base_layer.bias is not None:
            self.base_layer.bias.data.copy_(bias)
        self.merged.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight bit for bit."""
        if self._weight_backup is None:
            return
        self.base_layer.weight.data.copy_(self._weight_backup)
        if self._bias_backup is not None:
            self.base_layer.bias.data.copy_(self._bias_backup)
        self._weight_backup = None
        self._bias_backup = None
        self.merged = []


def atom_update(alpha: Tensor, atoms0: Tensor, delta_atoms: Tensor, delta_alpha: Tensor | None = None) -> Tensor:
    """dW in coefficient/atom form: (alpha + dA) x (D0 + dD) - alpha x D0, expanded so it is exactly 0 at 0.

    alpha: (a, b, m), atoms (m, p, q); returns (a, b, p, q).
    """
    update = torch.einsum("abm,mpq->abpq", alpha, delta_atoms)
    if delta_alpha is not None:
        update = update + torch.einsum("abm,mpq->abpq", delta_alpha, atoms0 + delta_atoms)
    return update


def overcomplete_update(
    alpha: Tensor, atoms0: Tensor, delta_beta: Tensor, delta_atoms1: Tensor, delta_alpha: Tensor | None = None
) -> Tensor:
    """dW for overcomplete atoms (section 3.2): D_il = sum_j beta_ilj D1_lj per input channel i.

    D1 starts as each atom repeated m1 times and beta as 1/m1, so with beta = 1/m1 + dB and
    D1 = D0 + dD1 the atom change expands to a sum of terms that are each exactly 0 at 0.
    Shapes: alpha (o, i, m), atoms0 (m, k, k), delta_beta (i, m, m1), delta_atoms1 (m, m1, k, k).
    """
    m1 = delta_atoms1.shape[1]
    atom_change = (
        delta_atoms1.sum(1).unsqueeze(0) / m1
        + delta_beta.sum(2)[..., None, None] * atoms0.unsqueeze(0)
        + torch.einsum("imj,mjpq->impq", delta_beta, delta_atoms1)
    )
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
    """

    def __init__(
        self,
        alpha: Tensor,
        atoms0: Tensor,
        layout: str,
        m1: int | None = None,
        train_alpha: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if layout not in ("conv", "blocks"):
            raise ConfigError(f"Unknown atom layout '{layout}'.")
        self.layout = layout
        self.register_buffer("alpha", alpha.to(dtype), persistent=False)
        self.register_buffer("atoms0", atoms0.to(dtype))
        m, p, q = atoms0.shape
        if m1 is None:
            self.delta_atoms = nn.Parameter(torch.zeros(m, p, q, dtype=dtype, device=atoms0.device))
        else:
            c_in = alpha.shape[1]
            self.delta_beta = nn.Parameter(torch.zeros(c_in, m, m1, dtype=dtype, device=atoms0.device))
            self.delta_atoms1 = nn.Parameter(torch.zeros(m, m1, p, q, dtype=dtype, device=atoms0.device))
        self.delta_alpha = nn.Parameter(torch.zeros_like(self.alpha)) if train_alpha else None

    @property
    def overcomplete(self) -> bool:
        """True for the beta + D1 parametrisation."""
        return hasattr(self, "delta_atoms1")

    def delta_weight(self, weight: Tensor) -> Tensor:
        if self.overcomplete:
            update = overcomplete_update(self.alpha, self.atoms0, self.delta_beta, self.delta_atoms1, self.delta_alpha)
        else:
            update = atom_update(self.alpha, self.atoms0, self.delta_atoms, self.delta_alpha)
        if self.layout == "conv":
            return update
        return update.permute(0, 2, 1, 3).reshape(weight.shape)
