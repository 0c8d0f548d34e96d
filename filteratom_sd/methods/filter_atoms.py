"""The filter-atom method (the paper's C1-C4): alpha frozen, atoms tuned."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..config import FilterAtomConfig
from ..decompose import (
    atoms_from_gram,
    block_size,
    fit_atoms,
    gram_matrix,
    linear_to_blocks,
    projection_error,
    solve_coefficients,
)
from ..errors import AdapterFormatError
from ..inject import check_block_size, select_targets
from ..layers import AtomDelta
from .base import LayerDeltaMethod, register_method

logger = logging.getLogger(__name__)

# Fixed atoms are stored (and alpha rebuilt from them) in this dtype, so training and loading agree.
ATOMS_DTYPE = torch.float32


@dataclass
class LayerDecomposition:
    """alpha and fixed atoms of one layer, with how well alpha x D0 reproduces W and how long it took.

    `alpha` is None where it was not computed (`derives_alpha` layers need only the atoms).
    """

    alpha: Tensor | None
    atoms0: Tensor
    relative_error: float
    seconds: float


def layer_rows(weight: Tensor, layout: str, config: FilterAtomConfig) -> tuple[Tensor, tuple[int, ...]]:
    """The matrix whose rows are decomposed, and the shape alpha takes (without m)."""
    if layout == "conv":
        c_out, c_in, kh, kw = weight.shape
        return weight.reshape(c_out * c_in, kh * kw), (c_out, c_in)
    c_out, c_in = weight.shape[0], weight.shape[1]
    kc_in = block_size(c_in, config.kc)
    kc_o = block_size(c_out, config.kc if config.kc_out is None else config.kc_out)
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
    rows, alpha_shape = layer_rows(weight, layout, config)
    if atoms0 is None:
        atoms = fit_atoms(rows, config.m, **_solver_args(config)).to(ATOMS_DTYPE)
        atoms0 = atoms.reshape(config.m, *_atom_shape((weight, layout), config))
    alpha, error = _finish(rows, alpha_shape, atoms0, config, with_alpha)
    return LayerDecomposition(alpha, atoms0, error, time.perf_counter() - start)


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
            atoms[name] = layer_atoms.reshape(config.m, *_atom_shape(weights[name], config))
            seconds[name] += share
    out = {}
    for name, (layer_rows_, alpha_shape) in rows.items():
        start = time.perf_counter()
        alpha, error = _finish(layer_rows_, alpha_shape, atoms[name], config, wants(name))
        out[name] = LayerDecomposition(alpha, atoms[name], error, seconds[name] + time.perf_counter() - start)
    return out


def _atom_shape(entry: tuple[Tensor, str], config: FilterAtomConfig) -> tuple[int, int]:
    weight, layout = entry
    if layout == "conv":
        return weight.shape[2], weight.shape[3]
    kc_o = block_size(weight.shape[0], config.kc if config.kc_out is None else config.kc_out)
    return kc_o, block_size(weight.shape[1], config.kc)


def _base_weight(unet: nn.Module, target: str) -> Tensor:
    module = unet.get_submodule(target)
    if hasattr(module, "reference_weight"):
        return module.reference_weight()
    return module.weight


@register_method
class FilterAtomMethod(LayerDeltaMethod):
    """Filter atoms: dW = alpha x dD per layer (see `FilterAtomConfig` for the strategies)."""

    name = "filter-atoms"

    def __init__(self, config: FilterAtomConfig | None = None, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.config = config or FilterAtomConfig.preset("C2")
        self.compute_dtype = compute_dtype
        self.layouts: dict[str, str] = {}
        self.reports: dict[str, LayerDecomposition] = {}

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> "FilterAtomMethod":
        return cls(FilterAtomConfig.from_dict(config))

    def parameter_shapes(self, layout: str, weight_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Shapes of the saved tensors of one layer, from the config and the layer shape alone."""
        cfg = self.config
        c_out, c_in = weight_shape[0], weight_shape[1]
        if layout == "conv":
            p, q = weight_shape[2], weight_shape[3]
            alpha = (c_out, c_in, cfg.m)
        else:
            p = block_size(c_out, cfg.kc if cfg.kc_out is None else cfg.kc_out)
            q = block_size(c_in, cfg.kc)
            alpha = (c_out // p, c_in // q, cfg.m)
        shapes = {"atoms0": (cfg.m, p, q)}
        if layout == "conv" and cfg.strategy == "beta+D1+Dc":
            shapes.update(delta_beta=(c_in, cfg.m, cfg.m1), delta_atoms1=(cfg.m, cfg.m1, p, q))
        else:
            shapes["delta_atoms"] = (cfg.m, p, q)
        if cfg.train_alpha:
            shapes["delta_alpha"] = alpha
        return shapes

    def expected_shapes(self, unet: nn.Module, adapter_name: str) -> dict[str, tuple[int, ...]]:
        return self._shapes(unet, self.layouts)

    def _shapes(self, unet: nn.Module, layouts: dict[str, str]) -> dict[str, tuple[int, ...]]:
        out = {}
        for target, layout in layouts.items():
            module = unet.get_submodule(target)
            weight = getattr(module, "base_layer", module).weight
            for key, shape in self.parameter_shapes(layout, tuple(weight.shape)).items():
                out[f"{target}.{key}"] = shape
        return out

    def _check_file_shapes(self, unet: nn.Module, targets: dict[str, str], tensors: dict[str, Tensor]) -> None:
        # Checked before anything is allocated, so a crafted config cannot request huge tensors.
        expected = self._shapes(unet, targets)
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != got:
            wrong = sorted(set(expected.items()) ^ set(got.items()))[0][0]
            raise AdapterFormatError(
                f"The adapter has missing, extra or misshapen tensors for its configuration (first: {wrong!r})."
            )

    def inject(
        self,
        unet: nn.Module,
        adapter_name: str,
        tensors: dict[str, Tensor] | None = None,
        decompositions: dict[str, LayerDecomposition] | None = None,
    ) -> None:
        """Wrap each target; alpha comes from `decompositions`, else from stored atoms, else the solver."""
        from ..alpha_cache import cached_decompositions

        targets, self.skipped = select_targets(unet, self.config)
        check_block_size(unet, targets, self.config.kc)
        if tensors is not None:
            self._check_file_shapes(unet, targets, tensors)
            missing = [t for t in targets if f"{t}.atoms0" not in tensors]
            if missing:
                raise AdapterFormatError(f"The adapter has no fixed atoms for layer {missing[0]!r}.")
        if decompositions is None:
            decompositions = cached_decompositions(unet, self.config, list(targets))
        config, found_all, fresh = self.config, {}, {}
        for target, layout in targets.items():
            weight = _base_weight(unet, target)
            derived = derives_alpha(layout, tuple(weight.shape), config) and not config.train_alpha
            stored = None if tensors is None else tensors[f"{target}.atoms0"].to(ATOMS_DTYPE)
            found = (decompositions or {}).get(target)
            if found is not None and stored is not None and not torch.equal(found.atoms0, stored):
                found = None
            if found is None and stored is not None:
                found = (LayerDecomposition(None, stored, float("nan"), 0.0) if derived
                         else decompose_layer(weight, layout, config, atoms0=stored))
            elif found is not None and found.alpha is None and not derived:
                found = decompose_layer(weight, layout, config, atoms0=found.atoms0)
            if found is None:
                fresh[target] = (weight, layout)
            found_all[target] = found
        if fresh:
            def wants_alpha(name: str) -> bool:
                weight, layout = fresh[name]
                return config.train_alpha or not derives_alpha(layout, tuple(weight.shape), config)

            found_all.update(decompose_layers(fresh, config, with_alpha=wants_alpha))
        for target, layout in targets.items():
            found = found_all[target]
            layer = self.wrap(unet, target)
            weight = layer.base_layer.weight
            derived = derives_alpha(layout, tuple(weight.shape), config) and not config.train_alpha
            m1 = config.m1 if (config.strategy == "beta+D1+Dc" and layout == "conv") else None
            alpha = None if derived else found.alpha.to(weight.device)
            delta = AtomDelta(alpha, found.atoms0.to(weight.device), layout, m1=m1, train_alpha=config.train_alpha,
                              dtype=self.compute_dtype, coefficient_shape=tuple(weight.shape[:2]))
            layer.add_delta(adapter_name, delta, scale=config.scale)
            self.layouts[target] = layout
            self.reports[target] = dataclasses.replace(found, alpha=None)  # alpha lives in the layer only
        self.targets = list(targets)
        # Layers loaded from a file whose alpha is derived from W skip the error (NaN): report the computed ones.
        errors = [r.relative_error for r in self.reports.values() if math.isfinite(r.relative_error)]
        if errors:
            logger.info("filter atoms: %d layers decomposed, worst relative error %.3g", len(self.reports), max(errors))
