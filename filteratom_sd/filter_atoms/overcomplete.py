"""Overcomplete filter atoms (paper section 3.2, the C3 preset): the pure math of its two starting points.

Each atom D0_l is rewritten per input channel i as D_il = sum_j beta_ilj D1_lj over m1 atoms D1_l.

- "copies" (the paper's initialisation): D1 holds m1 copies of D0 and beta = 1/m1. Every copy then
  receives the same gradient at every step, so the copies never separate and C3 stays C2 with one
  gain per atom and input channel. The tuned tensors are dB = beta - 1/m1 and dD1 = D1 - copies.
- "residual" (the official code's form): D_il = D0_l + sum_j beta_ilj D1_lj with D1 = 0 and beta drawn
  at random, so each copy j sees its own mix of the input channels' gradients from the first step.
  The tuned tensors are beta and D1 themselves.

Both are exactly the base layer at initialisation (the atom change is 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

OVERCOMPLETE_INITS = ("residual", "copies")
BETA_INIT_SEED = 0


def initial_beta(c_in: int, m: int, m1: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> Tensor:
    """The residual form's starting beta (c_in, m, m1): N(0, 1) / m1, seeded, so a layer always starts the same.

    The paper's magnitude 1/m1 with random signs, so C3 learns at C2's learning rates.
    """
    generator = torch.Generator(device="cpu").manual_seed(BETA_INIT_SEED)
    beta = torch.randn(c_in, m, m1, generator=generator, dtype=torch.float64) / m1
    return beta.to(dtype=dtype, device=device)


def copies_atom_change(atoms0: Tensor, delta_beta: Tensor, delta_atoms1: Tensor) -> Tensor:
    """D_il - D0_l (i, m, k, k) for beta = 1/m1 + dB and D1 = copies of D0 + dD1, as terms each exactly 0 at 0.

    Shapes: atoms0 (m, k, k), delta_beta (i, m, m1), delta_atoms1 (m, m1, k, k).
    """
    m1 = delta_atoms1.shape[1]
    return (
        delta_atoms1.sum(1).unsqueeze(0) / m1
        + delta_beta.sum(2)[..., None, None] * atoms0.unsqueeze(0)
        + torch.einsum("imj,mjpq->impq", delta_beta, delta_atoms1)
    )


def residual_atom_change(beta: Tensor, atoms1: Tensor) -> Tensor:
    """D_il - D0_l = sum_j beta_ilj D1_lj (i, m, k, k); beta (i, m, m1), atoms1 (m, m1, k, k)."""
    return torch.einsum("imj,mjpq->impq", beta, atoms1)


def atom_change(init: str, atoms0: Tensor, beta: Tensor, atoms1: Tensor) -> Tensor:
    """The per-input-channel atom change of either form (`OVERCOMPLETE_INITS`)."""
    if init == "copies":
        return copies_atom_change(atoms0, beta, atoms1)
    return residual_atom_change(beta, atoms1)


def update_from_atom_change(alpha: Tensor, atoms0: Tensor, change: Tensor, delta_alpha: Tensor | None = None) -> Tensor:
    """dW (o, i, k, k) from frozen alpha (o, i, m) and a per-input-channel atom change (i, m, k, k).

    With trainable coefficients (C4-style) the new coefficients multiply the changed atoms too.
    """
    update = torch.einsum("oim,impq->oipq", alpha, change)
    if delta_alpha is not None:
        update = update + torch.einsum("oim,impq->oipq", delta_alpha, atoms0.unsqueeze(0) + change)
    return update


def overcomplete_update(
    alpha: Tensor, atoms0: Tensor, delta_beta: Tensor, delta_atoms1: Tensor, delta_alpha: Tensor | None = None,
    init: str = "residual",
) -> Tensor:
    """dW for overcomplete atoms in the form `init` names: D_il = sum_j beta_ilj D1_lj per input channel i.

    Shapes: alpha (o, i, m), atoms0 (m, k, k), delta_beta (i, m, m1), delta_atoms1 (m, m1, k, k).
    """
    return update_from_atom_change(alpha, atoms0, atom_change(init, atoms0, delta_beta, delta_atoms1), delta_alpha)
