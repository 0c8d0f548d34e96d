"""Per-layer decomposition of base weights into frozen alpha and fixed atoms (one report type).

`decompose_layers` batches the eigendecompositions of every layer with the same row size; the
math is in `functional`. Fixed atoms are float32 (`ATOMS_DTYPE`), so training and loading agree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .config import FilterAtomConfig
from .functional import atoms_from_gram, block_edges, fit_atoms, gram_matrix, linear_to_blocks, projection_error, \
    solve_coefficients

# Fixed atoms are stored (and alpha rebuilt from them) in this dtype, so training and loading agree.
ATOMS_DTYPE = torch.float32
# Smallest singular value, relative to the largest, of usable fixed atoms (the svd solver's are orthonormal: 1).
MIN_ATOM_CONDITION = 1e-6


@dataclass
class LayerDecomposition:
    """alpha and fixed atoms of one layer, its layout and weight shape, the relative error of
    alpha x D0 against W and the seconds it took.

    `alpha` is None where it was not computed (`derives_alpha` layers need only the atoms);
    `relative_error` is NaN where nothing was solved (atoms read from a file or the cache).
    """

    alpha: Tensor | None
    atoms0: Tensor
    relative_error: float
    seconds: float
    layout: str
    shape: tuple[int, ...]


def all_finite(tensor: Tensor) -> bool:
    """No NaN or infinity in `tensor`, in one reduction (`isfinite(t).all()` first writes a mask of its size)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)  # NaN propagates into both
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def atoms_are_usable(atoms: Tensor) -> bool:
    """True for finite fixed atoms (m x p x q) whose first min(m, p*q) directions are independent.

    Beyond p*q the extra atoms of an overcomplete set add nothing (`atoms_from_gram` pads them with zeros);
    zero, repeated or nearly parallel atoms below that would make least-squares alpha blow up.
    """
    flat = atoms.detach().double().reshape(atoms.shape[0], -1)
    if flat.numel() == 0 or not bool(torch.isfinite(flat).all()):
        return False
    values = torch.linalg.svdvals(flat)
    rank = min(flat.shape)
    return bool(values[0] > 0) and bool(values[rank - 1] >= MIN_ATOM_CONDITION * values[0])


def atom_shape(weight_shape: tuple[int, ...], layout: str, config: FilterAtomConfig) -> tuple[int, int]:
    """(p, q) of each atom: the kernel for "conv", the (kc_out, kc) block edges for "blocks"."""
    if layout == "conv":
        return weight_shape[2], weight_shape[3]
    return block_edges(weight_shape[0], weight_shape[1], config.kc, config.kc_out)


def layer_rows(weight: Tensor, layout: str, config: FilterAtomConfig) -> tuple[Tensor, tuple[int, ...]]:
    """The matrix whose rows are decomposed, and the shape alpha takes (without m)."""
    if layout == "conv":
        c_out, c_in, kh, kw = weight.shape
        return weight.reshape(c_out * c_in, kh * kw), (c_out, c_in)
    kc_o, kc_in = atom_shape(tuple(weight.shape), layout, config)
    blocks = linear_to_blocks(weight, kc_o, kc_in)
    a, b = blocks.shape[:2]
    return blocks.reshape(a * b, kc_o * kc_in), (a, b)


def derives_alpha(layout: str, weight_shape: tuple[int, ...], config: FilterAtomConfig) -> bool:
    """True where frozen alpha is better derived from W than stored (`AtomDelta` with alpha=None).

    That needs the least-squares alpha (the svd solver) and pays off when applying rows(W)
    times a d x d matrix costs at most twice alpha x dD: k x k convs with m >= k^2 / 2, whose
    alpha is 2/3 to 1x the size of W (for SD v1.4 at C2, 2.2 GB in fp32).
    """
    if layout != "conv" or config.solver != "svd":
        return False
    return weight_shape[2] * weight_shape[3] <= 2 * config.m


def needs_alpha(layout: str, weight_shape: tuple[int, ...], config: FilterAtomConfig) -> bool:
    """True where a layer's alpha must be computed and kept: trained, or not derivable from W."""
    return config.train_alpha or not derives_alpha(layout, weight_shape, config)


