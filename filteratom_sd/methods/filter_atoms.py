"""The filter-atom method (the paper's C1-C4): alpha frozen, atoms tuned."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import FilterAtomConfig
from ..decompose import block_size, decompose_conv, decompose_linear, linear_to_blocks, solve_coefficients
from ..errors import AdapterFormatError
from ..inject import check_block_size, select_targets
from ..layers import AtomDelta
from .base import LayerDeltaMethod, register_method

logger = logging.getLogger(__name__)

# Fixed atoms are stored (and alpha rebuilt from them) in this dtype, so training and loading agree.
ATOMS_DTYPE = torch.float32


@dataclass
class LayerDecomposition:
    """alpha and fixed atoms of one layer, with how well alpha x D0 reproduces W and how long it took."""

    alpha: Tensor
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


def decompose_layer(
    weight: Tensor, layout: str, config: FilterAtomConfig, atoms0: Tensor | None = None
) -> LayerDecomposition:
    """Decompose one base weight; with `atoms0` given (from a file) only alpha is solved for."""
    start = time.perf_counter()
    weight = weight.detach().float()
    if atoms0 is None:
        solver_args = dict(solver=config.solver, lam=config.lam, iterations=config.iterations,
                           dictionary_steps=config.dictionary_steps)
        if layout == "conv":
            found = decompose_conv(weight, config.m, **solver_args)
        else:
            found = decompose_linear(weight, config.m, config.kc, config.kc_out, **solver_args)
        atoms0 = found.atoms.to(ATOMS_DTYPE)
    rows, alpha_shape = layer_rows(weight, layout, config)
    atoms_flat = atoms0.to(rows.device).reshape(atoms0.shape[0], -1)
    coeff = solve_coefficients(rows, atoms_flat, config.solver, config.lam, config.iterations)
    error = float((rows.double() - coeff @ atoms_flat.double()).norm() / rows.double().norm().clamp_min(1e-30))
    alpha = coeff.reshape(*alpha_shape, atoms0.shape[0])
    return LayerDecomposition(alpha, atoms0, error, time.perf_counter() - start)


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
        if decompositions is None:
            decompositions = cached_decompositions(unet, self.config, list(targets))
        for target, layout in targets.items():
            layer = self.wrap(unet, target)
            weight = layer.base_layer.weight
            stored = None if tensors is None else tensors.get(f"{target}.atoms0")
            if tensors is not None and stored is None:
                raise AdapterFormatError(f"The adapter has no fixed atoms for layer {target!r}.")
            found = (decompositions or {}).get(target)
            if found is None or (stored is not None and not torch.equal(found.atoms0, stored.to(ATOMS_DTYPE))):
                found = decompose_layer(weight, layout, self.config, atoms0=stored)
            self.reports[target] = found
            m1 = self.config.m1 if (self.config.strategy == "beta+D1+Dc" and layout == "conv") else None
            delta = AtomDelta(found.alpha.to(weight.device), found.atoms0.to(weight.device), layout, m1=m1,
                              train_alpha=self.config.train_alpha, dtype=self.compute_dtype)
            layer.add_delta(adapter_name, delta, scale=self.config.scale)
            self.layouts[target] = layout
        self.targets = list(targets)
        if self.reports:
            worst = max(r.relative_error for r in self.reports.values())
            logger.info("filter atoms: %d layers decomposed, worst relative error %.3g", len(self.reports), worst)
