"""Filter-atom math as pure functions: decompositions and update formulas, on the weight's device.

A conv kernel F (c_out x c_in x k x k) is written as F ~ alpha x D with atoms
D (m x k x k) shared by every filter and coefficients alpha (c_out x c_in x m)
(paper section 3.1). A linear weight W (c_out x c_in) is cut into blocks of
kc_out x kc that play the role of filters (section 3.3), so both layouts reduce
to one problem: rows of a matrix F (N x p*q) ~ alpha (N x m) @ D (m x p*q).

Solvers:
- "svd": the least-squares optimum (Eckart-Young); exact when m >= p*q.
- "lasso": the paper's sparse coding, min ||F - alpha D||^2 + lam ||alpha||_1,
  by alternating batched FISTA on alpha and least squares on D (unit-norm atoms).

The update formula `atom_update` (and overcomplete.py's for C3) gives dW from alpha, the fixed
atoms and the trained changes; `AtomDelta` (delta.py) applies them to a layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import DecompositionError

SOLVERS = ("svd", "lasso")


class Decomposition(tuple):
    """`(alpha, atoms)` as a tuple, with the relative reconstruction error attached."""

    relative_error: float

    def __new__(cls, alpha: Tensor, atoms: Tensor, relative_error: float) -> "Decomposition":
        obj = super().__new__(cls, (alpha, atoms))
        obj.relative_error = relative_error
        return obj

    @property
    def alpha(self) -> Tensor:
        """Coefficients (c_out x c_in x m, or blocks_out x blocks_in x m)."""
        return self[0]

    @property
    def atoms(self) -> Tensor:
        """Atoms (m x k x k, or m x kc_out x kc)."""
        return self[1]


def _check_m(m: int) -> None:
    if not isinstance(m, int) or m <= 0:
        raise DecompositionError(f"The number of atoms m must be a positive integer, got {m!r}.")


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise DecompositionError(f"Unknown solver '{solver}'; choose one of: {', '.join(SOLVERS)}.")


def relative_error(target: Tensor, approx: Tensor) -> float:
    """||target - approx||_F / ||target||_F (0 for an all-zero target reproduced exactly)."""
    target64, approx64 = target.double(), approx.double()
    norm = target64.norm()
    diff = (target64 - approx64).norm()
    return float(diff / norm) if norm > 0 else float(diff)


def _deterministic_signs(atoms: Tensor) -> Tensor:
    # Eigenvectors are defined up to sign; fix it so the same weight gives the same atoms everywhere.
    idx = atoms.abs().argmax(dim=-1, keepdim=True)
    signs = torch.sign(torch.gather(atoms, -1, idx))
    signs[signs == 0] = 1
    return atoms * signs


# Rows are converted to float64 this many elements at a time: bounded temporaries instead of a
# float64 copy of a whole layer (a 1280x1280x3x3 kernel would need 118 MB per pass).
CHUNK_ELEMENTS = 1 << 22


def _row_chunks(rows: Tensor):
    step = max(1, CHUNK_ELEMENTS // max(rows.shape[-1], 1))
    for start in range(0, rows.shape[-2], step):
        yield start, rows[..., start : start + step, :].double()


def gram_matrix(rows: Tensor) -> Tensor:
    """rows^T rows in float64 for rows (..., N, d), accumulated over chunks of rows."""
    gram = torch.zeros(*rows.shape[:-2], rows.shape[-1], rows.shape[-1], dtype=torch.float64, device=rows.device)
    for _, chunk in _row_chunks(rows):
        gram += chunk.mT @ chunk
    return gram


def atoms_from_gram(gram: Tensor, m: int) -> Tensor:
    """The m leading eigenvectors of Gram matrices (..., d, d) as (..., m, d) float64 atoms.

    Batched: one eigendecomposition call for every layer with the same block size.
    """
    d = gram.shape[-1]
    _, eigvecs = torch.linalg.eigh(gram)
    leading = eigvecs.flip(-1)[..., : min(m, d)].mT.contiguous()
    atoms = _deterministic_signs(leading)
    if m > d:
        atoms = torch.cat([atoms, atoms.new_zeros(*atoms.shape[:-2], m - d, d)], dim=-2)
    return atoms


def svd_atoms(rows: Tensor, m: int) -> Tensor:
    """The m leading right singular vectors of `rows` (N x d, or batched ... x N x d), as m x d float64.

    Uses the d x d Gram matrix, so the cost is one pass over the N rows; when m > d the
    extra atoms are zero (they add no capacity to a least-squares fit).
    """
    return atoms_from_gram(gram_matrix(rows), m)


def projection_error(rows: Tensor, atoms: Tensor) -> float:
    """Relative error of the least-squares fit of `rows` (N x d) over `atoms` (m x d), in float64.

    The same number as relative_error(rows, solve_coefficients(rows, atoms) @ atoms), computed
    chunk by chunk without materialising the coefficients.
    """
    atoms64 = atoms.double()
    pinv = torch.linalg.pinv(atoms64)
    residual = rows.new_zeros((), dtype=torch.float64)
    total = rows.new_zeros((), dtype=torch.float64)
    for _, chunk in _row_chunks(rows):
        residual += (chunk - (chunk @ pinv) @ atoms64).pow(2).sum()
        total += chunk.pow(2).sum()
    return float(residual.sqrt() / total.sqrt()) if total > 0 else float(residual.sqrt())


def _soft_threshold(x: Tensor, tau: float) -> Tensor:
    return torch.sign(x) * torch.clamp(x.abs() - tau, min=0.0)


def fista_coefficients(rows: Tensor, atoms: Tensor, lam: float, iterations: int) -> Tensor:
    """Batched FISTA for min_a 0.5||rows - a @ atoms||^2 + lam ||a||_1, one problem per row."""
    gram = atoms @ atoms.T
    lipschitz = float(torch.linalg.matrix_norm(gram, ord=2)) or 1.0
    step = 1.0 / lipschitz
    target = rows @ atoms.T
    coeff = torch.zeros(rows.shape[0], atoms.shape[0], dtype=rows.dtype, device=rows.device)
    momentum, t = coeff, 1.0
    for _ in range(iterations):
        grad = momentum @ gram - target
        new = _soft_threshold(momentum - step * grad, lam * step)
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        momentum = new + ((t - 1.0) / t_next) * (new - coeff)
        coeff, t = new, t_next
    return coeff


def lasso_atoms(rows: Tensor, m: int, lam: float, iterations: int, dictionary_steps: int) -> Tensor:
    """Sparse-coding dictionary: SVD start, then alternate FISTA codes and least-squares atoms."""
    rows64 = rows.double()
    atoms = svd_atoms(rows64, m)
    atoms = atoms + (atoms.norm(dim=1, keepdim=True) == 0) * _fill_atoms(atoms)
    lam_abs = lam * float(rows64.pow(2).mean().sqrt())
    for _ in range(dictionary_steps):
        coeff = fista_coefficients(rows64, atoms, lam_abs, iterations)
        gram = coeff.T @ coeff
        ridge = 1e-8 * (gram.diagonal().mean() + 1e-12)
        eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
        updated = torch.linalg.solve(gram + ridge * eye, coeff.T @ rows64)
        norms = updated.norm(dim=1, keepdim=True)
        # An atom no row uses keeps its previous value instead of collapsing to zero.
        atoms = torch.where(norms > 1e-12, updated / norms.clamp_min(1e-12), atoms)
    return _deterministic_signs(atoms)


def _fill_atoms(atoms: Tensor) -> Tensor:
    # Overcomplete dictionaries start their extra atoms on a fixed, reproducible pattern.
    generator = torch.Generator(device="cpu").manual_seed(0)
    fill = torch.randn(atoms.shape, generator=generator, dtype=torch.float64).to(atoms.device)
    return fill / fill.norm(dim=1, keepdim=True)


def solve_coefficients(
    rows: Tensor, atoms: Tensor, solver: str = "svd", lam: float = 0.1, iterations: int = 100
) -> Tensor:
    """Coefficients of `rows` (N x d) over fixed `atoms` (m x d), in float64.

    "svd": least squares (a projection when the atoms are orthonormal);
    "lasso": FISTA with the same relative lam as the dictionary fit.
    """
    _check_solver(solver)
    atoms64 = atoms.double()
    if solver == "svd":
        pinv = torch.linalg.pinv(atoms64)
        coeff = torch.empty(rows.shape[0], atoms.shape[0], dtype=torch.float64, device=rows.device)
        for start, chunk in _row_chunks(rows):
            torch.matmul(chunk, pinv, out=coeff[start : start + chunk.shape[0]])
        return coeff
    rows64 = rows.double()
    lam_abs = lam * float(rows64.pow(2).mean().sqrt())
    return fista_coefficients(rows64, atoms64, lam_abs, iterations)


def fit_atoms(
    rows: Tensor, m: int, solver: str = "svd", lam: float = 0.1, iterations: int = 100, dictionary_steps: int = 10
) -> Tensor:
    """The m x d float64 atoms of `rows` (N x d) for a solver, without the coefficients."""
    _check_m(m)
    _check_solver(solver)
    if solver == "svd":
        return svd_atoms(rows, m)
    return lasso_atoms(rows, m, lam, iterations, dictionary_steps)


def _factor_rows(
    rows: Tensor, m: int, solver: str, lam: float, iterations: int, dictionary_steps: int
) -> tuple[Tensor, Tensor]:
    atoms = fit_atoms(rows, m, solver, lam, iterations, dictionary_steps)
    return solve_coefficients(rows, atoms, solver, lam, iterations), atoms


def decompose_conv(
    weight: Tensor,
    m: int,
    solver: str = "svd",
    lam: float = 0.1,
    iterations: int = 100,
    dictionary_steps: int = 10,
) -> Decomposition:
    """Decompose a conv kernel c_out x c_in x k x k into alpha (c_out x c_in x m) and atoms (m x k x k).

    weight ~ einsum("oim,mpq->oipq", alpha, atoms). Results are float64 on the weight's device.
    `lam` is relative to the RMS of the kernel (lasso only).
    """
    _check_m(m)
    _check_solver(solver)
    if weight.dim() != 4:
        raise DecompositionError(f"A conv kernel must have 4 dimensions, got shape {tuple(weight.shape)}.")
    c_out, c_in, kh, kw = weight.shape
    rows = weight.reshape(c_out * c_in, kh * kw)
    coeff, atoms = _factor_rows(rows, m, solver, lam, iterations, dictionary_steps)
    alpha = coeff.reshape(c_out, c_in, m)
    atoms = atoms.reshape(m, kh, kw)
    return Decomposition(alpha, atoms, relative_error(weight, compose_conv(alpha, atoms)))


def compose_conv(alpha: Tensor, atoms: Tensor) -> Tensor:
    """einsum("oim,mpq->oipq"): the kernel built from coefficients and atoms."""
    return torch.einsum("oim,mpq->oipq", alpha, atoms)


def block_size(channels: int, requested: int) -> int:
    """Block edge used for a channel count: `requested` when it divides `channels`.

    Fallback when it does not: the largest divisor of `channels` not above `requested`,
    so every layer keeps the block form (possibly with smaller blocks) instead of being skipped.
    """
    if requested <= 0:
        raise DecompositionError(f"The block size kc must be a positive integer, got {requested!r}.")
    for size in range(min(requested, channels), 0, -1):
        if channels % size == 0:
            return size
    return 1


def block_edges(c_out: int, c_in: int, kc: int, kc_out: int | None = None) -> tuple[int, int]:
    """(kc_out, kc) actually used for a c_out x c_in weight: kc_out defaults to kc, each edge via `block_size`."""
    return block_size(c_out, kc if kc_out is None else kc_out), block_size(c_in, kc)


def linear_to_blocks(weight: Tensor, kc_out: int, kc: int) -> Tensor:
    """c_out x c_in (x 1 x 1) -> (c_out/kc_out) x (c_in/kc) x kc_out x kc blocks."""
    c_out, c_in = weight.shape[0], weight.shape[1]
    mat = weight.reshape(c_out, c_in)
    return mat.reshape(c_out // kc_out, kc_out, c_in // kc, kc).permute(0, 2, 1, 3)


def blocks_to_linear(blocks: Tensor) -> Tensor:
    """Inverse of `linear_to_blocks` (returns the c_out x c_in matrix)."""
    a, b, p, q = blocks.shape
    return blocks.permute(0, 2, 1, 3).reshape(a * p, b * q)


def compose_blocks(alpha: Tensor, atoms: Tensor) -> Tensor:
    """W = sum_l alpha[..., l] kron D_l, as a c_out x c_in matrix."""
    return blocks_to_linear(torch.einsum("abm,mpq->abpq", alpha, atoms))


def decompose_linear(
    weight: Tensor,
    m: int,
    kc: int,
    kc_out: int | None = None,
    solver: str = "svd",
    lam: float = 0.1,
    iterations: int = 100,
    dictionary_steps: int = 10,
) -> Decomposition:
    """Kronecker-block decomposition of a linear (or 1x1 conv) weight.

    W (c_out x c_in) is seen as blocks of kc_out x kc (kc_out defaults to kc); alpha is
    (c_out/kc_out) x (c_in/kc) x m and atoms m x kc_out x kc, with W ~ sum_l alpha_l kron D_l.
    Channel counts that kc does not divide use `block_size`'s fallback (a smaller divisor).
    """
    _check_m(m)
    _check_solver(solver)
    if weight.dim() not in (2, 4) or (weight.dim() == 4 and weight.shape[2:] != (1, 1)):
        raise DecompositionError(f"A linear weight must be 2-D or a 1x1 kernel, got shape {tuple(weight.shape)}.")
    c_out, c_in = weight.shape[0], weight.shape[1]
    kc_o, kc_in = block_edges(c_out, c_in, kc, kc_out)
    blocks = linear_to_blocks(weight, kc_o, kc_in)
    a, b = blocks.shape[:2]
    coeff, atoms = _factor_rows(blocks.reshape(a * b, kc_o * kc_in), m, solver, lam, iterations, dictionary_steps)
    alpha = coeff.reshape(a, b, m)
    atoms = atoms.reshape(m, kc_o, kc_in)
    target = weight.reshape(c_out, c_in)
    return Decomposition(alpha, atoms, relative_error(target, compose_blocks(alpha, atoms)))


def atom_update(alpha: Tensor, atoms0: Tensor, delta_atoms: Tensor, delta_alpha: Tensor | None = None) -> Tensor:
    """dW in coefficient/atom form: (alpha + dA) x (D0 + dD) - alpha x D0, expanded so it is exactly 0 at 0.

    alpha: (a, b, m), atoms (m, p, q); returns (a, b, p, q).
    """
    update = torch.einsum("abm,mpq->abpq", alpha, delta_atoms)
    if delta_alpha is not None:
        update = update + torch.einsum("abm,mpq->abpq", delta_alpha, atoms0 + delta_atoms)
    return update