def _solver_args(config: FilterAtomConfig) -> dict[str, Any]:
    return dict(solver=config.solver, lam=config.lam, iterations=config.iterations,
                dictionary_steps=config.dictionary_steps)


def _finish(rows: Tensor, alpha_shape: tuple[int, ...], atoms0: Tensor, config: FilterAtomConfig,
            with_alpha: bool) -> tuple[Tensor | None, float]:
    """alpha over the fixed (float32) atoms, and the relative error of alpha x D0."""
    atoms_flat = atoms0.to(rows.device).reshape(atoms0.shape[0], -1)
    if not with_alpha and config.solver == "svd":
        return None, projection_error(rows, atoms_flat)
    coeff = solve_coefficients(rows, atoms_flat, config.solver, config.lam, config.iterations)
    if config.solver == "svd":
        error = projection_error(rows, atoms_flat)
    else:
        error = float((rows.double() - coeff @ atoms_flat.double()).norm() / rows.double().norm().clamp_min(1e-30))
    return (coeff.reshape(*alpha_shape, atoms0.shape[0]) if with_alpha else None), error


def decompose_layer(
    weight: Tensor, layout: str, config: FilterAtomConfig, atoms0: Tensor | None = None, with_alpha: bool = True
) -> LayerDecomposition:
    """Decompose one base weight; with `atoms0` given (from a file) only alpha is solved for.

    alpha is always solved over the float32-rounded atoms that get stored, so a model rebuilt
    from an adapter file gets exactly the alpha it was trained with. `with_alpha=False` skips
    alpha (the error is still reported).
    """
    start = time.perf_counter()
    weight = weight.detach()
    shape = tuple(weight.shape)
    rows, alpha_shape = layer_rows(weight, layout, config)
    if atoms0 is None:
        atoms = fit_atoms(rows, config.m, **_solver_args(config)).to(ATOMS_DTYPE)
        atoms0 = atoms.reshape(config.m, *atom_shape(shape, layout, config))
    alpha, error = _finish(rows, alpha_shape, atoms0, config, with_alpha)
    return LayerDecomposition(alpha, atoms0, error, time.perf_counter() - start, layout, shape)


def decompose_layers(
    weights: dict[str, tuple[Tensor, str]], config: FilterAtomConfig, with_alpha: Callable[[str], bool] | bool = True
) -> dict[str, LayerDecomposition]:
    """`decompose_layer` for many layers: with the svd solver, the Gram matrices of every layer with
    the same row size go through ONE batched eigendecomposition (same atoms as one by one).

    `weights`: name -> (weight, layout); `with_alpha`: a flag, or a function of the name.
    Each layer's `seconds` is its own Gram / alpha time plus its share of the batched solve.
    """
    wants = with_alpha if callable(with_alpha) else (lambda _name: with_alpha)
    if config.solver != "svd":
        return {name: decompose_layer(w, layout, config, with_alpha=wants(name)) for name, (w, layout) in weights.items()}
    rows: dict[str, tuple[Tensor, tuple[int, ...]]] = {}
    grams: dict[int, list[tuple[str, Tensor]]] = {}
    seconds: dict[str, float] = {}
    for name, (weight, layout) in weights.items():
        start = time.perf_counter()
        rows[name] = layer_rows(weight.detach(), layout, config)
        grams.setdefault(rows[name][0].shape[1], []).append((name, gram_matrix(rows[name][0])))
        seconds[name] = time.perf_counter() - start
    atoms: dict[str, Tensor] = {}
    for group in grams.values():
        start = time.perf_counter()
        found = atoms_from_gram(torch.stack([g for _, g in group]), config.m).to(ATOMS_DTYPE)
        share = (time.perf_counter() - start) / len(group)
        for (name, _), layer_atoms in zip(group, found):
            weight, layout = weights[name]
            atoms[name] = layer_atoms.reshape(config.m, *atom_shape(tuple(weight.shape), layout, config))
            seconds[name] += share
    out = {}
    for name, (layer_rows_, alpha_shape) in rows.items():
        start = time.perf_counter()
        weight, layout = weights[name]
        alpha, error = _finish(layer_rows_, alpha_shape, atoms[name], config, wants(name))
        out[name] = LayerDecomposition(alpha, atoms[name], error, seconds[name] + time.perf_counter() - start, layout,
                                       tuple(weight.shape))
    return out
