"""`AtomDelta`: the filter-atom update of one adapted layer (the module that holds the parameters).

The formulas it applies are the pure functions of `functional` and `overcomplete`; this module keeps the
trainable tensors, the frozen atoms and the fast paths that avoid building alpha.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ..core.fast_paths import is_compiling
from ..core.layer import AdaptedLayer, WeightDelta
from ..errors import ConfigError
from .functional import atom_update
from .overcomplete import OVERCOMPLETE_INITS, atom_change, initial_beta, update_from_atom_change


def _pseudo_inverse(atoms: Tensor) -> Tensor:
    """pinv of the atoms flattened to (m, k*k), solved in float64 for accuracy, in the atoms' dtype."""
    return torch.linalg.pinv(atoms.detach().reshape(atoms.shape[0], -1).double()).to(atoms.dtype)


# Elements per chunk when W_eff is built without gradients (merge, the eval cache): the update of a chunk is still in
# cache when it is added, and skinny GEMMs run near memory speed (a 118 MB kernel: 48 ms whole, 28 ms in chunks).
_CHUNK_ELEMENTS = 1 << 20


def _wants_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _chunks(rows: int, row_elements: int) -> list[slice]:
    step = max(2, _CHUNK_ELEMENTS // max(row_elements, 1) // 2 * 2)  # even: `_transform_rows` pairs the rows
    return [slice(start, start + step) for start in range(0, rows, step)]


def _transform_rows(out: Tensor, accumulator: Tensor, rows: Tensor, transform: Tensor, scale: float) -> None:
    """out = accumulator + scale rows @ transform, for (n, d) rows (out may not be rows: a GEMM must not write its input).

    Pairs of rows go through one GEMM with the (2d, 2d) block-diagonal transform: the CPU's GEMM runs a 9-column
    product at a fraction of its speed, and 18 columns take half the time (a 1280 x 1280 x 3 x 3 kernel: 19 ms, 9 ms).
    """
    n, d = rows.shape
    even = n - n % 2
    if even:
        torch.addmm(accumulator[:even].view(-1, 2 * d), rows[:even].view(-1, 2 * d), torch.block_diag(transform, transform),
                    alpha=scale, out=out[:even].view(-1, 2 * d))
    if even < n:
        torch.addmm(accumulator[even:], rows[even:], transform, alpha=scale, out=out[even:])


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

    With `m1` the atoms are overcomplete (C3): `delta_beta` and `delta_atoms1` hold beta and D1 in
    the form `overcomplete_init` names ("residual" or the paper's "copies", see overcomplete.py).
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
        overcomplete_init: str = "residual",
    ) -> None:
        super().__init__()
        if layout not in ("conv", "blocks"):
            raise ConfigError(f"Unknown atom layout '{layout}'.")
        if alpha is None and (layout != "conv" or train_alpha or coefficient_shape is None):
            raise ConfigError("Only frozen conv coefficients can be derived from the weight; pass alpha.")
        if overcomplete_init not in OVERCOMPLETE_INITS:
            raise ConfigError(f"Unknown overcomplete_init {overcomplete_init!r}; choose one of: {', '.join(OVERCOMPLETE_INITS)}.")
        self.layout = layout
        self.overcomplete_init = overcomplete_init
        self.coefficient_shape = tuple(int(v) for v in (coefficient_shape if alpha is None else alpha.shape[:2]))
        alpha = None if alpha is None else alpha.to(dtype)
        if alpha is not None and layout == "blocks":
            # stored in (a, m, b) memory order and seen as (a, b, m): the activation path reads it as one
            # (a, m b) matrix without a copy (`block_factors`)
            alpha = alpha.permute(0, 2, 1).contiguous().permute(0, 2, 1)
        self.register_buffer("_alpha", alpha, persistent=False)
        self.register_buffer("atoms0", atoms0.to(dtype))
        m, p, q = atoms0.shape
        if m1 is None:
            self.delta_atoms = nn.Parameter(torch.zeros(m, p, q, dtype=dtype, device=atoms0.device))
        else:
            c_in = self.coefficient_shape[1]
            beta = (initial_beta(c_in, m, m1, dtype, atoms0.device) if overcomplete_init == "residual"
                    else torch.zeros(c_in, m, m1, dtype=dtype, device=atoms0.device))
            self.delta_beta = nn.Parameter(beta)
            self.delta_atoms1 = nn.Parameter(torch.zeros(m, m1, p, q, dtype=dtype, device=atoms0.device))
        self.delta_alpha = (
            nn.Parameter(torch.zeros(*self.coefficient_shape, m, dtype=dtype, device=atoms0.device)) if train_alpha else None
        )
        self._layer: weakref.ref | None = None
        self._pinv: tuple[Any, Tensor] | None = None
        self.forget_group()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_layer"] = None  # weak references do not pickle; the layer re-attaches on load
        state["_group_slot"] = None  # a copy builds its weight alone: the group's members are the original's layers
        return state

    def attach(self, layer: AdaptedLayer) -> None:
        self._layer = weakref.ref(layer)

    def join_group(self, group: Any, slot: int) -> None:
        """Build this update's training weight in `group` (a `grouped.WeightGroup`), as its member `slot`."""
        self.__dict__["_group_slot"] = (group, slot)

    def forget_group(self) -> None:
        """Leave this update's group, if any: its weight is built per layer again."""
        self.__dict__["_group_slot"] = None

    def grouped_weight(self, layer: AdaptedLayer, name: str) -> Tensor | None:
        found = self.__dict__["_group_slot"]
        if found is None or found[0].names[found[1]] != name or is_compiling():
            return None
        return found[0].weight_for(found[1], layer)

    @property
    def overcomplete(self) -> bool:
        """True for the beta + D1 parametrisation."""
        return hasattr(self, "delta_atoms1")

    def atom_change(self) -> Tensor:
        """D_il - D0_l per input channel (c_in, m, k, k) of the overcomplete form."""
        return atom_change(self.overcomplete_init, self.atoms0, self.delta_beta, self.delta_atoms1)

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
            change = self.atom_change()
            return self._projector() @ change.reshape(-1, m, p * q)
        return (self._projector() @ self.delta_atoms.reshape(m, p * q)).unsqueeze(0)

    @property
    def supports_blocks(self) -> bool:  # type: ignore[override]
        """Kronecker blocks with stored, frozen alpha and plain atoms: dW = sum_l alpha_l kron dD_l."""
        return self.layout == "blocks" and not self.derived and self.delta_alpha is None and not self.overcomplete

    def block_factors(self) -> tuple[Tensor, Tensor]:
        """(alpha as an (a, m b) matrix, dD (m, kc_out, kc)) of the Kronecker form."""
        alpha = self._alpha
        return alpha.permute(0, 2, 1).reshape(alpha.shape[0], -1), self.delta_atoms

    def _projector(self) -> Tensor:
        # pinv(D0) (d x m), recomputed only when the atoms change (loading a state dict replaces them).
        atoms = self.atoms0
        if is_compiling():  # traced into the graph: the data-pointer check below would break it
            return _pseudo_inverse(atoms)
        key = (atoms.data_ptr(), atoms._version, atoms.dtype, atoms.device)
        if self._pinv is None or self._pinv[0] != key:
            self._pinv = (key, _pseudo_inverse(atoms))
        return self._pinv[1]

    def delta_weight(self, weight: Tensor) -> Tensor:
        alpha = self.coefficients(weight)
        if self.overcomplete:
            update = update_from_atom_change(alpha, self.atoms0, self.atom_change(), self.delta_alpha)
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
                if _wants_grad(accumulator, rows, transform):
                    return torch.addmm(accumulator.reshape(-1, d), rows.to(dtype), transform[0], alpha=scale).reshape(
                        accumulator.shape)
                out = torch.empty_like(accumulator)
                for part in _chunks(rows.shape[0], d):
                    _transform_rows(out.view(-1, d)[part], accumulator.reshape(-1, d)[part], rows[part].to(dtype),
                                    transform[0], scale)
                return out
            update = torch.einsum("oid,ide->oie", weight.reshape(*self.coefficient_shape, d).to(dtype), transform)
            return torch.add(accumulator, update.reshape(accumulator.shape), alpha=scale)
        if self.overcomplete:
            change = self.atom_change().reshape(-1, m, d)
            update = torch.einsum("oim,imd->oid", self._alpha, change).to(dtype)
            return torch.add(accumulator, update.reshape(accumulator.shape), alpha=scale)
        delta = self.delta_atoms.reshape(m, d)
        if self.layout == "conv":
            alpha = self._alpha.reshape(-1, m)
            if alpha.dtype == dtype:
                return torch.addmm(accumulator.reshape(-1, d), alpha, delta, alpha=scale).reshape(accumulator.shape)
            return torch.add(accumulator, (alpha @ delta).to(dtype).reshape(accumulator.shape), alpha=scale)
        a, b = self.coefficient_shape
        blocks = accumulator.reshape(a, p, b, q)
        if _wants_grad(accumulator, delta, self._alpha):
            # accumulator first: the sum takes its (contiguous) layout, the update is read strided
            return torch.add(blocks, self._block_update(slice(None), dtype), alpha=scale).reshape(accumulator.shape)
        out = torch.empty_like(accumulator)
        for part in _chunks(a, p * b * q):
            torch.add(blocks[part], self._block_update(part, dtype), alpha=scale, out=out.view(a, p, b, q)[part])
        return out

    def _block_update(self, part: slice, dtype: torch.dtype) -> Tensor:
        """Rows `part` of the Kronecker update, as (rows, p, b, q) blocks."""
        m, p, q = self.atoms0.shape
        b = self.coefficient_shape[1]
        # matmul reads the blocks' alpha in its stored (a, m, b) order; a reshape to (a b, m) would copy it
        update = torch.matmul(self._alpha[part], self.delta_atoms.reshape(m, p * q))
        return update.to(dtype).reshape(-1, b, p, q).permute(0, 2, 1, 3)

    @torch.no_grad()
    def add_in_place(self, weight: Tensor, scale: float) -> bool:
        # the two chunked forms of `add_to`, chunk by chunk into W: each chunk of W_eff needs only the same chunk of W
        if self.delta_alpha is not None or self.overcomplete or not weight.is_contiguous():
            return False
        m, p, q = self.atoms0.shape
        d = p * q
        if self.derived:
            transform = self.tap_transform().to(weight.dtype)
            if transform.shape[0] != 1:
                return False
            rows = weight.view(-1, d)
            parts = _chunks(rows.shape[0], d)
            scratch = torch.empty((min(parts[0].stop, rows.shape[0]), d), dtype=weight.dtype, device=weight.device)
            for part in parts:
                chunk = rows[part]
                block = scratch[: chunk.shape[0]]
                _transform_rows(block, chunk, chunk, transform[0], scale)
                chunk.copy_(block)
            return True
        if self.layout != "blocks":
            return False
        a, b = self.coefficient_shape
        blocks = weight.view(a, p, b, q)
        for part in _chunks(a, p * b * q):
            torch.add(blocks[part], self._block_update(part, weight.dtype), alpha=scale, out=blocks[part])
        return True
