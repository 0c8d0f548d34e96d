"""The filter-atom method (the paper's C1-C4): alpha frozen, atoms tuned."""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..core.inject import add_adapter
from ..core.layer import base_layer_of, unmerged_weight
from ..core.method import LayerDeltaMethod
from ..errors import AdapterFormatError
from .cache import cached_decompositions
from .config import FilterAtomConfig
from .decomposition import ATOMS_DTYPE, LayerDecomposition, atom_shape, atoms_are_usable, decompose_layer, \
    decompose_layers, needs_alpha
from .delta import AtomDelta
from .grouped import form_groups
from .targets import check_block_size, select_targets

logger = logging.getLogger(__name__)

_FIELDS_BEFORE_OVERCOMPLETE_INIT = {f.name for f in dataclasses.fields(FilterAtomConfig)} - {"overcomplete_init"}


def parameter_shapes(config: FilterAtomConfig, layout: str, weight_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Shapes of the saved tensors of one layer (Table 6 of the paper), from the config and the layer shape alone.

    Every tensor but `atoms0` (the fixed atoms) is trained.
    """
    c_out, c_in = weight_shape[0], weight_shape[1]
    p, q = atom_shape(weight_shape, layout, config)
    alpha = (c_out, c_in, config.m) if layout == "conv" else (c_out // p, c_in // q, config.m)
    shapes = {"atoms0": (config.m, p, q)}
    if layout == "conv" and config.strategy == "beta+D1+Dc":
        shapes.update(delta_beta=(c_in, config.m, config.m1), delta_atoms1=(config.m, config.m1, p, q))
    else:
        shapes["delta_atoms"] = (config.m, p, q)
    if config.train_alpha:
        shapes["delta_alpha"] = alpha
    return shapes


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
        if set(config) == _FIELDS_BEFORE_OVERCOMPLETE_INIT:
            # a saved config from before the field existed: its overcomplete atoms started as the paper's copies
            config = {**config, "overcomplete_init": "copies"}
        return cls(FilterAtomConfig.from_dict(config))

    def expected_shapes(self, unet: nn.Module, adapter_name: str) -> dict[str, tuple[int, ...]]:
        return self._shapes(unet, self.layouts)

    def _shapes(self, unet: nn.Module, layouts: dict[str, str]) -> dict[str, tuple[int, ...]]:
        out = {}
        for target, layout in layouts.items():
            weight = base_layer_of(unet.get_submodule(target)).weight
            for key, shape in parameter_shapes(self.config, layout, tuple(weight.shape)).items():
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
        targets, self.skipped = select_targets(unet, self.config)
        check_block_size(unet, targets, self.config.kc)
        if tensors is not None:
            self._check_file_shapes(unet, targets, tensors)
            missing = [t for t in targets if f"{t}.atoms0" not in tensors]
            if missing:
                raise AdapterFormatError(f"The adapter has no fixed atoms for layer {missing[0]!r}.")
            degenerate = [t for t in targets if not atoms_are_usable(tensors[f"{t}.atoms0"])]
            if degenerate:
                raise AdapterFormatError(f"The adapter's fixed atoms for layer {degenerate[0]!r} are degenerate "
                                         "(zero, repeated or linearly dependent).")
        if decompositions is None:
            decompositions = cached_decompositions(unet, self.config, list(targets))
        config, found_all, fresh = self.config, {}, {}
        for target, layout in targets.items():
            weight = unmerged_weight(unet.get_submodule(target))
            derived = not needs_alpha(layout, tuple(weight.shape), config)
            stored = None if tensors is None else tensors[f"{target}.atoms0"].to(ATOMS_DTYPE)
            found = (decompositions or {}).get(target)
            if found is not None and stored is not None and not torch.equal(found.atoms0, stored):
                found = None
            if found is None and stored is not None:
                found = (LayerDecomposition(None, stored, float("nan"), 0.0, layout, tuple(weight.shape)) if derived
                         else decompose_layer(weight, layout, config, atoms0=stored))
            elif found is not None and found.alpha is None and not derived:
                found = decompose_layer(weight, layout, config, atoms0=found.atoms0)
            if found is None:
                fresh[target] = (weight, layout)
            found_all[target] = found
        if fresh:
            def wants_alpha(name: str) -> bool:
                weight, layout = fresh[name]
                return needs_alpha(layout, tuple(weight.shape), config)

            found_all.update(decompose_layers(fresh, config, with_alpha=wants_alpha))
        for target, layout in targets.items():
            found = found_all[target]
            layer = self.wrap(unet, target)
            weight = layer.base_layer.weight
            derived = not needs_alpha(layout, tuple(weight.shape), config)
            m1 = config.m1 if (config.strategy == "beta+D1+Dc" and layout == "conv") else None
            alpha = None if derived else found.alpha.to(weight.device)
            delta = AtomDelta(alpha, found.atoms0.to(weight.device), layout, m1=m1, train_alpha=config.train_alpha,
                              dtype=self.compute_dtype, coefficient_shape=tuple(weight.shape[:2]),
                              overcomplete_init=config.overcomplete_init)
            layer.add_delta(adapter_name, delta, scale=config.scale)
            self.layouts[target] = layout
            self.reports[target] = dataclasses.replace(found, alpha=None)  # alpha lives in the layer only
        self.targets = list(targets)
        form_groups([(unet.get_submodule(t).deltas[adapter_name], adapter_name) for t in self.targets])
        # Layers loaded from a file whose alpha is derived from W skip the error (NaN): report the computed ones.
        errors = [r.relative_error for r in self.reports.values() if math.isfinite(r.relative_error)]
        if errors:
            logger.info("filter atoms: %d layers decomposed, worst relative error %.3g", len(self.reports), max(errors))


def add_filter_atoms(unet: nn.Module, config: FilterAtomConfig, adapter_name: str = "default") -> int:
    """Swap filter-atom layers into `unet` (see `FilterAtomConfig`); returns the trainable count."""
    return add_adapter(unet, FilterAtomMethod(config), adapter_name)
